"""Compile, for CUDA GPUs that are not here, every Triton kernel variant that tquant's lanes launch.

    python tests/cuda_compile.py --arch 80 --arch 90 [--workers N] [--json report.json]

Runs in a process of its own, with compiled (not interpreted) Triton: ``TRITON_INTERPRET`` must be unset.
Inside :func:`tquant.kernels.triton_offline.offline` it drives the quantizer lanes with
``TQUANT_BACKEND=triton`` over a matrix of inputs (:func:`drive`: layouts, dtypes, symmetric and
asymmetric, per tensor and per channel, every range estimator, training / fixed / learned ranges,
synchronised ranges and the functional ops), records every launch, binds each as Triton would for
``sm_<arch>`` and compiles each distinct variant. Prints one line per failure and a summary; exit status
1 when a variant fails to compile or a Triton kernel of ``tquant.kernels`` was never launched.
``tests/test_cuda_compile.py`` runs it with the installed Triton and with the GPU machine's (3.6).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

import torch

import tquant
import tquant.kernels as K
from tquant.kernels import triton_offline
from tquant.kernels._triton import tl, triton

from helpers import stand_in_ranges

# (shape, how the view is made) of the inputs: 0-dim, 1-D, odd, large, a linear's and a conv's weight,
# few wide rows, many narrow rows, transposed, strided, channels-last, permuted, broadcast and empty
# tensors. Every layout runs the running-min/max QAT steps in fp32; the learned and synchronised
# ranges, the other estimators, the functional ops and fp16/bf16 run on SUBSET (1-D, an odd channel
# count, a transposed view); the search estimators on SEARCH_LAYOUTS. Not every dimension is crossed
# with every other (see PAIRS): each value of each is, within CI's minutes.
LAYOUTS = [
    ((), "plain"), ((7,), "plain"), ((1 << 16,), "plain"), ((3, 5), "plain"), ((128, 64), "plain"),
    ((7, 300001), "plain"), ((50000, 70), "plain"), ((256, 64, 3, 3), "plain"), ((64, 128), "transpose"),
    ((48, 40), "strided"), ((8, 16, 7, 7), "channels_last"), ((4, 5, 6), "permute"), ((32, 64), "broadcast"),
    ((0, 8), "plain"),
]
SUBSET = [((1000,), "plain"), ((33, 17, 5), "plain"), ((64, 128), "transpose")]
DTYPES = [torch.float16, torch.bfloat16]
OTHER_FUSED = [tquant.RangeEstimators.current_minmax, tquant.RangeEstimators.allminmax]
SEARCH = [
    (tquant.RangeEstimators.MSE, {"opt_method": tquant.OptMethod.golden_section}),
    (tquant.RangeEstimators.MSE, {"opt_method": tquant.OptMethod.grid, "num_candidates": 20}),
    (tquant.RangeEstimators.cross_entropy, {"opt_method": tquant.OptMethod.grid, "num_candidates": 20}),
    (tquant.RangeEstimators.current_minmax, {"percentile": 1.0}),
]
SEARCH_LAYOUTS = [((1000,), "plain"), ((33, 17, 5), "plain")]
# Group-wise weights (shape, group size, dtypes, symmetries): a Linear's with a shorter last group in fp32 and
# bf16, and a conv's (groups of whole input channels with their kernels). FP8: both formats per tensor and per
# channel on SUBSET in fp32, E4M3 in bf16 too (the format is constexpr: each compiles apart).
GROUP_CASES = [((96, 300), 128, [torch.float32, torch.bfloat16], (True, False)),
               ((16, 8, 3, 3), 2, [torch.float32], (True,))]
FP8_CASES = [("fp8_e4m3", [torch.float32, torch.bfloat16]), ("fp8_e5m2", [torch.float32])]
FP8_PAIRS = [(False, True), (True, True)]  # (per channel, symmetric): FP8 is symmetric


def make_input(shape, view, dtype) -> torch.Tensor:
    if view == "transpose":
        return torch.randn(shape[::-1], dtype=dtype).t()
    if view == "strided":
        return torch.randn(shape[0], 2 * shape[1], dtype=dtype)[:, ::2]
    if view == "channels_last":
        return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    if view == "permute":
        return torch.randn(shape[::-1], dtype=dtype).permute(2, 0, 1)
    if view == "broadcast":
        return torch.randn(1, shape[1], dtype=dtype).expand(shape)
    return torch.randn(shape, dtype=dtype)


def manager(symmetric: bool, per_channel: bool, estimator, params=None, n_bits: int = 8, channels=None, **extra):
    """``extra``: more quantizer arguments (``fmt``, ``group_size`` with ``weight_shape``)."""
    qmethod = tquant.QMethods.symmetric_uniform if symmetric else tquant.QMethods.asymmetric_uniform
    return tquant.QuantizationManager(qmethod, estimator, per_channel=per_channel,
                                      qparams={"n_bits": n_bits, **extra}, init_params=params,
                                      n_channels=channels).train()


def qat_steps(qm, x: torch.Tensor, learned: bool = True, sync: bool = False) -> None:
    """Training forward + backward, a training forward without grad, eval, then (optionally) synchronised
    ranges and a learned-ranges forward + backward."""
    xg = x.detach().requires_grad_(True)
    qm(xg).float().sum().backward()
    qm(x)
    stand_in_ranges(qm)  # so that eval and learned ranges may follow
    if sync:
        qm.sync_ranges = True
        qm(x)
        qm.sync_ranges = False
    qm.eval()
    qm(x)
    qm.train()
    if learned:
        qm.learn_ranges()
        xg = x.detach().requires_grad_(True)
        qm(xg).float().sum().backward()


def _cases(layouts, dtypes, pairs=None):
    """``(x, per_channel, channels, symmetric)`` over layouts x dtypes x (granularity, symmetry) ``pairs``
    (default: all four; per-channel pairs are left out for 0-dim inputs)."""
    pairs = pairs or [(pc, sym) for pc in (False, True) for sym in (True, False)]
    for shape, view in layouts:
        for dtype in dtypes:
            x = make_input(shape, view, dtype)
            for per_channel, symmetric in pairs:
                if per_channel and not x.dim():
                    continue
                yield x, per_channel, x.shape[0] if per_channel else None, symmetric


# Every layout runs in two of the four (per-channel, symmetric) combinations, covering each value of
# both; the SUBSET runs all four in every dtype, with learned and synchronised ranges.
PAIRS = [(True, True), (False, False)]


def drive() -> None:
    """Every launch pattern of the lanes over the matrix (inside ``triton_offline.offline``)."""
    running = tquant.RangeEstimators.running_minmax
    for x, per_channel, channels, symmetric in _cases(LAYOUTS, [torch.float32], PAIRS):
        qat_steps(manager(symmetric, per_channel, running, channels=channels), x, learned=False)
    for x, per_channel, channels, symmetric in _cases(SUBSET, [torch.float32]):
        qat_steps(manager(symmetric, per_channel, running, channels=channels), x, sync=True)
    for x, per_channel, channels, symmetric in _cases(SUBSET, DTYPES, PAIRS):
        qat_steps(manager(symmetric, per_channel, running, channels=channels), x, sync=x.dtype == torch.bfloat16)
    for x, per_channel, channels, symmetric in _cases(SUBSET, [torch.float32]):
        for estimator in OTHER_FUSED:
            manager(symmetric, per_channel, estimator, channels=channels)(x)
        axis = 0 if per_channel else -1
        state = [torch.full((channels,) if per_channel else (), float("nan")) for _ in range(4)]
        K.update_range(x, *state, torch.zeros((), dtype=torch.bool), 4, symmetric, axis, K.ESTIMATOR_RUNNING,
                       0.9, True)
        K.fake_quant_forward(x, state[2], state[3], torch.zeros((), dtype=torch.bool), 4, symmetric, axis, True)
    for shape, group_size, dtypes, symmetries in GROUP_CASES:
        for dtype in dtypes:
            x = torch.randn(shape, dtype=dtype)
            for symmetric in symmetries:
                qm = manager(symmetric, True, running, n_bits=4, channels=shape[0], group_size=group_size,
                             weight_shape=shape)
                qat_steps(qm, x, sync=True)
                q = qm.quantizer  # the standalone op: the symmetric update's second launch of its own
                ranges = [torch.full_like(q._delta, float("nan")) for _ in range(2)]
                K.group_update_range(x, *ranges, q._delta, q._zero_float, q._signed, 4, symmetric, q.group_len,
                                     K.ESTIMATOR_RUNNING, 0.9, False)
    for fmt, dtypes in FP8_CASES:
        for x, per_channel, channels, _ in _cases(SUBSET[:1] + SUBSET[2:], dtypes, FP8_PAIRS):
            qat_steps(manager(True, per_channel, running, channels=channels, fmt=fmt), x)
    for x, per_channel, channels, symmetric in [*_cases(SEARCH_LAYOUTS, [torch.float32]),
                                                *_cases(SEARCH_LAYOUTS[1:], [torch.bfloat16], PAIRS)]:
        for estimator, params in SEARCH:
            if estimator == tquant.RangeEstimators.cross_entropy and x.dim() < 2:
                continue  # a softmax over dim 1
            qm = manager(symmetric, per_channel, estimator, params, channels=channels)
            qm(x)
            qm(x)


@triton.jit
def _broken_kernel(p_x, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """``--self-test``: runs in the interpreter, but re-binds a loop-carried name to another shape."""
    rows = tl.arange(0, BLOCK)
    tl.store(p_x + rows, 0.0, mask=rows < n)
    for i in range(0, n, WIDE):
        rows = i + tl.arange(0, WIDE)
        tl.store(p_x + rows, 1.0, mask=rows < n)


def drive_broken() -> None:
    import cuda_compile  # this file as a module, so that compile workers can import the kernel by name

    cuda_compile._broken_kernel[(1,)](torch.empty(16), 16, BLOCK=2, WIDE=8)


def triton_kernels() -> set[str]:
    """``module.name`` of every Triton kernel in ``tquant.kernels``' Triton modules."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    names = set()
    for info in pkgutil.iter_modules(K.__path__):
        if info.name.startswith("_triton") or info.name.startswith("triton"):
            module = importlib.import_module(f"{K.__name__}.{info.name}")
            names |= {f"{module.__name__}.{n}" for n, v in vars(module).items()
                      if isinstance(v, JITFunction) and n.endswith("_kernel") and v.fn.__module__ == module.__name__}
    return names


def distinct_code(variants) -> list:
    """One variant per distinct code: kernel, target, argument types and compile-time constants (the
    constexprs, and the integers Triton specialises to 1). Variants that differ only in their
    divisibility hints (which pointers and sizes are multiples of 16: the vector width of a load, not a
    code path) compile the representative with the most hints, the one aligned tensors get. This keeps
    the check within CI's minutes with an empty Triton cache."""
    best = {}
    for v in variants:
        key = (v.name, v.arch, v.signature, v.constexprs, v.options)
        if key not in best or len(v.attrs) > len(best[key].attrs):
            best[key] = v
    return sorted(best.values(), key=lambda v: (v.name, v.arch, repr(v.constexprs)))


def _init_worker():
    torch.set_num_threads(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="CUDA compute capability x10 (80, 90)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", help="write a report here")
    parser.add_argument("--self-test", action="store_true",
                        help="compile only a kernel that the interpreter runs but the compiler rejects")
    args = parser.parse_args(argv)
    arches = args.arch or [80, 90]

    start = time.perf_counter()
    launches = []
    torch.manual_seed(0)
    with triton_offline.offline(lambda k, a, kw: launches.append((k, a, kw))), K.use_backend("triton"):
        drive_broken() if args.self_test else drive()
    bound = {triton_offline.bind(k, a, kw, arch) for k, a, kw in launches for arch in arches}
    variants = distinct_code(bound)
    recorded = time.perf_counter() - start
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        errors = list(pool.map(triton_offline.compile_variant, variants, chunksize=4))
    failed = [(v, e) for v, e in zip(variants, errors) if e is not None]
    launched = {f"{v.module}.{v.name}" for v in variants}
    missing = [] if args.self_test else sorted(triton_kernels() - launched)
    for v, e in failed:
        print(f"FAIL {v.describe()}: {e}")
    for name in missing:
        print(f"NOT LAUNCHED {name}: add the call that launches it to tests/cuda_compile.py's matrix")
    summary = (f"triton {triton.__version__}: {len(launches)} launches, {len(bound)} launch variants, "
               f"{len(variants)} compiled "
               f"({len({v.name for v in variants})} kernels) for sm_{'/sm_'.join(map(str, arches))}; "
               f"{len(failed)} failed to compile; recorded in {recorded:.1f} s, "
               f"total {time.perf_counter() - start:.1f} s")
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "launches": len(launches), "launch_variants": len(bound),
                       "variants": len(variants),
                       "kernels": sorted(launched), "missing": missing,
                       "failed": [[v.describe(), e] for v, e in failed], "arches": arches}, f, indent=1)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
