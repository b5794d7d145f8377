"""Benchmarks never touch the checkout, say when the machine was busy, show progress (issue 12)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time

import pytest
import torch

from tquant import cli
from tquant.benchmarks import bench_kernels, common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git_status() -> str | None:
    """``git status --porcelain --ignored=no`` of the checkout, or None outside a git checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else None


@pytest.fixture
def checkout_cwd(monkeypatch, tmp_path):
    """Run from the checkout's root; its ``tquant-bench-results/`` is put back as it was afterwards."""
    before = _git_status()
    if before is None:
        pytest.skip("not running from a git checkout")
    results = ROOT / common.RESULTS_ROOT
    saved = tmp_path / "saved"
    if results.exists():
        shutil.copytree(results, saved)
    monkeypatch.chdir(ROOT)
    yield before
    shutil.rmtree(results, ignore_errors=True)
    if saved.exists():
        shutil.copytree(saved, results)


def test_benchmarks_run_from_a_checkout_leave_git_status_clean(checkout_cwd, monkeypatch, capsys):
    """`tquant bench qat` and bench_kernels without --out write ./tquant-bench-results/<device>/ only."""
    monkeypatch.setattr(common, "_loadavg", lambda: 9.5)  # a busy 2-core machine: the warning must show
    monkeypatch.setattr(common, "usable_cpus", lambda: 2)
    argv = ["bench", "qat", "--models", "mlp", "--no-compile", "--reps", "2", "--warmup", "1", "--no-plot"]
    assert cli.main(argv) == 0
    bench_kernels.main(
        ["--device", "cpu", "--sizes", "10", "--reps", "2", "--warmup", "1", "--providers", "tquant-torch",
         "--modes", "fixed", "--granularity", "tensor", "--dtypes", "fp32", "--no-plot"]
    )
    out = ROOT / "tquant-bench-results" / common.device_slug("cpu")
    assert (out / "qat.csv").exists() and (out / "kernels.csv").exists()
    assert _git_status() == checkout_cwd
    err = capsys.readouterr().err
    assert "warning: the machine was busy (load average 9.5" in err
    markdown = (out / "qat.md").read_text()
    assert "- **WARNING: the machine was busy (load average 9.5 at the start, 9.5 at the end" in markdown


def test_default_folder_inside_the_package_is_refused(monkeypatch, capsys):
    package = pathlib.Path(common.__file__).resolve().parent  # a checkout's benchmarks/ (with results/)
    monkeypatch.chdir(package / "results" if (package / "results").is_dir() else package)
    before = sorted(p.name for p in pathlib.Path.cwd().iterdir())
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "qat", "--models", "mlp", "--no-compile", "--reps", "1", "--warmup", "0", "--no-plot"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tquant bench: error: the default results folder ")
    assert "lies inside tquant's own tree" in err[0] and "--out" in err[0]
    assert sorted(p.name for p in pathlib.Path.cwd().iterdir()) == before


def test_out_may_name_the_package_tree_explicitly(tmp_path):
    inside = pathlib.Path(common.__file__).resolve().parent / "results" / "some-device"
    assert common.check_out_dir(inside, explicit=True) == inside
    with pytest.raises(common.OutputDirError, match="inside tquant's own tree"):
        common.check_out_dir(inside, explicit=False)
    assert common.check_out_dir(tmp_path / "x", explicit=False) == tmp_path / "x"


def test_load_verdict():
    busy, text = common.load_verdict(2.47, None, 2, 2)
    assert busy and text.startswith("the machine was busy (load average 2.47, on 2 usable CPUs, 2 threads")
    assert not common.load_verdict(0.3, 2.1, 2, 2)[0]  # the run's own two threads are not "other work"
    assert not common.load_verdict(1.0, 2.0, 1, 2)[0]  # one thread beside one other job on two cores
    assert common.load_verdict(0.2, 3.9, 2, 2)[0]  # others started during the run
    assert common.load_verdict(None, None, 2, 2) == (False, "load average unknown on this OS")


def test_quiet_machine_has_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(common, "_loadavg", lambda: 0.0)
    env = common.environment("cpu")
    common.finish_environment(env)
    assert env["busy"] is False and "WARNING" not in common.environment_markdown(env)
    assert "warning" not in capsys.readouterr().err


def test_timing_loops_show_a_progress_bar(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(common, "PROGRESS_DELAY_S", 0.0)
    samples = common.bench_interleaved({"a": lambda: time.sleep(0.001), "b": lambda: None}, reps=3, warmup=1,
                                       progress=True)
    assert [len(v) for v in samples.values()] == [3, 3]
    err = capsys.readouterr().err
    assert "timing a, b:" in err and "/8 [" in err
    common.bench_interleaved({"a": lambda: None}, reps=2, warmup=0, progress=False)
    assert capsys.readouterr().err == ""


def test_profiler_chatter_is_dropped_and_real_lines_kept(capfd):
    with common.quiet_profiler_chatter():
        os.write(2, b"USDT:2026-11-23 11:22:47 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real warning\n")
    peak = common.peak_memory_bytes(lambda: torch.empty(1 << 16))  # the profiler prints USDT lines itself
    assert peak is None or peak >= 4 << 16
    err = capfd.readouterr().err
    assert "a real warning" in err and "USDT" not in err
