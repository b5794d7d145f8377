"""Issue 19's acceptance on the five model families (small sizes): one recipe, no layer names.

``tquant.benchmarks.deploy.deploy_int8`` (the README's deployment recipe) converts, calibrates,
exports and validates every family unchanged. Each export is integer after onnxruntime's
optimisations except where onnxruntime has no integer kernel (LayerNorm, GELU), validates, and
predicts the float model's class on >= 95 % of random inputs. Latency is measured by
``tquant bench onnx`` (benchmarks/results/), never here.
"""

from __future__ import annotations

import inspect
import pathlib
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant.benchmarks import deploy, families  # noqa: E402
from tquant.benchmarks.bench_onnx import run_session, session  # noqa: E402
from tquant.export import FloatOpsWarning  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NO_INTEGER_KERNEL = {"LayerNormalization", "Gelu"}
EXPECTED_INTEGER = {
    "resnet": {"QLinearConv": 9, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1, "QGemm": 1},
    "mobilenet": {"QLinearConv": 16, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1, "QGemm": 1},
    "vgg": {"QLinearConv": 5, "QGemm": 2},
    "mlp": {"QGemm": 3},
    "transformer": {"QGemm": 8, "QLinearMatMul": 2, "QLinearSoftmax": 1, "QLinearAdd": 3,
                    "QLinearGlobalAveragePool": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_recipe_deploys_every_family_as_integer(family, tmp_path):
    model, sample = families.build(family, "small")
    torch.manual_seed(1)
    calibration = [sample(16) for _ in range(4)]
    example = sample(8)
    path = tmp_path / f"{family}.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result, report = deploy.deploy_int8(model, example, calibration, path)
    float_warnings = [str(w.message) for w in caught if issubclass(w.category, FloatOpsWarning)]
    other = [str(w.message) for w in caught if not issubclass(w.category, FloatOpsWarning)
             and "tquant" in str(w.filename) + str(w.message)]
    assert other == []
    graph = optimized_graph(path)
    assert graph.integer_nodes == EXPECTED_INTEGER[family], graph.summary()
    assert {op for op, _ in graph.float_nodes} <= NO_INTEGER_KERNEL, graph.summary()
    # what stays float is reported by module path, with the reason
    assert bool(result.float_ops) == bool(graph.float_nodes)
    for line in result.float_ops:
        assert "onnxruntime has no integer kernel" in line and "at 'node_" not in line, line
    assert bool(float_warnings) == bool(result.float_ops)
    assert report.ok(), report.failures()
    tests = sample(256)
    with torch.no_grad():
        reference = model(tests).argmax(1).numpy()
    out = np.concatenate([run_session(session(path), t.numpy()) for t in tests.split(64)])
    assert (out.argmax(1) == reference).mean() >= 0.95


def test_readme_shows_the_recipe_unchanged():
    source = inspect.getsource(deploy.deploy_int8)
    body = source[source.index('    """', source.index("def ")):]
    body = body[body.index('"""', 7) + 3:]  # after the docstring
    lines = [line[4:] for line in body.strip("\n").splitlines()]
    assert lines[-1].startswith("return ")  # the README runs the lines as a script
    assert "\n".join(lines[:-1]) in README.read_text()
