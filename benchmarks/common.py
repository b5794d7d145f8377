"""Shared helpers for the tquant benchmarks: timing, peak memory, device description, results.

Every benchmark script (CPU and GPU) uses these so that results are comparable and written
the same way:

- :func:`bench_interleaved` times several providers side by side in one process, rotating
  their order every round so that clock and thermal drift (and other processes on a shared
  machine) spread over all of them instead of biasing the last one;
- :func:`summarize` gives the median and the 20th/80th percentiles of the samples;
- :func:`peak_memory_bytes` measures the extra memory one call allocates at its peak
  (``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocation events on the CPU);
- :func:`copy_bandwidth_gbps` measures the device's copy bandwidth, the yardstick for "% of copy";
- :func:`environment` describes the device, versions, date and machine load, and
  :func:`device_slug` names the results folder (``results/cpu-amd-epyc/``);
- :func:`append_csv`, :func:`write_json`, :func:`markdown_table` write results; CSV files are
  appended to (one row per measurement, tagged with a ``run_id``) so repeated runs show the spread.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
RESULTS_ROOT = _HERE / "results" if (_HERE.parent / "pyproject.toml").exists() else Path.cwd() / "tquant-bench-results"
"""Where results go by default: ``benchmarks/results/`` in a source checkout (committed results),
``./tquant-bench-results/`` when tquant runs from a plain install (never into site-packages)."""


# -- device description ------------------------------------------------------------------------
def cpu_model_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device | str) -> str:
    """A human-readable device name: the CPU model, or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_slug(device: torch.device | str) -> str:
    """A stable folder name for a device: ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    name = device_name(device).lower()
    name = re.sub(r"\((r|tm)\)", "", name)
    name = re.sub(r"\b(processor|cpu|\d+-core)\b", " ", name) if device.type == "cpu" else name
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"
    return f"{device.type}-{name}"


def default_out_dir(device: torch.device | str) -> Path:
    """``RESULTS_ROOT/<device_slug>/`` (``benchmarks/results/...`` in a source checkout)."""
    return RESULTS_ROOT / device_slug(device)


def environment(device: torch.device | str) -> dict:
    """Device, versions, threads, date and load: the metadata stored with every result."""
    device = torch.device(device)
    try:
        from tquant import __version__ as tquant_version
    except ImportError:  # pragma: no cover - the benchmarks ship inside tquant
        tquant_version = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "device": device_name(device),
        "device_type": device.type,
        "slug": device_slug(device),
        "torch": torch.__version__,
        "tquant": tquant_version,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_1m": round(load[0], 2),
    }


# -- timing ----------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Milliseconds one call of ``fn`` takes (CUDA events on CUDA, ``perf_counter`` on the CPU).

    The result of ``fn`` is dropped after the clock stops, so freeing it is not timed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out
    return (t1 - t0) * 1e3


def bench_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    max_seconds: float | None = None,
) -> dict[str, list[float]]:
    """Time every provider in ``fns`` ``reps`` times, interleaved; returns ``name -> [ms, ...]``.

    Each provider is first called ``warmup`` times. Then every round calls each provider
    once, in an order rotated by one every round. ``max_seconds`` stops early (after at least
    three rounds) so that slow sizes do not dominate a run.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(time_call_ms(fns[name], device))
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return samples


def summarize(samples: Sequence[float]) -> dict:
    """``{"median", "p20", "p80", "n"}`` of a list of milliseconds."""
    xs = sorted(samples)
    if not xs:
        return {"median": float("nan"), "p20": float("nan"), "p80": float("nan"), "n": 0}

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": statistics.median(xs), "p20": q(0.2), "p80": q(0.8), "n": len(xs)}


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) for ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def copy_bandwidth_gbps(numel: int, device: torch.device | str = "cpu", reps: int = 20) -> float:
    """The device's copy bandwidth: ``dst.copy_(src)`` of ``numel`` fp32 (8 bytes per element moved).

    ``dst`` is allocated once, so this is the bandwidth of the copy itself (no page faults
    or allocator work): the yardstick for a kernel's "% of copy bandwidth".
    """
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    samples = bench_interleaved({"copy": lambda: dst.copy_(src)}, reps=reps, warmup=3, device=device)
    return gbps(8 * numel, summarize(samples["copy"])["median"])


# -- memory ----------------------------------------------------------------------------------
def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation and
    free events that ``torch.profiler`` records with ``profile_memory=True`` (torch's own
    allocations only; ``tracemalloc`` cannot see them). Returns None when the profiler does
    not expose its events (a private API that may change between torch versions).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = prof.profiler.kineto_results.events()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except (AttributeError, RuntimeError):
        return None
    current = peak = 0
    for _, nbytes in deltas:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


# -- results ---------------------------------------------------------------------------------
def new_run_id(env: dict) -> str:
    """A run identifier (the UTC date and time of the run)."""
    return env["date"]


def append_csv(path: Path, rows: Iterable[dict], fieldnames: Sequence[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new).

    If the file exists with a different header, it is rewritten with the new one (old rows
    keep the columns they have).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if list(reader.fieldnames or []) != list(fieldnames):
                old = list(reader)
            else:
                old = None  # plain append
    mode = "a" if old is None else "w"
    with open(path, mode, newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
            for row in old:
                writer.writerow({k: row.get(k, "") for k in fieldnames})
        for row in rows:
            writer.writerow(row)


def read_csv(path: Path) -> list[dict]:
    """All rows of a results CSV as dicts of strings (empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, env: dict, rows: list[dict], notes: Sequence[str] = ()) -> None:
    """Write one run (metadata, notes and rows) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "notes": list(notes), "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def fmt(value, spec: str = ".3g") -> str:
    """Format a number for a markdown table ('-' for None / NaN / empty)."""
    if value is None or value == "":
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if v != v:
        return "-"
    return format(v, spec)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are ``(key, header, format spec)`` (spec ``""`` = as is)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row.get(k), spec) if spec else str(row.get(k, "")) for k, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_markdown(env: dict) -> str:
    """The metadata of a run as a markdown bullet list."""
    keys = ("device", "torch", "tquant", "triton", "python", "threads", "cpu_count", "date", "loadavg_1m")
    return "\n".join(f"- {k}: {env.get(k)}" for k in keys if env.get(k) is not None)


def pyplot():
    """matplotlib's pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--out``, ``--reps``, ``--warmup``, ``--no-plot`` and ``--threads``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results/<device>/; a temporary one with --quick)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per provider")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per provider first")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")


def resolve_out_dir(args: argparse.Namespace, device: torch.device | str) -> Path:
    """The folder results go to: ``--out``, else a temporary folder for ``--quick``, else the default."""
    if args.out is not None:
        return Path(args.out)
    if args.quick:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="tquant-bench-"))
    return default_out_dir(device)
