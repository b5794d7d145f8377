"""A new user's first hour (issue 12): install, missing extras, ``tquant inspect`` edges, noise, metadata."""

from __future__ import annotations

import logging
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tquant
from tquant import cli
from tquant.extras import EXTRA_CONTENTS, EXTRA_OF_MODULE, install_hint

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
# onnx_ir comes with onnxscript
DISTRIBUTION_OF_MODULE = {"sklearn": "scikit-learn", "onnx_ir": "onnxscript", "xdist": "pytest-xdist"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _extra_requirements(extras: dict, name: str) -> set[str]:
    """Distribution names an extra installs, self-references (``tquant[a,b]``) expanded."""
    names: set[str] = set()
    for req in extras[name]:
        m = re.match(r"tquant\[(.*)\]", req)
        if m:
            for inner in m.group(1).split(","):
                names |= _extra_requirements(extras, inner.strip())
        else:
            names.add(re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower())
    return names


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


# -- install -----------------------------------------------------------------------------------
def test_quickstart_block_starts_with_the_cpu_torch_line():
    quickstart = README[README.index("## Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1).splitlines()
    assert block[0].startswith("# CPU-only machine") and "skip this line on a CUDA machine" in block[0]
    assert block[1] == CPU_TORCH
    assert any('pip install -e ".[cpu-dev]"' in line for line in block)
    assert any(line.startswith("tquant selfcheck") for line in block)


def test_cpu_dev_has_no_triton_and_dev_still_has_everything():
    extras = _pyproject()["project"]["optional-dependencies"]
    cpu_dev, dev = _extra_requirements(extras, "cpu-dev"), _extra_requirements(extras, "dev")
    assert "triton" not in cpu_dev
    assert {"onnx", "onnxruntime", "onnxscript", "pytest", "hypothesis", "ruff", "scikit-learn"} <= cpu_dev
    assert dev == cpu_dev | {"triton"}
    ci = ROOT / ".ci" / "run"
    if ci.exists():  # CI installs ".[dev]": it must keep working
        assert '".[dev]"' in ci.read_text()


def test_every_optional_module_maps_to_an_extra_that_installs_it():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(EXTRA_CONTENTS) == set(extras)
    for module, extra in EXTRA_OF_MODULE.items():
        assert DISTRIBUTION_OF_MODULE.get(module, module) in _extra_requirements(extras, extra), module
    assert install_hint("onnxruntime.capi") == "pip install 'tquant[onnx]' (onnx, onnxruntime, onnxscript)"
    assert install_hint("sklearn") == "pip install 'tquant[demo]' (scikit-learn, matplotlib, tqdm, rich)"
    assert install_hint("numpy") is None


def test_license_and_metadata():
    project = _pyproject()["project"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c)")
    assert project["license"] == {"text": "MIT"}
    assert project["authors"] and project["authors"][0]["name"]
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]


def test_selfcheck_is_documented_and_passes(capsys):
    assert "tquant selfcheck" in README
    assert cli.main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "  cpu: ok (" in out


# -- missing extras ----------------------------------------------------------------------------
def test_export_without_onnx_names_the_extra():
    result = _run_python("import sys; sys.modules['onnx'] = None\nfrom tquant.export import export_onnx")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: tquant.export needs onnx, which is not installed: "
        "pip install 'tquant[onnx]' (onnx, onnxruntime, onnxscript)"
    )


def test_cli_without_onnx_names_the_extra(tmp_path):
    code = "import sys; sys.modules['onnx'] = None\nfrom tquant.cli import main\nsys.exit(main(sys.argv[1:]))"
    result = _run_python(code, "inspect", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tquant inspect: missing dependency onnx: pip install 'tquant[onnx]' (onnx, onnxruntime, onnxscript)"
    )


# -- tquant inspect ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "directory", "missing"])
def test_inspect_bad_paths_exit_2_with_one_line(kind, tmp_path, capsys):
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    assert cli.main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    expected = {
        "empty": f"{path} is empty (0 bytes): not an ONNX model",
        "directory": f"{path} is a directory, not an .onnx file",
        "missing": f"no such file: {path}",
    }[kind]
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"tquant inspect: error: {expected}")


def _wide_onnx(path: pathlib.Path, channels: int) -> None:
    """An ONNX file with one per-channel int8 weight of ``channels`` rows (a long --json report)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ones((channels, 1), np.int8), "w.codes"),
        numpy_helper.from_array(np.linspace(0.01, 1.0, channels, dtype=np.float32), "w.scale"),
    ]
    node = helper.make_node("DequantizeLinear", ["w.codes", "w.scale"], ["y"], axis=0)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [channels, 1])
    model = helper.make_model(helper.make_graph([node], "g", [], [out], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(path))


def test_inspect_json_into_a_closed_pipe_has_no_traceback(tmp_path):
    """``tquant inspect --json f.onnx | head -1``: the reader leaves after one line."""
    pytest.importorskip("onnx")
    path = tmp_path / "wide.onnx"
    _wide_onnx(path, 40000)  # ~1 MB of JSON, far more than a pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "tquant.cli", "inspect", "--json", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# -- noise -------------------------------------------------------------------------------------
def test_export_prints_no_third_party_chatter(tmp_path, capfd):
    pytest.importorskip("onnxscript")
    from tquant.export import export_onnx

    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    qmodel = tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), qmap)
    x = torch.randn(3, 4)
    qmodel(x)
    qmodel.eval()
    capfd.readouterr()
    export_onnx(qmodel, x, tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert "is not installed. Skipping" not in out + err


def test_only_not_installed_lines_are_dropped():
    pytest.importorskip("onnx")
    from tquant.export._quiet import CHATTY_LOGGERS, NotInstalledFilter

    logger = logging.getLogger(CHATTY_LOGGERS[0])
    assert any(isinstance(f, NotInstalledFilter) for f in logger.filters)

    def record(msg, *args):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None)

    assert not logger.filter(record("torchvision is not installed. Skipping %s", "torchvision::nms"))
    assert logger.filter(record("Failed to convert the model: %s", "unsupported op"))


# -- demo plot ---------------------------------------------------------------------------------
def test_summary_png_legend_hides_no_bar(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from tquant.demo import report

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    variants = [
        SimpleNamespace(name=n, accuracy=a, onnx_accuracy=a, onnx_bytes=kib * 1024, size_ratio=r, latency_ms_batch=ms)
        for n, a, kib, r, ms in [("float", 98.4, 246, 1.0, 1.3), ("W8A8 QAT", 98.4, 74, 0.3, 1.7),
                                 ("W4A8 QAT", 98.2, 43, 0.17, 7.8)]
    ]
    report._plot(SimpleNamespace(variants=variants, config={"seed": 0}), tmp_path / "summary.png")
    (fig,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    from matplotlib.transforms import Bbox

    legend = ax.get_legend().get_window_extent(renderer)
    visible = ax.get_window_extent(renderer)  # bars start at 0, far below the y limits: clip them
    bars = [Bbox.intersection(patch.get_window_extent(renderer), visible) for patch in ax.patches]
    assert len(bars) == 6 and all(bar is not None for bar in bars)
    assert not any(legend.overlaps(bar) for bar in bars)
