"""Smoke test of the CPU benchmark scripts: ``--quick`` runs write the expected result files.

No timing is asserted (the machine is shared); only that each script runs, and that its CSV,
JSON, markdown and plot exist with the expected columns.
"""

import csv
import json

import pytest

from tquant.benchmarks import bench_qat, bench_quantizer, cli


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_quantizer_quick(tmp_path):
    args = bench_quantizer.build_parser().parse_args(
        ["--quick", "--out", str(tmp_path), "--sizes", "10", "--reps", "2", "--warmup", "1", "--no-plot"]
    )
    assert bench_quantizer.main(args) == 0
    header, rows = _read_csv(tmp_path / "quantizer.csv")
    assert header == bench_quantizer.CSV_FIELDS
    assert {r["mode"] for r in rows} == set(bench_quantizer.MODES)
    assert {"tquant-torch", "torch-fused-op", "torch.ao-module"} <= {r["provider"] for r in rows}
    for r in rows:
        assert float(r["median_ms"]) > 0
    base = [r for r in rows if r["provider"] == bench_quantizer.BASELINE]
    assert all(float(r["speedup_vs_torch_op"]) == pytest.approx(1.0) for r in base)
    run = json.loads((tmp_path / "quantizer.json").read_text())
    assert run["environment"]["device"] and run["environment"]["torch"]
    assert any("aihwkit" in n or "compile" in n for n in run["notes"])
    assert "tquant-torch" in (tmp_path / "quantizer.md").read_text()


def test_bench_qat_quick_via_cli(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["bench", "qat", "--quick", "--models", "mlp", "--out", str(tmp_path), "--reps", "2", "--warmup", "1"]
    args = parser.parse_args(argv)
    assert cli.run(args) == 0
    header, rows = _read_csv(tmp_path / "qat.csv")
    assert header == bench_qat.CSV_FIELDS
    assert {(r["model"], r["variant"]) for r in rows} == {("mlp", v) for v in bench_qat.VARIANTS}
    fl = [r for r in rows if r["variant"] == "float"]
    assert all(float(r["overhead_vs_float"]) == pytest.approx(1.0) for r in fl)
    assert all(int(r["fake_quantizers"]) > 0 for r in rows if not r["variant"].startswith("float"))
    assert "**Compiled, mlp:**" in (tmp_path / "qat.md").read_text()
    assert (tmp_path / "qat.json").exists() and (tmp_path / "qat.md").exists()
    assert (tmp_path / "qat.png").stat().st_size > 0


def test_device_slug_is_stable():
    from tquant.benchmarks import common

    slug = common.device_slug("cpu")
    assert slug.startswith("cpu-") and slug == slug.lower() and " " not in slug
    assert common.summarize([3.0, 1.0, 2.0])["median"] == 2.0


def _busy_loops() -> list[int]:
    """PIDs of running ``python -c "while True: pass"`` processes (the competing load of ``--busy``)."""
    import os

    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().endswith(b"-c\0while True: pass\0"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_bench_quantizer_busy_starts_and_stops_its_competing_load(tmp_path, monkeypatch):
    from tquant.benchmarks import common

    seen = []
    real = bench_quantizer.run_benchmark

    def spy(*args, **kwargs):
        seen.extend(_busy_loops())  # the competing processes run while the timings run
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_quantizer, "run_benchmark", spy)
    before = set(_busy_loops())
    args = bench_quantizer.build_parser().parse_args(
        ["--quick", "--out", str(tmp_path), "--sizes", "20", "--modes", "forward", "--reps", "1", "--warmup", "0",
         "--no-plot", "--no-memory", "--providers", "tquant-torch", "torch-fused-op", "--busy"])
    assert args.busy == 1 and bench_quantizer.main(args) == 0
    assert len(set(seen) - before) == 1 and not set(_busy_loops()) - before, "started one, stopped it"
    run = json.loads((tmp_path / "quantizer-busy.json").read_text())
    assert run["environment"]["competing_processes"] == 1
    assert not (tmp_path / "quantizer.csv").exists()
    markdown = (tmp_path / "quantizer-busy.md").read_text()
    assert "**Busy machine (1 competing busy process(es), training forward):**" in markdown
    assert "- 2^20: `tquant-torch`" in markdown
    busy, note = common.load_verdict(0.1, 3.2, 2, 2, competing=1)  # our own load is not "other work"
    assert not busy, note
