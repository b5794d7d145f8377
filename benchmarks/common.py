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
  :func:`device_slug` names the results folder (``tquant-bench-results/cpu-amd-epyc/``);
  :func:`finish_environment` records the load at the end and warns (on screen and in the
  markdown) when other work competed for the CPU during the run;
- :func:`resolve_out_dir` picks the results folder and refuses to write into tquant's own
  source or installed tree unless ``--out`` names it;
- :func:`append_csv`, :func:`write_json`, :func:`markdown_table` write results; CSV files are
  appended to (one row per measurement, tagged with a ``run_id``) so repeated runs show the spread.

Timing loops longer than :data:`PROGRESS_DELAY_S` show a progress bar on stderr (tqdm, when it is
installed and stderr is a terminal; ``TQDM_DISABLE=1`` turns them off).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .options import RESULTS_ROOT, add_common_args  # noqa: F401 - the benchmarks' shared options, re-exported

PACKAGES = ("tquant", "tquant.kernels", "tquant.export", "tquant.benchmarks")
"""tquant's packages: their folders (a checkout's ``tquant/``, ``kernels/``, ``export/``,
``benchmarks/`` with the committed ``benchmarks/results/``, or site-packages' ``tquant/``) are
written only when ``--out`` names them."""
PROGRESS_DELAY_S = 2.0
"""A timing loop shows its progress bar once it has run this long."""
BUSY_SLACK = 0.5
"""The machine counts as busy when the load of other work plus the run's threads exceeds the
usable cores by more than this (see :func:`load_verdict`)."""


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
    """``./tquant-bench-results/<device_slug>/`` in the working directory (:data:`RESULTS_ROOT`)."""
    return RESULTS_ROOT / device_slug(device)


def environment(device: torch.device | str, warn: bool = True) -> dict:
    """Device, versions, threads, date and load: the metadata stored with every result.

    With ``warn``, prints a warning to stderr when the machine is already busy (see
    :func:`load_verdict`); :func:`finish_environment` completes the record at the end of the run.
    """
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
    load = _loadavg()
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "slug": device_slug(device),
        "torch": torch.__version__,
        "tquant": tquant_version,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_1m": load,
    }
    if warn:
        busy, text = load_verdict(load, None, env["threads"], env["cpus_usable"])
        if busy:
            print(f"warning: {text}", file=sys.stderr)
    return env


# -- machine load ------------------------------------------------------------------------------
def _loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_verdict(start: float | None, end: float | None, threads: int, cpus: int,
                 competing: int = 0) -> tuple[bool, str]:
    """``(busy, sentence)`` for the 1-minute load averages at the start and end of a run.

    The load of other work is the load at the start, or at the end minus the run's own threads
    (the larger); the machine was busy when that plus the run's threads exceeds ``cpus`` by more
    than :data:`BUSY_SLACK`: then the run shared cores with others and its timings, and any
    comparison drawn from them, are not reliable. ``competing`` busy processes that the benchmark
    started itself (:func:`competing_load`) are the point of such a run, not other work: they are
    taken out of the end load.
    """
    if start is None and end is None:
        return False, "load average unknown on this OS"
    own = min(threads, cpus)
    other = max(start or 0.0, (end - own - competing) if end is not None else 0.0)
    loads = f"load average {start}" + (f" at the start, {end} at the end" if end is not None else "")
    busy = other + own > cpus + BUSY_SLACK
    if busy:
        return True, (
            f"the machine was busy ({loads}, on {cpus} usable CPUs, {threads} threads for the benchmark): "
            "other work competed for the cores, so these timings and the conclusions drawn from them "
            "are unreliable; rerun on an idle machine"
        )
    return False, f"{loads} on {cpus} usable CPUs ({threads} threads): the machine was not busy"


def finish_environment(env: dict) -> dict:
    """Record the load at the end of the run and the verdict in ``env`` (once); warn on stderr when busy.

    Adds ``loadavg_1m_end``, ``busy`` and ``load_note``. :func:`write_json` and
    :func:`environment_markdown` call it, so every result file carries the verdict.
    """
    if "busy" in env:
        return env
    env["loadavg_1m_end"] = _loadavg()
    threads = int(env.get("threads") or torch.get_num_threads())
    cpus = int(env.get("cpus_usable") or usable_cpus())
    env["busy"], env["load_note"] = load_verdict(env.get("loadavg_1m"), env["loadavg_1m_end"], threads, cpus,
                                                 int(env.get("competing_processes") or 0))
    if env["busy"]:
        print(f"warning: {env['load_note']}", file=sys.stderr)
    return env


@contextlib.contextmanager
def competing_load(n: int, env: dict | None = None) -> Iterator[None]:
    """``n`` busy processes (a Python loop each) competing for the CPUs while the block runs, killed at
    its end: how a benchmark measures a busy machine on purpose (recorded as ``competing_processes``)."""
    if env is not None:
        env["competing_processes"] = n
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(1.0)  # let the scheduler spread them over the cores
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


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


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar on stderr that appears after :data:`PROGRESS_DELAY_S` seconds, or None.

    ``enabled=None``: when tqdm is installed and stderr is a terminal; ``True``: whenever tqdm is
    installed (``TQDM_DISABLE=1`` still turns it off); ``False``: never.
    """
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        desc=desc,
        unit="call",
        leave=False,
        delay=PROGRESS_DELAY_S,
        file=sys.stderr,
        disable=None if enabled is None else False,
        dynamic_ncols=True,
    )


def bench_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    max_seconds: float | None = None,
    desc: str | None = None,
    progress: bool | None = None,
) -> dict[str, list[float]]:
    """Time every provider in ``fns`` ``reps`` times, interleaved; returns ``name -> [ms, ...]``.

    Each provider is first called ``warmup`` times. Then every round calls each provider
    once, in an order rotated by one every round. ``max_seconds`` stops early (after at least
    three rounds) so that slow sizes do not dominate a run. A loop that runs longer than
    :data:`PROGRESS_DELAY_S` shows a progress bar (``desc``, default: the provider names; see
    :func:`progress_bar` for ``progress``).
    """
    names = list(fns)
    bar = progress_bar(len(names) * (warmup + reps), desc or "timing " + ", ".join(names), progress)
    try:
        for name in names:
            for _ in range(warmup):
                fns[name]()
                if bar is not None:
                    bar.update()
            synchronize(device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        start = time.perf_counter()
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(time_call_ms(fns[name], device))
            if bar is not None:
                bar.update(len(names))
            if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
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
        with quiet_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


@contextlib.contextmanager
def quiet_profiler_chatter(prefixes: tuple[str, ...] = ("USDT:", "STAGE:")) -> Iterator[None]:
    """Drop the lines the profiler's C++ side (kineto) prints to stderr meanwhile, keep the rest.

    Kineto writes ``USDT: ... profiler_start`` / ``profiler_stop`` (and ``STAGE:`` lines) straight to
    file descriptor 2 on every profiling session; ``KINETO_LOG_LEVEL`` can only silence them with
    its errors. So fd 2 goes to a temporary file while the block runs, and every line that does
    not start with one of ``prefixes`` is written back to stderr afterwards.
    """
    fd = 2  # kineto writes to the process's stderr whatever sys.stderr is
    sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr at all
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not line.startswith(tuple(p.encode() for p in prefixes)))
            if kept:
                os.write(fd, kept)


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
    """Write one run (metadata, notes and rows) as JSON (after :func:`finish_environment`)."""
    finish_environment(env)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "notes": list(notes), "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def record_run(out: Path, stem: str, env: dict, rows: list[dict], fieldnames: Sequence[str],
               notes: Sequence[str] = (), tags: Sequence[str] = ("torch",)) -> list[dict]:
    """Tag ``rows`` with a new run id, the device and the ``tags`` fields of ``env``; append them to
    ``out/<stem>.csv`` and write ``out/<stem>.json``. Returns every run the CSV holds (the history)."""
    run_id = new_run_id(env)
    for r in rows:
        r.update(run_id=run_id, device=env["device"], **{k: env[k] for k in tags})
    append_csv(out / f"{stem}.csv", rows, fieldnames)
    write_json(out / f"{stem}.json", env, rows, notes)
    return read_csv(out / f"{stem}.csv")


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
    """The metadata of a run as a markdown bullet list; a busy machine's warning comes first, in bold."""
    finish_environment(env)
    keys = (
        "device", "torch", "tquant", "triton", "python", "threads", "cpu_count", "cpus_usable", "date",
        "loadavg_1m", "loadavg_1m_end", "competing_processes",
    )
    lines = [f"- {k}: {env.get(k)}" for k in keys if env.get(k) is not None]
    if env.get("busy"):
        lines.insert(0, f"- **WARNING: {env['load_note']}.**")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


class OutputDirError(ValueError):
    """The default results folder lies inside tquant's own tree (see :func:`check_out_dir`)."""


def package_dirs() -> list[Path]:
    """The folders of tquant's packages (:data:`PACKAGES`), resolved."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(Path(location).resolve())
    return dirs


def check_out_dir(path: Path, explicit: bool) -> Path:
    """``path``, unless it is the default and lies inside one of :func:`package_dirs`.

    Results written there would modify the committed ``benchmarks/results/`` of a checkout or
    land in site-packages; only an explicit ``--out`` may point there. Raises :class:`OutputDirError`.
    """
    resolved = Path(path).resolve()
    if not explicit:
        for directory in package_dirs():
            if resolved == directory or directory in resolved.parents:
                raise OutputDirError(
                    f"the default results folder {resolved} lies inside tquant's own tree ({directory}); "
                    "run from another folder, or name the folder with --out to write there on purpose"
                )
    return Path(path)


def resolve_out_dir(args: argparse.Namespace, device: torch.device | str) -> Path:
    """The folder results go to: ``--out``, else a temporary folder for ``--quick``, else
    ``./tquant-bench-results/<device>/`` (:func:`default_out_dir`).

    A default inside tquant's own tree (:func:`check_out_dir`) is refused like a bad option: one
    line on stderr and ``SystemExit(2)``.
    """
    if args.out is not None:
        return check_out_dir(Path(args.out), explicit=True)
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="tquant-bench-"))
    try:
        return check_out_dir(default_out_dir(device), explicit=False)
    except OutputDirError as err:
        print(f"tquant bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
