"""``tquant bench onnx --quick``: the ONNX latency benchmark runs and writes its results (no timing asserted)."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("sklearn")

from tquant import cli  # noqa: E402
from tquant.benchmarks import bench_onnx  # noqa: E402


def test_bench_onnx_quick_digits(tmp_path, capsys):
    assert cli.main(["bench", "onnx", "--quick", "--subjects", "digits", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "onnx.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench_onnx.CSV_FIELDS
        rows = list(reader)
    assert [r["variant"] for r in rows] == [
        "float", "quantize_static", "tquant W8A8", "tquant W8A8 calibrated", "tquant W8A8 unfolded"]
    by = {r["variant"]: r for r in rows}
    assert float(by["float"]["vs_float"]) == 1.0 and float(by["quantize_static"]["vs_quantize_static"]) == 1.0
    # what onnxruntime leaves: tquant's folded model is fully integer, the unfolded one is not
    assert (by["tquant W8A8"]["q_left"], by["tquant W8A8"]["dq_left"]) == ("1", "0")
    assert by["tquant W8A8"]["float_nodes"] == "-"
    assert int(by["tquant W8A8 unfolded"]["q_left"]) > 1
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 100.0 and float(r["median_ms"]) > 0
    markdown = (tmp_path / "onnx.md").read_text()
    assert "## Issue 11 acceptance" in markdown and "vs_quantize_static" in markdown
    assert "results in" in capsys.readouterr().out
