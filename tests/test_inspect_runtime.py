"""``tquant inspect``'s onnxruntime section (issue 11): Q/DQ nodes left after optimisation, the
fused integer nodes, the nodes left float, and a runtime that lacks an op (named, not a crash)."""

from __future__ import annotations

import json

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from tquant import cli, demo  # noqa: E402
from tquant.export import export_onnx, inspect_onnx  # noqa: E402

import models  # noqa: E402


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inspect")
    paths = {}
    for fold in (True, False):
        torch.manual_seed(0)
        qmap = demo.quantization_map(8, fold_activations=fold)
        qmodel = models.calibrated(demo.DigitsCNN(), qmap, lambda b: torch.rand(b, 1, 8, 8))
        paths[fold] = directory / f"digits-{fold}.onnx"
        export_onnx(qmodel, torch.rand(4, 1, 8, 8), paths[fold])
    return paths


def test_fully_integer_file(digits_files, capsys):
    report = inspect_onnx(digits_files[True])
    assert report.runtime == {"q_left": 1, "dq_left": 0, "integer_nodes": {"QGemm": 2, "QLinearConv": 3},
                              "float_nodes": [], "error": None}
    assert cli.main(["inspect", str(digits_files[True])]) == 0
    out = capsys.readouterr().out
    assert "Q/DQ left: 1 QuantizeLinear / 0 DequantizeLinear" in out and "nodes left float: 0 (fully integer)" in out


def test_unfolded_file_lists_what_stays_float(digits_files, capsys):
    report = inspect_onnx(digits_files[False])
    assert (report.runtime["q_left"], report.runtime["dq_left"]) == (5, 6)
    assert cli.main(["inspect", str(digits_files[False]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runtime"]["q_left"] == 5 and data["runtime"]["error"] is None


def test_runtime_that_lacks_an_op_is_named_not_a_crash(tmp_path, capsys):
    node = helper.make_node("FancyQuant", ["x"], ["y"], name="my_fancy_node", domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    report = inspect_onnx(path)
    assert "node 'my_fancy_node' is com.example:FancyQuant" in report.runtime["error"]
    assert cli.main(["inspect", str(path)]) == 0
    assert "cannot load" in capsys.readouterr().out
