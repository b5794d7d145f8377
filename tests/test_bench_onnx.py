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
    assert cli.main(["bench", "onnx", "--quick", "--subjects", "digits", "--seeds", "2", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "onnx.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench_onnx.CSV_FIELDS
        rows = list(reader)
    assert [r["variant"] for r in rows] == [
        "float", "quantize_static", "tquant W8A8", "tquant W8A8 calibrated", "tquant W8A8 unfolded",
        "tquant W8A8 recipe"]
    by = {r["variant"]: r for r in rows}
    assert float(by["float"]["vs_float"]) == 1.0 and float(by["quantize_static"]["vs_quantize_static"]) == 1.0
    # what onnxruntime leaves: tquant's folded model is fully integer, the unfolded one is not
    assert (by["tquant W8A8"]["q_left"], by["tquant W8A8"]["dq_left"]) == ("1", "0")
    assert by["tquant W8A8"]["float_nodes"] == "-"
    assert (by["tquant W8A8 recipe"]["q_left"], by["tquant W8A8 recipe"]["float_nodes"]) == ("1", "-")
    assert int(by["tquant W8A8 unfolded"]["q_left"]) > 1
    for r in rows:
        per_seed = [float(a) for a in r["accuracy_seeds"].split()]
        assert r["seeds"] == "2" and len(per_seed) == 2
        assert float(r["accuracy"]) == pytest.approx(sum(per_seed) / 2, abs=0.01)
        assert all(0.0 <= a <= 100.0 for a in per_seed) and float(r["median_ms"]) > 0
    markdown = (tmp_path / "onnx.md").read_text()
    assert "## Acceptance (issue 11" in markdown and "vs_quantize_static" in markdown
    assert "## Digits accuracy by seed" in markdown and "| seed 0 | seed 1 | mean |" in markdown
    assert "(mean of 2 seeds;" in markdown
    assert "results in" in capsys.readouterr().out


def _digits_row(variant: str, correct: list[int]) -> dict:
    per_seed = [100.0 * k / 450 for k in correct]
    return {"subject": "digits", "variant": variant, "vs_float": 0.6, "vs_quantize_static": 0.95,
            "accuracy": sum(per_seed) / len(per_seed), "seeds": len(per_seed), "test_images": 450,
            "accuracy_seeds": " ".join(f"{a:.2f}" for a in per_seed)}


@pytest.mark.parametrize(("ours", "verdict"), [
    ([443, 445, 444], "PASS"),  # one image behind on seed 0, one ahead on seed 1: equal means
    ([443, 444, 444], "FAIL"),
])
def test_accuracy_check_compares_the_means_over_seeds(ours, verdict):
    peer = [444, 444, 444]
    lines = bench_onnx.checks([_digits_row("quantize_static", peer), _digits_row("tquant W8A8", ours)])
    line = next(x for x in lines if x.startswith("digits tquant W8A8 accuracy"))
    assert line.endswith(verdict)
    assert "mean of 3 seeds" in line and "per seed: -1 " in line


def test_calibration_only_accuracy_is_reported_without_a_verdict():
    """Only the QAT model is the delivered one: the calibrated row is shown for reference."""
    rows = [_digits_row("quantize_static", [444, 444]), _digits_row("tquant W8A8", [444, 444]),
            _digits_row("tquant W8A8 calibrated", [443, 444])]
    lines = bench_onnx.checks(rows)
    line = next(x for x in lines if x.startswith("digits tquant W8A8 calibrated accuracy"))
    assert line.endswith("not an acceptance point): behind") and "FAIL" not in line and "PASS" not in line
    assert next(x for x in lines if x.startswith("digits tquant W8A8 accuracy")).endswith("PASS")


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "onnx", "--quick", "--seeds", "0"])
    assert exc.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_bench_onnx_quick_family(tmp_path):
    assert cli.main(["bench", "onnx", "--quick", "--subjects", "mlp", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "onnx.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert {"float", "quantize_static", "tquant W8A8"} <= set(rows)
    mine = rows["tquant W8A8"]
    assert mine["validates"] == "True" and float(mine["agreement"]) >= 95.0
    assert mine["integer_nodes"] == "QGemm:3" and mine["float_nodes"] == "-"
    assert float(mine["median_ms_b1"]) > 0 and float(mine["vs_float_b1"]) > 0
    assert "mlp tquant W8A8 (batch 32):" in (tmp_path / "onnx.md").read_text()
