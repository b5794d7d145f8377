"""Per-tensor running-min/max 8-bit fake quantizer, training forward / backward, CPU or CUDA.

Providers, side by side in one process on the same fp32 tensor (``x.requires_grad``):

- ``tquant-torch``: ``tquant.QuantizationManager`` (asymmetric, ``running_minmax``, 8 bits) on
  the torch path (backend ``torch``): its planned call (range update + fake quant);
- ``tquant-triton``: the same manager on the Triton kernels (CUDA only, backend ``auto``);
- ``torch-fused-op``: ``torch.fused_moving_avg_obs_fake_quant`` (observer and fake quant on,
  running min/max, ``averaging_const=0.1``, quint8 ``[0, 255]``), the yardstick of the ratios;
- ``torch.ao-module``: ``torch.ao.quantization.FusedMovingAvgObsFakeQuantize`` (same settings);
- ``compile-ref``: ``torch.compile`` of tquant's eager reference (batch min/max, EMA, qparams,
  fake quant), one compilation per size (skipped with ``--quick`` or ``--no-compile``);
- ``aihwkit-ref``: aihwkit's quantization manager, only when ``aihwkit`` imports.

Modes: ``forward`` (range update + fake quant), ``backward`` (gradient of a kept forward,
``retain_graph``), ``full`` (both). Minimal traffic per fp32 element: forward 13 bytes (two
reads of ``x``, one write of ``y``, the 1-byte mask), backward 9 (read grad and mask, write
grad), full 22. ``host_us``: microseconds of Python per call, timed over many calls without a
device synchronisation (on the CPU it is the call time). The smallest size (2^10) is the host
overhead proxy: tquant's module-level training forward + backward there against torch's fused op +
its backward. Results go to ``./tquant-bench-results/<device>/quantizer.{csv,json,md,png}``.

Run: ``python -m tquant.benchmarks.bench_quantizer [--quick]`` or ``tquant bench quantizer``.
GPU kernel microbenchmarks (Triton) live in ``bench_kernels.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import common, options

SIZES = [2**10, 2**16, 2**18, 2**20, 2**22, 2**24]
QUICK_SIZES = [2**10, 2**12]
HOST_SIZE = 2**10
"""The size of the host-overhead acceptance (full mode): tquant within HOST_RATIO of torch's op."""
HOST_RATIO = 1.3
BUSY_SIZES = (2**20, 2**22, 2**24)
BUSY_RATIO = 1.2
"""With competing busy processes (``--busy``): tquant within BUSY_RATIO of torch's op at these sizes (forward)."""
MODES = options.QUANTIZER_MODES
BYTES_PER_ELEMENT = {"forward": 13, "backward": 9, "full": 22}
"""Minimal fp32 traffic per element of each mode (see the module docstring)."""
BASELINE = "torch-fused-op"
ACCEPTANCE_PROVIDER = "tquant-torch"
PROVIDERS = options.QUANTIZER_PROVIDERS

CSV_FIELDS = [
    "run_id",
    "device",
    "torch",
    "numel",
    "log2_numel",
    "mode",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "n",
    "speedup_vs_torch_op",
    "gbps",
    "pct_of_copy",
    "copy_gbps",
    "peak_mem_mb",
    "host_us",
]


class Skip(Exception):
    """A provider that cannot run here; the message says why (it goes into the notes)."""


# -- providers: each returns a zero-argument training forward on ``x`` ------------------------
def _tquant_manager(x: torch.Tensor, backend: str) -> Callable[[], torch.Tensor]:
    import tquant
    from tquant.kernels import set_backend

    qm = tquant.QuantizationManager(
        qmethod=tquant.QMethods.asymmetric_uniform,
        init=tquant.RangeEstimators.running_minmax,
        qparams={"n_bits": 8},
    ).to(x.device).train()

    def forward():
        set_backend(backend)  # a global switch (not a context manager): cheap, and fair to time
        return qm(x)

    return forward


def setup_tquant_torch(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """tquant's quantization manager on the torch path."""
    return _tquant_manager(x, "torch")


def setup_tquant_triton(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """tquant's quantization manager on the Triton kernels (CUDA tensors)."""
    from tquant.kernels._triton import HAS_TRITON

    if not x.is_cuda or not HAS_TRITON:
        raise Skip("tquant-triton: needs a CUDA device and Triton")
    return _tquant_manager(x, "auto")


def setup_torch_fused_op(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch.fused_moving_avg_obs_fake_quant`` with its own state tensors."""
    dev = x.device
    observer_on = torch.ones(1, dtype=torch.long, device=dev)
    fake_quant_on = torch.ones(1, dtype=torch.long, device=dev)
    running_min = torch.tensor(float("inf"), device=dev)
    running_max = torch.tensor(float("-inf"), device=dev)
    scale = torch.ones(1, device=dev)
    zero_point = torch.zeros(1, dtype=torch.int32, device=dev)

    def forward():
        return torch.fused_moving_avg_obs_fake_quant(
            x,
            observer_on,
            fake_quant_on,
            running_min,
            running_max,
            scale,
            zero_point,
            0.1,
            0,
            255,
            0,
            False,
            False,
        )

    return forward


def setup_torch_ao_module(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch.ao.quantization.FusedMovingAvgObsFakeQuantize`` (quint8, per tensor affine)."""
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver

    fq = FusedMovingAvgObsFakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        averaging_constant=0.1,
    ).to(x.device).train()
    return lambda: fq(x)


def _reference_step(x, running_min, running_max):
    """tquant's eager reference of one running-min/max training forward (what compile-ref compiles)."""
    from tquant.kernels import reference as R

    bmin, bmax = R.batch_minmax_reference(x, -1)
    new_min, new_max = R.update_range_reference(
        bmin, bmax, running_min, running_max, R.ESTIMATOR_RUNNING, 0.9, False
    )
    running_min.copy_(new_min)
    running_max.copy_(new_max)
    delta, zero_float, signed = R.qparams_from_range(new_min, new_max, 8, False)
    return R.fake_quant_reference(x, delta, zero_float, signed, 8, False, -1)


_compiled_reference = None


def setup_compile_ref(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch.compile`` of the eager reference (compiled here, on first use per size)."""
    global _compiled_reference
    if _compiled_reference is None:
        # The backward mode reuses one forward (retain_graph=True), which donated buffers forbid;
        # this process-wide setting only affects graphs compiled here.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _compiled_reference = torch.compile(_reference_step, dynamic=False)
    running_min = torch.tensor(float("inf"), device=x.device)
    running_max = torch.tensor(float("-inf"), device=x.device)
    t0 = time.perf_counter()
    try:
        y = _compiled_reference(x, running_min, running_max)
        torch.autograd.grad(y, x, torch.ones_like(y))
    except Exception as err:  # inductor needs a working C++ toolchain
        raise Skip(
            f"compile-ref: torch.compile failed on this machine ({type(err).__name__}: {err})"
        ) from err
    setup_compile_ref.last_compile_s = time.perf_counter() - t0
    return lambda: _compiled_reference(x, running_min, running_max)


setup_compile_ref.last_compile_s = 0.0


def setup_aihwkit_ref(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """aihwkit's quantization manager (asymmetric, running min/max, 8 bits), when installed."""
    try:
        from aihwkit.simulator.digital_low_precision.quantization_manager import QuantizationManager
        from aihwkit.simulator.digital_low_precision.quantizers import QMethods
        from aihwkit.simulator.digital_low_precision.range_estimators import RangeEstimators
    except ImportError as err:
        raise Skip(f"aihwkit-ref: aihwkit is not importable ({err})") from err
    qm = QuantizationManager(
        qmethod=QMethods.asymmetric_uniform, init=RangeEstimators.running_minmax, qparams={"n_bits": 8}
    ).to(x.device).train()
    return lambda: qm(x)


SETUP = {
    "tquant-torch": setup_tquant_torch,
    "tquant-triton": setup_tquant_triton,
    "torch-fused-op": setup_torch_fused_op,
    "torch.ao-module": setup_torch_ao_module,
    "compile-ref": setup_compile_ref,
    "aihwkit-ref": setup_aihwkit_ref,
}


def mode_fn(forward: Callable[[], torch.Tensor], x: torch.Tensor, grad: torch.Tensor, mode: str):
    """The timed callable of ``mode`` for a provider's training ``forward``."""
    if mode == "forward":
        return forward
    if mode == "backward":
        y = forward()
        return lambda: torch.autograd.grad(y, x, grad, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(forward(), x, grad)
    raise ValueError(f"unknown mode {mode!r}")


def host_us(fn: Callable[[], object], device: torch.device, calls: int = 200) -> float:
    """Microseconds of Python per call: ``calls`` calls back to back, no synchronisation inside."""
    fn()
    common.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    common.synchronize(device)
    return (t1 - t0) / calls * 1e6


def reps_for(numel: int, quick: bool) -> int:
    """Timed repetitions: more for small tensors, whose timings are noisier."""
    if quick:
        return 5
    if numel <= 2**12:
        return 2000
    if numel <= 2**18:
        return 200
    if numel <= 2**20:
        return 100
    if numel <= 2**22:
        return 40
    return 25


# -- the run ---------------------------------------------------------------------------------
def run_benchmark(
    sizes,
    modes,
    providers,
    *,
    quick: bool,
    reps: int | None,
    warmup: int | None,
    measure_memory: bool = True,
    device: torch.device | str = "cpu",
    log=print,
) -> tuple[list[dict], list[str]]:
    """Measure every (size, mode, provider); returns the rows and notes on skipped providers."""
    notes: list[str] = []
    rows: list[dict] = []
    skipped: set[str] = set()
    gen = torch.Generator().manual_seed(0)
    device = torch.device(device)
    for numel in sizes:
        x = (torch.randn(numel, generator=gen) * 2.0 + 0.5).to(device).requires_grad_(True)
        grad = torch.randn(numel, generator=gen).to(device)
        forwards = {}
        for name in providers:
            if name in skipped:
                continue
            if name == "compile-ref":
                log(f"  compile-ref: compiling for 2^{numel.bit_length() - 1} (torch.compile, tens of seconds)...")
            try:
                forwards[name] = SETUP[name](x)
            except Skip as err:
                skipped.add(name)
                notes.append(str(err))
                log(f"  skip: {err}")
        if "compile-ref" in forwards:
            log(
                f"  compile-ref: compiled for 2^{numel.bit_length() - 1} "
                f"in {setup_compile_ref.last_compile_s:.1f} s"
            )
        copy_gbps = common.copy_bandwidth_gbps(numel, device, reps=max(5, min(50, reps_for(numel, quick))))
        for mode in modes:
            fns = {name: mode_fn(fwd, x, grad, mode) for name, fwd in forwards.items()}
            samples = common.bench_interleaved(
                fns,
                reps=reps or reps_for(numel, quick),
                warmup=warmup if warmup is not None else (1 if quick else 3),
                device=device,
                max_seconds=None if quick else 45.0,
            )
            stats = {name: common.summarize(s) for name, s in samples.items()}
            base = stats.get(BASELINE, {}).get("median")
            for name, st in stats.items():
                peak = common.peak_memory_bytes(fns[name], device) if measure_memory else None
                bw = common.gbps(BYTES_PER_ELEMENT[mode] * numel, st["median"])
                rows.append(
                    {
                        "numel": numel,
                        "log2_numel": numel.bit_length() - 1,
                        "mode": mode,
                        "provider": name,
                        "median_ms": st["median"],
                        "p20_ms": st["p20"],
                        "p80_ms": st["p80"],
                        "n": st["n"],
                        "speedup_vs_torch_op": (base / st["median"]) if base else None,
                        "gbps": bw,
                        "pct_of_copy": 100.0 * bw / copy_gbps,
                        "copy_gbps": copy_gbps,
                        "peak_mem_mb": None if peak is None else peak / 2**20,
                        "host_us": host_us(fns[name], device) if device.type == "cuda" else st["median"] * 1e3,
                    }
                )
            line = "  ".join(f"{n}={s['median']:.3f}ms" for n, s in stats.items())
            log(f"2^{numel.bit_length() - 1:<2} {mode:<8} {line}")
    return rows, notes


# -- reporting -------------------------------------------------------------------------------
def write_markdown(path: Path, env: dict, rows: list[dict], history: list[dict], notes: list[str]) -> None:
    """The run's tables (one per mode) plus the acceptance figure of every run in the CSV."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    parts = [
        f"# Per-tensor 8-bit running-min/max fake quantizer, fp32 — {env['device']}",
        "",
        "Generated by `python -m tquant.benchmarks.bench_quantizer`. Medians of interleaved repetitions "
        f"(20th–80th percentile in the CSV); speed-up = `{BASELINE}` time / provider time (> 1 is faster); "
        "GB/s for the minimal traffic (forward 13, backward 9, full 22 bytes per element); "
        "peak = extra memory at the peak of one call (torch.profiler allocation events).",
        "",
        common.environment_markdown(env),
        "",
    ]
    largest = max(r["numel"] for r in rows)
    provider = "tquant-triton" if any(r["provider"] == "tquant-triton" for r in rows) else ACCEPTANCE_PROVIDER
    acc = [r for r in rows if r["numel"] == largest and r["mode"] == "forward" and r["provider"] == provider]
    if acc and acc[0]["speedup_vs_torch_op"] is not None:
        s = acc[0]["speedup_vs_torch_op"]
        verdict = "at least as fast as" if s >= 1.0 else "SLOWER than"
        parts += [
            f"**Acceptance (training forward, 2^{largest.bit_length() - 1} elements):** "
            f"`{provider}` "
            f"is {verdict} `{BASELINE}`: speed-up {s:.3f}.",
            "",
        ]
    parts += busy_verdicts(env, rows)
    host = {r["provider"]: r for r in rows if r["numel"] == HOST_SIZE and r["mode"] == "full"}
    tq = host.get("tquant-triton") or host.get(ACCEPTANCE_PROVIDER)
    if tq and BASELINE in host:
        ratio = tq["median_ms"] / host[BASELINE]["median_ms"]
        verdict = "within" if ratio <= HOST_RATIO else "OVER"
        parts += [
            f"**Host overhead (2^10 elements, module-level training forward + backward):** `{tq['provider']}` "
            f"takes {ratio:.2f}x the time of `{BASELINE}` + its backward: {verdict} the {HOST_RATIO}x budget "
            f"({tq['median_ms'] * 1e3:.1f} us vs {host[BASELINE]['median_ms'] * 1e3:.1f} us; host "
            f"{tq['host_us']:.1f} us per call).",
            "",
        ]
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        table = []
        for numel in sorted({r["numel"] for r in mrows}):
            entry = {"size": f"2^{numel.bit_length() - 1}"}
            for r in mrows:
                if r["numel"] == numel:
                    entry[r["provider"]] = r["median_ms"]
                    entry[r["provider"] + "/x"] = r["speedup_vs_torch_op"]
                    entry[r["provider"] + "/gbps"] = r["gbps"]
                    entry[r["provider"] + "/mem"] = r["peak_mem_mb"]
                    entry[r["provider"] + "/host"] = r["host_us"]
                    entry["copy"] = r["copy_gbps"]
            table.append(entry)
        cols = [("size", "size", "")]
        for p in providers:
            cols += [
                (p, f"{p} ms", ".3f"),
                (p + "/x", "speed-up", ".2f"),
                (p + "/gbps", "GB/s", ".1f"),
                (p + "/mem", "peak MB", ".1f"),
                (p + "/host", "host us", ".1f"),
            ]
        cols.append(("copy", "copy GB/s", ".1f"))
        parts += [f"## {mode}", "", common.markdown_table(table, cols), ""]
    runs = {}
    for r in history:
        if (
            r.get("mode") == "forward"
            and r.get("provider") == ACCEPTANCE_PROVIDER
            and r.get("numel") == str(largest)
        ):
            runs[r["run_id"]] = r
    if runs:
        parts += [
            "## Acceptance figure in every run recorded in quantizer.csv "
            f"(forward, 2^{largest.bit_length() - 1})",
            "",
            common.markdown_table(
                list(runs.values()),
                [
                    ("run_id", "run", ""),
                    ("median_ms", f"{ACCEPTANCE_PROVIDER} ms", ".3f"),
                    ("speedup_vs_torch_op", f"speed-up vs {BASELINE}", ".3f"),
                ],
            ),
            "",
        ]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")


def busy_verdicts(env: dict, rows: list[dict]) -> list[str]:
    """With ``--busy``: tquant's training forward against torch's op at :data:`BUSY_SIZES` (markdown lines)."""
    if not env.get("competing_processes"):
        return []
    forward = {(r["numel"], r["provider"]): r["median_ms"] for r in rows if r["mode"] == "forward"}
    lines = []
    for numel in BUSY_SIZES:
        ours, base = forward.get((numel, ACCEPTANCE_PROVIDER)), forward.get((numel, BASELINE))
        if ours and base:
            verdict = "within" if ours / base <= BUSY_RATIO else "OVER"
            lines.append(f"- 2^{numel.bit_length() - 1}: `{ACCEPTANCE_PROVIDER}` {ours:.1f} ms, `{BASELINE}` "
                         f"{base:.1f} ms: {ours / base:.2f}x, {verdict} the {BUSY_RATIO}x budget")
    head = (f"**Busy machine ({env['competing_processes']} competing busy process(es), training forward):** "
            f"`{ACCEPTANCE_PROVIDER}` within {BUSY_RATIO}x of `{BASELINE}` at 2^20-2^24")
    return [head, "", *lines, ""] if lines else []


def plot(path: Path, env: dict, rows: list[dict]) -> bool:
    """Speed-up vs the torch op and GB/s against size, one column per mode. False without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return False
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 7.5), squeeze=False)
    for j, mode in enumerate(modes):
        for p in PROVIDERS:
            pr = sorted(
                (r for r in rows if r["mode"] == mode and r["provider"] == p), key=lambda r: r["numel"]
            )
            if not pr:
                continue
            xs = [r["log2_numel"] for r in pr]
            axes[0][j].plot(xs, [r["speedup_vs_torch_op"] for r in pr], marker="o", label=p)
            axes[1][j].plot(xs, [r["gbps"] for r in pr], marker="o", label=p)
        copy = sorted({(r["log2_numel"], r["copy_gbps"]) for r in rows if r["mode"] == mode})
        axes[1][j].plot([c[0] for c in copy], [c[1] for c in copy], "k--", label="copy (8 B/elt)")
        axes[0][j].axhline(1.0, color="gray", lw=0.8)
        axes[0][j].set_title(f"{mode}: speed-up vs {BASELINE}")
        axes[1][j].set_title(f"{mode}: GB/s (minimal traffic)")
        axes[1][j].set_yscale("log")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("log2(elements)")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.suptitle(f"fp32 per-tensor running-min/max 8-bit fake quant — {env['device']}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Command-line options (shared with ``tquant bench quantizer``)."""
    parser = parser or argparse.ArgumentParser(prog="python -m tquant.benchmarks.bench_quantizer",
                                               description=__doc__.splitlines()[0])
    return options.quantizer(parser)


def main(args: argparse.Namespace) -> int:
    """Run, write ``quantizer.{csv,json,md,png}`` into the results folder, print where."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_quantizer: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    out = common.resolve_out_dir(args, device)
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        from . import quantizer_host

        return quantizer_host.main(args, device, out)
    sizes = [2**s for s in args.sizes] if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    providers = list(args.providers or PROVIDERS)
    if device.type == "cpu" and "tquant-triton" in providers:
        providers.remove("tquant-triton")  # the interpreter is not a speed to report
    notes = []
    if (args.quick or args.no_compile) and "compile-ref" in providers:
        providers.remove("compile-ref")
        notes.append("compile-ref: left out (--quick / --no-compile)")
    env = common.environment(device)
    print(
        f"bench_quantizer on {env['device']} ({env['threads']} threads, load {env['loadavg_1m']}), "
        f"torch {env['torch']}"
    )
    stem = "quantizer-busy" if args.busy else "quantizer"
    if args.busy:
        notes.append(f"--busy: {args.busy} competing busy process(es) (a Python loop each) ran during the timings")
    with common.competing_load(args.busy, env):
        rows, run_notes = run_benchmark(
            sizes,
            args.modes,
            providers,
            quick=args.quick,
            reps=args.reps,
            warmup=args.warmup,
            measure_memory=not args.no_memory,
            device=device,
        )
    notes += run_notes
    history = common.record_run(out, stem, env, rows, CSV_FIELDS, notes)
    write_markdown(out / f"{stem}.md", env, rows, history, notes)
    if not args.no_plot and not plot(out / f"{stem}.png", env, rows):
        print("matplotlib not installed: no plot")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
