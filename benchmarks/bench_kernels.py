"""Microbenchmark of the quantizer kernels: tquant (Triton, torch path) vs torch.ao vs torch.compile.

Run: ``python -m tquant.benchmarks.bench_kernels`` (GPU: sizes 2^10..2^26) or, as a CPU smoke
run, ``python -m tquant.benchmarks.bench_kernels --quick`` (tiny sizes, results to a temp folder).

Modes (8-bit, asymmetric, running min/max with momentum 0.9, the QAT hot path):

- ``train``: range update + fake quant with the saved mask (tquant: ``update_range`` then
  ``fake_quant_forward(with_mask=True)``; torch.ao: ``fused_moving_avg_obs_fake_quant`` per
  tensor, ``aminmax`` + qparams + ``fake_quantize_per_channel_affine`` per channel);
- ``fixed``: fake quant with a fixed range (eval, ``fix_ranges``);
- ``backward``: the input gradient of a fake quant (``autograd.grad`` with a retained graph).

Providers: ``tquant-triton`` (CUDA, or the Triton interpreter on the CPU when
``TRITON_INTERPRET=1``: correct but not a speed measurement), ``tquant-torch``, ``torch-ao``,
``torch-compile`` (``torch.compile`` of the eager reference; forward modes only). torch.ao's ops
reject bf16 input: for bf16 its provider converts to fp32 and back, as a bf16 user has to.

Timing: ``triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])`` on CUDA (cold L2 between
calls); on the CPU the interleaved ``perf_counter`` samples of :mod:`tquant.benchmarks.common`.
Bandwidth: the op's minimal traffic (``train``: 2 reads + 1 write + a 1-byte mask per
element; ``fixed``: 1 read + 1 write; ``backward``: grad and mask read, grad written) over the
median time, and its share of the device's measured copy bandwidth.

Writes ``kernels.md``, ``kernels.csv`` (appended), ``kernels.json`` and ``kernels.png`` under
``benchmarks/results/<device>/`` (``--out`` to change; ``--quick`` writes to a temporary folder
unless ``--out`` is given, so smoke runs never land among the committed results).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .. import kernels as K
from ..kernels import reference as R
from ..kernels._triton import HAS_TRITON, INTERPRET, triton
from . import common

MODES = ("train", "fixed", "backward")
GRANULARITIES = ("tensor", "channel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("tquant-triton", "tquant-torch", "torch-ao", "torch-compile")
N_BITS = 8
MOMENTUM = 0.9
CSV_FIELDS = (
    "run_id", "device", "torch", "triton", "mode", "granularity", "dtype", "log2_numel", "numel",
    "provider", "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "pct_copy", "speedup_vs_torch_ao", "note",
)


# -- problem ------------------------------------------------------------------------------------
def make_problem(log2_numel: int, granularity: str, dtype: torch.dtype, device: str) -> dict:
    """Input, upstream gradient and an initialised quantizer state for one benchmark point."""
    numel = 1 << log2_numel
    if granularity == "tensor":
        shape, axis, channels = (numel,), -1, None
    else:
        channels = 1 << min(9, max(log2_numel - 2, 0))  # [C, numel / C], C <= 512 (weight-like)
        shape, axis = (channels, numel // channels), 0
    x = torch.randn(shape, device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    pshape = () if axis < 0 else (channels,)
    state = [torch.empty(pshape, device=device) for _ in range(4)] + [torch.empty((), dtype=torch.bool,
                                                                                   device=device)]
    with K.use_backend("torch"):
        K.update_range(x, *state, N_BITS, False, axis, K.ESTIMATOR_RUNNING, MOMENTUM, True)
    return {"x": x, "grad": grad, "axis": axis, "state": state, "numel": numel, "dtype": dtype}


def min_bytes(mode: str, numel: int, dtype: torch.dtype) -> int:
    """The op's minimal memory traffic (bytes) for ``numel`` elements."""
    b = torch.finfo(dtype).bits // 8
    if mode == "train":
        return numel * (3 * b + 1)  # read for the range, read + write for the fake quant, 1-byte mask
    if mode == "fixed":
        return numel * 2 * b
    return numel * (2 * b + 1)  # read grad and mask, write grad_x


# -- providers ----------------------------------------------------------------------------------
def tquant_fn(p: dict, mode: str, backend: str) -> Callable[[], object]:
    x, axis, (rmin, rmax, delta, zf, signed) = p["x"], p["axis"], p["state"]
    if mode == "train":
        def fn():
            with K.use_backend(backend):
                K.update_range(x, rmin, rmax, delta, zf, signed, N_BITS, False, axis, K.ESTIMATOR_RUNNING,
                               MOMENTUM, False)
                return K.fake_quant_forward(x, delta, zf, signed, N_BITS, False, axis, True)
        return fn
    if mode == "fixed":
        def fn():
            with K.use_backend(backend):
                return K.fake_quant_forward(x, delta, zf, signed, N_BITS, False, axis, False)
        return fn
    xr = x.detach().clone().requires_grad_(True)
    with K.use_backend(backend):
        y = K.fake_quant(xr, delta, zf, signed, N_BITS, False, axis)
    grad = p["grad"]
    return lambda: torch.autograd.grad(y, xr, grad, retain_graph=True)


def _ao_qparams(bmin, bmax):
    """torch.ao's affine qparams (``quint8`` style) from a min/max, on the device."""
    bmin = torch.clamp(bmin, max=0.0)
    bmax = torch.clamp(bmax, min=0.0)
    scale = torch.clamp((bmax - bmin) / float(2**N_BITS - 1), min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(-torch.round(bmin / scale), 0, 2**N_BITS - 1).to(torch.int32)
    return scale, zp


def torch_ao_fn(p: dict, mode: str) -> tuple[Callable[[], object], str]:
    """torch.ao's fused ops; bf16/fp16 go through an fp32 copy (the ops expect float)."""
    x, axis = p["x"], p["axis"]
    note = "" if x.dtype == torch.float32 else "fp32 copy"
    dev = x.device
    qmax = 2**N_BITS - 1
    if axis < 0:
        on = torch.ones(1, dtype=torch.long, device=dev)
        rmin, rmax = torch.aminmax(x.float())
        rmin, rmax = rmin.reshape(1).clone(), rmax.reshape(1).clone()
        scale, zp = _ao_qparams(rmin, rmax)

        def fwd(xin, observe: bool):
            xf = xin if xin.dtype == torch.float32 else xin.float()
            if observe:
                y = torch.fused_moving_avg_obs_fake_quant(
                    xf, on, on, rmin, rmax, scale, zp, 1.0 - MOMENTUM, 0, qmax, 0, False, False
                )
            else:
                y = torch.fake_quantize_per_tensor_affine(xf, scale, zp, 0, qmax)
            return y if xin.dtype == torch.float32 else y.to(xin.dtype)
    else:
        def fwd(xin, observe: bool):
            xf = xin if xin.dtype == torch.float32 else xin.float()
            bmin, bmax = torch.aminmax(xf.detach(), dim=1)
            scale, zp = _ao_qparams(bmin, bmax)
            y = torch.fake_quantize_per_channel_affine(xf, scale, zp, 0, 0, qmax)
            return y if xin.dtype == torch.float32 else y.to(xin.dtype)

    if mode == "train":
        # the training forward saves a mask for backward: run it under autograd like a QAT layer
        xr = x.detach().clone().requires_grad_(True)
        return (lambda: fwd(xr, True)), note
    if mode == "fixed":
        return (lambda: fwd(x, False)), note
    xr = x.detach().clone().requires_grad_(True)
    y = fwd(xr, False)
    grad = p["grad"]
    return (lambda: torch.autograd.grad(y, xr, grad, retain_graph=True)), note


def _reference_train(x, rmin, rmax, axis: int):
    bmin, bmax = R.batch_minmax_reference(x, axis)
    new_min, new_max = R.update_range_reference(bmin, bmax, rmin, rmax, K.ESTIMATOR_RUNNING, MOMENTUM, False)
    delta, zf, signed = R.qparams_from_range(new_min, new_max, N_BITS, False)
    return R.fake_quant_reference(x, delta, zf, signed, N_BITS, False, axis), new_min, new_max


def _reference_fixed(x, delta, zf, signed, axis: int):
    return R.fake_quant_reference(x, delta, zf, signed, N_BITS, False, axis)


_COMPILED: dict[str, Callable] = {}


def compile_fn(p: dict, mode: str) -> Callable[[], object] | None:
    """``torch.compile`` of the eager reference (forward modes; no saved mask)."""
    if mode == "backward":
        return None
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_reference_train if mode == "train" else _reference_fixed)
    f = _COMPILED[mode]
    x, axis, (rmin, rmax, delta, zf, signed) = p["x"], p["axis"], p["state"]

    def fn():
        with torch.no_grad():
            if mode == "train":
                return f(x, rmin, rmax, axis)
            return f(x, delta, zf, signed, axis)
    return fn


# -- timing -------------------------------------------------------------------------------------
def measure(fns: dict[str, Callable[[], object]], device: str, reps: int, warmup: int) -> dict[str, dict]:
    """``provider -> {"median", "p20", "p80"}`` in milliseconds."""
    if device == "cuda":
        out = {}
        for name, fn in fns.items():
            for _ in range(max(warmup, 1)):
                fn()
            med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            out[name] = {"median": med, "p20": p20, "p80": p80}
        return out
    samples = common.bench_interleaved(fns, reps=reps, warmup=warmup, device=device, max_seconds=5.0)
    return {name: common.summarize(s) for name, s in samples.items()}


def parse_sizes(text: str) -> list[int]:
    """``"10,12,14"`` or ``"10-26"`` or ``"10-26:2"`` (log2 of the element count)."""
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            span, _, step = part.partition(":")
            lo, hi = (int(v) for v in span.split("-"))
            sizes.extend(range(lo, hi + 1, int(step) if step else 1))
        elif part:
            sizes.append(int(part))
    return sizes


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    env = common.environment(device)
    run_id = common.new_run_id(env)
    providers = [p for p in args.providers.split(",") if p]
    if "tquant-triton" in providers and not (HAS_TRITON and (device == "cuda" or INTERPRET)):
        print("tquant-triton: skipped (needs CUDA, or TRITON_INTERPRET=1 on the CPU)", file=sys.stderr)
        providers.remove("tquant-triton")
    interp_note = "Triton interpreter (not a speed measurement)" if device == "cpu" else ""
    copy_gbps = common.copy_bandwidth_gbps(1 << (24 if device == "cuda" else 22), device)
    print(f"# {env['device']}: copy bandwidth {copy_gbps:.1f} GB/s", file=sys.stderr)
    rows: list[dict] = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for gran in args.granularity.split(","):
            for mode in args.modes.split(","):
                for log2n in args.sizes:
                    p = make_problem(log2n, gran, dtype, device)
                    fns: dict[str, Callable[[], object]] = {}
                    notes: dict[str, str] = {}
                    for prov in providers:
                        if prov == "tquant-triton":
                            fns[prov] = tquant_fn(p, mode, "triton")
                            notes[prov] = interp_note
                        elif prov == "tquant-torch":
                            fns[prov] = tquant_fn(p, mode, "torch")
                        elif prov == "torch-ao":
                            fns[prov], notes[prov] = torch_ao_fn(p, mode)
                        elif prov == "torch-compile":
                            fn = compile_fn(p, mode)
                            if fn is not None:
                                fns[prov] = fn
                        else:
                            raise SystemExit(f"unknown provider {prov!r}; choose from {', '.join(PROVIDERS)}")
                    timings = measure(fns, device, args.reps, args.warmup)
                    nbytes = min_bytes(mode, p["numel"], dtype)
                    ao = timings.get("torch-ao", {}).get("median")
                    for prov, t in timings.items():
                        bw = common.gbps(nbytes, t["median"])
                        rows.append({
                            "run_id": run_id, "device": env["device"], "torch": env["torch"],
                            "triton": env["triton"], "mode": mode, "granularity": gran, "dtype": dtype_name,
                            "log2_numel": log2n, "numel": p["numel"], "provider": prov,
                            "median_ms": t["median"], "p20_ms": t["p20"], "p80_ms": t["p80"], "bytes": nbytes,
                            "gbps": bw, "pct_copy": 100.0 * bw / copy_gbps,
                            "speedup_vs_torch_ao": (ao / t["median"]) if ao else float("nan"),
                            "note": notes.get(prov, ""),
                        })
                        print(f"{mode:8s} {gran:7s} {dtype_name} 2^{log2n:<2d} {prov:14s} "
                              f"{t['median']:9.4f} ms {bw:8.1f} GB/s", file=sys.stderr)
    write_results(args, env, rows, copy_gbps)
    return rows


# -- output -------------------------------------------------------------------------------------
def write_results(args: argparse.Namespace, env: dict, rows: list[dict], copy_gbps: float) -> Path:
    out = common.resolve_out_dir(args, args.device)
    out.mkdir(parents=True, exist_ok=True)
    common.append_csv(out / "kernels.csv", rows, CSV_FIELDS)
    notes = [f"copy bandwidth: {copy_gbps:.1f} GB/s", "8-bit asymmetric, running min/max (m=0.9)"]
    common.write_json(out / "kernels.json", env, rows, notes)
    columns = [
        ("mode", "mode", ""), ("granularity", "granularity", ""), ("dtype", "dtype", ""),
        ("log2_numel", "log2 n", ""), ("provider", "provider", ""), ("median_ms", "median ms", ".4g"),
        ("p20_ms", "p20 ms", ".4g"), ("p80_ms", "p80 ms", ".4g"), ("gbps", "GB/s", ".1f"),
        ("pct_copy", "% copy", ".0f"), ("speedup_vs_torch_ao", "x torch.ao", ".2f"), ("note", "note", ""),
    ]
    text = [f"# Quantizer kernel microbenchmark ({env['device']})", "", common.environment_markdown(env),
            f"- copy bandwidth: {copy_gbps:.1f} GB/s", "",
            "Minimal traffic per element: train 3 x dtype bytes + 1 (mask), fixed 2 x, backward 2 x + 1.",
            "", common.markdown_table(rows, columns), ""]
    (out / "kernels.md").write_text("\n".join(text), encoding="utf-8")
    if not args.no_plot:
        plot(rows, out / "kernels.png", env)
    print(f"results: {out}", file=sys.stderr)
    return out


def plot(rows: list[dict], path: Path, env: dict) -> None:
    plt = common.pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    panels = sorted({(r["mode"], r["granularity"], r["dtype"]) for r in rows})
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (mode, gran, dtype) in zip(axes.flat, panels):
        for prov in PROVIDERS:
            key = (mode, gran, dtype, prov)
            pts = sorted((r["log2_numel"], r["gbps"]) for r in rows
                         if (r["mode"], r["granularity"], r["dtype"], r["provider"]) == key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_title(f"{mode} / per {gran} / {dtype}")
        ax.set_xlabel("log2(elements)")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"tquant quantizer kernels — {env['device']} — torch {env['torch']}, triton {env['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="log2 element counts: '10-26:2', '10,16,20' (default: 10-26:2 GPU, 10-18:4 CPU)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--granularity", default="tensor,channel", help="tensor, channel")
    parser.add_argument("--modes", default=",".join(MODES), help="train, fixed, backward")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=", ".join(PROVIDERS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes is None:
        if args.quick:
            args.sizes = [10, 12]
        else:
            args.sizes = parse_sizes("10-26:2" if args.device == "cuda" else "10-18:4")
    if args.reps is None:
        args.reps = 5 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.quick and args.device == "cpu" and "torch-compile" in args.providers and "--providers" not in (
            argv if argv is not None else sys.argv):
        # compiling the reference on the CPU takes minutes; ask for it explicitly in a smoke run
        args.providers = ",".join(p for p in args.providers.split(",") if p != "torch-compile")
    return run(args)


if __name__ == "__main__":
    main()
