"""``tquant demo``: a tiny end-to-end run (report fields and files), determinism, and bad input.

The end-to-end run uses ``--epochs 1 --qat-epochs 1 --limit 160`` so it takes seconds; the
accuracy bars of the default run are checked by running ``tquant demo`` itself (README).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant import cli, demo  # noqa: E402

TINY = ["--epochs", "1", "--qat-epochs", "1", "--limit", "160", "--no-progress"]


def _one_line_error(err: str, prefix: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "results"
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["demo", *TINY, "--bits", "3", "--seed", "7", "--out", str(out), "--strict"])
    settings_restored = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (
        threads, deterministic)
    return rc, out, settings_restored, stdout.getvalue(), stderr.getvalue()


def test_tiny_run_writes_report_and_files(tiny_run):
    rc, out, settings_restored, _, _ = tiny_run
    assert rc in (0, 1)
    assert settings_restored
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 7 and summary["config"]["bits"] == 3
    assert summary["config"]["epochs"] == 1 and summary["config"]["qat_epochs"] == 1
    assert summary["data"]["train"] == 160 and summary["data"]["test"] == 160
    assert summary["environment"]["device"] in ("cpu", "cuda")
    names = [v["name"] for v in summary["variants"]]
    assert names == ["float", "W8A8 QAT", "W3A8 QAT"]
    fields = {
        "accuracy", "ptq_accuracy", "onnx_file", "onnx_bytes", "onnx_accuracy", "onnx_agreement",
        "size_ratio", "latency_ms_batch1", "latency_ms_batch", "latency_speedup", "weight_bits", "act_bits",
        "validation",
    }
    float_row, w8, w3 = summary["variants"]
    for row in summary["variants"]:
        assert fields <= set(row)
        for key in ("accuracy", "onnx_accuracy", "onnx_agreement"):
            assert 0.0 <= row[key] <= 100.0
        assert row["latency_ms_batch1"] > 0 and row["latency_ms_batch"] > 0
        assert (out / row["onnx_file"]).stat().st_size == row["onnx_bytes"]
    assert float_row["weight_bits"] is None and float_row["ptq_accuracy"] is None
    assert float_row["size_ratio"] == 1.0
    assert (w8["weight_bits"], w8["act_bits"], w3["weight_bits"], w3["act_bits"]) == (8, 8, 3, 8)
    assert w3["onnx_bytes"] < w8["onnx_bytes"] < float_row["onnx_bytes"]
    for row in (w8, w3):
        assert {"min_match_share", "max_abs", "max_lsb", "fused", "report"} <= set(row["validation"])
        assert row["ptq_accuracy"] is not None
    assert len(summary["checks"]) == 6 and all(isinstance(v, bool) for v in summary["checks"].values())
    assert summary["seconds"] > 0


def test_failed_checks_are_printed_and_strict_exits_non_zero(tiny_run):
    """One float epoch on 160 images stays far below the 95 % float-accuracy bar: that check fails, the
    terminal says so after the table, and ``--strict`` turns it into exit status 1 with one line on stderr."""
    rc, out, _, stdout, stderr = tiny_run
    checks = json.loads((out / "summary.json").read_text())["checks"]
    failed = [name for name, ok in checks.items() if not ok]
    assert "float accuracy >= 95%" in failed
    line = f"checks: {len(failed)} of {len(checks)} FAILED: " + "; ".join(failed)
    assert line in stdout.replace("\n", " ")
    assert rc == 1
    _one_line_error(stderr, f"tquant demo: error: {line} (--strict)")


def test_tiny_run_files_are_valid(tiny_run):
    onnx = pytest.importorskip("onnx")
    _, out, _, _, _ = tiny_run
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "summary.md").read_text()
    assert "| float |" in markdown and "| W8A8 QAT |" in markdown and "| W3A8 QAT |" in markdown
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["variants"]:
        model = onnx.load(str(out / row["onnx_file"]))
        ops = {node.op_type for node in model.graph.node}
        if row["weight_bits"] is None:
            assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
        else:
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp or probe files left


def test_training_is_deterministic():
    data = demo.load_digits_split(seed=3, limit=48)
    again = demo.load_digits_split(seed=3, limit=48)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = demo.DigitsCNN()
        demo.train(model, data, 1, demo.FLOAT_LR, 3, torch.device("cpu"), "float", progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
def test_quantization_map_quantizes_each_tensor_and_keeps_float_logits(fold):
    """Folded (the default): the image and every layer's output after its ReLU are quantized once.
    Not folded: every layer's input is quantized as well."""
    import tquant

    qmap = demo.quantization_map(4, fold_activations=fold)
    assert qmap.default_qconfig.weight_quant.n_bits == 4 and qmap.default_qconfig.weight_quant.per_channel
    assert qmap.default_qconfig.activation_quant.n_bits == 8
    expected_inputs = demo.DigitsCNN.LAYERS[:1] if fold else demo.DigitsCNN.LAYERS
    assert list(qmap.input_activation_qconfig_map) == list(expected_inputs)
    qmodel = tquant.convert_to_quantized(demo.DigitsCNN(), qmap)
    first = qmodel.features[0]
    assert isinstance(first, tquant.QuantizedInputModule) and isinstance(first.module, tquant.QuantConv2d)
    assert isinstance(first.module.activation_function, nn.ReLU) == fold
    assert isinstance(qmodel.features[1], nn.Identity if fold else nn.ReLU)
    last = qmodel.classifier[3]
    last = last if fold else last.module
    assert isinstance(last, tquant.QuantLinear) and last.n_bits == 4 and last.n_bits_act <= 0


@pytest.mark.parametrize("argv", [
    ["--device", "tpu"],
    ["--bits", "8"],
    ["--bits", "four"],
    ["--epochs", "0"],
    ["--qat-epochs", "-1"],
    ["--seed", "-1"],
    ["--limit", "x"],
    ["--bogus"],
])
def test_bad_option_values_exit_2_with_one_line(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "tquant: error:")
    assert not (tmp_path / "o").exists()


def test_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert cli.main(["demo", *TINY, "--out", str(blocker / "sub")]) == 2
    _one_line_error(capsys.readouterr().err, "tquant demo: error: cannot write to output folder")


def test_out_is_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    assert cli.main(["demo", *TINY, "--out", str(blocker)]) == 2
    _one_line_error(capsys.readouterr().err, "tquant demo: error: output folder")
    assert blocker.read_text() == "keep me"


IS_ROOT = not hasattr(os, "geteuid") or os.geteuid() == 0


@pytest.mark.skipif(IS_ROOT, reason="root can write a read-only folder")
def test_out_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert cli.main(["demo", *TINY, "--out", str(folder)]) == 2
    finally:
        folder.chmod(0o755)
    _one_line_error(capsys.readouterr().err, "tquant demo: error: cannot write to output folder")


def test_out_not_writable_is_reported(tmp_path, capsys, monkeypatch):
    """The write probe failing (a read-only folder for a non-root user) is one line too."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(demo.tempfile, "NamedTemporaryFile", refuse)
    assert cli.main(["demo", *TINY, "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "tquant demo: error: cannot write to output folder")
    assert "Permission denied" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device(tmp_path, capsys):
    assert cli.main(["demo", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys.readouterr().err, "tquant demo: error: --device cuda")


def test_no_traceback_from_the_command(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "tquant.cli", "demo", *TINY, "--out", str(blocker / "sub")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "tquant demo: error: cannot write to output folder")
