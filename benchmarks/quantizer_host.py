"""Host cost of one quantizer call per lane: ``tquant bench quantizer --host``.

At 2^10 fp32 elements a quantizer's device work is a few microseconds, so a QAT step is host-bound unless
each call is a handful of Python lines (DESIGN §4). This measures what tquant's Python and ATen add per
call, lane by lane, against the same harness's ``y = x * 1.0`` and torch's fused op:

- ``tquant triton``: on a CPU, the Triton lane with its launches stubbed (``tquant.kernels.triton_offline``:
  a compiled-Triton process, CPU tensors standing in for CUDA ones, nothing runs): everything the host pays
  but Triton's C launcher and the driver. On a CUDA device it runs for real;
- the CPU lanes as they run here (``torch``, and the small-tensor lane that ``auto`` picks), compute included;
- ``x * 1.0`` (the baseline that is subtracted) and ``torch.fused_moving_avg_obs_fake_quant``.

The quantizer is a ``QuantizationManager`` (asymmetric, 8 bits, running min/max) in training mode. Each
provider is timed as ``forward`` (the module call on an ``x`` that requires grad: a QAT training forward with
range estimation) and ``forward+backward`` (``torch.autograd.grad`` of it): microseconds per call, the
median of rounds of back-to-back calls with the garbage collector paused, every provider in every round.
On CUDA no call waits for the device: the figure is the host's time. Launches per call are counted on
the Triton lane. Results go to ``quantizer_host.{csv,json,md}``.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import common

NUMEL = 2**10
BUDGET_US = {"forward": 10.0, "forward+backward": 20.0}
"""Budget over the baseline per call, CPU, launches stubbed (DESIGN §4)."""
MODES = ("forward", "forward+backward")
BASELINE = "x * 1.0"
TRITON = "tquant triton"
CSV_FIELDS = ["run_id", "device", "torch", "numel", "provider", "mode", "us_per_call", "over_baseline_us",
              "launches_per_call"]


def _manager(device: torch.device):
    import tquant

    return tquant.QuantizationManager(tquant.QMethods.asymmetric_uniform, tquant.RangeEstimators.running_minmax,
                                      qparams={"n_bits": 8}).to(device).train()


def _fused_op(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    dev = x.device
    on = torch.ones(1, dtype=torch.long, device=dev)
    state = [torch.tensor(float("inf"), device=dev), torch.tensor(float("-inf"), device=dev),
             torch.ones(1, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)]
    return lambda: torch.fused_moving_avg_obs_fake_quant(x, on, on, *state, 0.1, 0, 255, 0, False, False)


def _on_lane(qm, x: torch.Tensor, lane: str) -> Callable[[], torch.Tensor]:
    """The manager's training forward on ``lane`` (``set_backend`` is a global switch: cheap to call)."""
    from tquant.kernels import set_backend

    def forward():
        set_backend(lane)
        return qm(x)

    return forward


def _timed(fns: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median microseconds per call of each function; every round runs every function, in rotated order."""
    for fn in fns.values():
        for _ in range(max(calls // 10, 10)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = list(fns.items())
            for name, fn in order[r % len(order):] + order[: r % len(order)]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        if enabled:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


@contextlib.contextmanager
def _counting_launches():
    """Counts Triton launches: bound launchers' calls and unbound ``kernel[grid](...)`` launches."""
    from triton.runtime.jit import JITFunction

    from tquant.kernels._triton_launch import Launcher

    count = [0]
    call, run = Launcher.__call__, JITFunction.run

    def counted_call(self, *args):
        count[0] += 1
        return call(self, *args)

    def counted_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            count[0] += 1
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    Launcher.__call__, JITFunction.run = counted_call, counted_run
    try:
        yield count
    finally:
        Launcher.__call__, JITFunction.run = call, run


def _triton_session(device: torch.device):
    """``(context, note)``: where the Triton lane can be measured here (offline stubs on a CPU)."""
    from tquant.kernels._triton import HAS_TRITON, INTERPRET

    if not HAS_TRITON:
        return None, "tquant triton: Triton is not installed here"
    if device.type == "cuda":
        return contextlib.nullcontext(), None
    if INTERPRET:
        return None, "tquant triton: this process runs Triton's interpreter (TRITON_INTERPRET=1); run without it"
    from tquant.kernels import triton_offline

    return triton_offline.offline(), None


def measure(device: torch.device, calls: int = 2000, rounds: int = 7, log=print) -> tuple[list[dict], list[str]]:
    """Rows ``{provider, mode, us_per_call, over_baseline_us, launches_per_call}`` and notes."""
    from tquant.kernels import get_backend, set_backend

    notes: list[str] = []
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(NUMEL, generator=gen) * 2 + 0.5).to(device).requires_grad_(True)
    g = torch.randn(NUMEL, generator=gen).to(device)
    forwards: dict[str, Callable[[], torch.Tensor]] = {BASELINE: lambda: x * 1.0, "torch fused op": _fused_op(x)}
    previous = get_backend()
    for lane in ("torch", "auto") if device.type == "cpu" else ():
        qm = _manager(device)
        forwards[f"tquant {lane}"] = _on_lane(qm, x, lane)
    session, note = _triton_session(device)
    if note:
        notes.append(note)
    timings: dict[tuple[str, str], float] = {}
    launches: dict[str, float] = {}
    with session or contextlib.nullcontext():
        if session is not None:
            forwards[TRITON] = _on_lane(_manager(device), x, "triton" if device.type == "cpu" else "auto")
        full = {name: (lambda f=f: torch.autograd.grad(f(), x, g)) for name, f in forwards.items()}
        try:
            for mode, fns in (("forward", forwards), ("forward+backward", full)):
                for name, us in _timed(fns, calls, rounds).items():
                    timings[(name, mode)] = us
                if session is not None:
                    with _counting_launches() as count:
                        for _ in range(10):
                            fns[TRITON]()
                    launches[mode] = count[0] / 10
        finally:
            set_backend(previous)
    rows = []
    for (name, mode), us in timings.items():
        rows.append({"numel": NUMEL, "provider": name, "mode": mode, "us_per_call": us,
                     "over_baseline_us": us - timings[(BASELINE, mode)],
                     "launches_per_call": launches.get(mode) if name == TRITON else None})
    for mode in MODES:
        line = "  ".join(f"{r['provider']}={r['us_per_call']:.1f}" for r in rows if r["mode"] == mode)
        log(f"{mode:<17} us/call: {line}")
    return rows, notes


def write_markdown(path: Path, env: dict, rows: list[dict], notes: list[str], stubbed: bool) -> None:
    """The table (µs per call, over the baseline, launches) and the verdict against the budget."""
    table = []
    for name in dict.fromkeys(r["provider"] for r in rows):
        entry = {"provider": name}
        for r in rows:
            if r["provider"] == name:
                key = "fwd" if r["mode"] == "forward" else "full"
                entry[key], entry[key + "_over"] = r["us_per_call"], r["over_baseline_us"]
                if r["launches_per_call"] is not None:
                    entry[key + "_launches"] = r["launches_per_call"]
        table.append(entry)
    cols = [("provider", "provider", ""), ("fwd", "forward us", ".1f"), ("fwd_over", "over x*1.0", ".1f"),
            ("fwd_launches", "launches", "g"), ("full", "fwd+bwd us", ".1f"), ("full_over", "over x*1.0", ".1f"),
            ("full_launches", "launches", "g")]
    parts = [
        f"# Host cost per quantizer call, 2^10 fp32 elements — {env['device']}",
        "",
        "Generated by `tquant bench quantizer --host`. A `QuantizationManager` (asymmetric, 8 bits, running "
        "min/max) in training mode: `forward` is the module call on an `x` that requires grad, `fwd+bwd` "
        "`torch.autograd.grad` of it; microseconds per call (median of rounds of back-to-back calls, every "
        "provider in every round), and the same minus the `x * 1.0` baseline."
        + (" The Triton lane runs with its launches stubbed (`tquant.kernels.triton_offline`): what the host "
           "pays apart from Triton's C launcher and the driver." if stubbed else ""),
        "",
        common.environment_markdown(env),
        "",
        common.markdown_table(table, cols),
        "",
    ]
    tri = {r["mode"]: r for r in rows if r["provider"] == TRITON}
    if stubbed and tri:
        verdicts = [f"{mode} {tri[mode]['over_baseline_us']:.1f} us (budget {BUDGET_US[mode]:g})"
                    for mode in MODES if mode in tri]
        ok = all(tri[m]["over_baseline_us"] <= BUDGET_US[m] for m in tri)
        parts += [f"**Triton lane over the baseline, launches stubbed:** {'; '.join(verdicts)}: "
                  f"{'within' if ok else 'OVER'} budget.", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")


def main(args, device: torch.device, out: Path) -> int:
    """``tquant bench quantizer --host``: measure, write ``quantizer_host.{csv,json,md}``, print where."""
    env = common.environment(device)
    print(f"bench quantizer --host on {env['device']} (load {env['loadavg_1m']}), torch {env['torch']}")
    calls = 200 if args.quick else 2000
    rows, notes = measure(device, calls=calls, rounds=3 if args.quick else 7)
    stubbed = device.type == "cpu" and any(r["provider"] == TRITON for r in rows)
    common.record_run(out, "quantizer_host", env, rows, CSV_FIELDS, notes)
    write_markdown(out / "quantizer_host.md", env, rows, notes, stubbed)
    print(f"results in {out}")
    return 0
