"""Triton kernels for ``tquant::batch_minmax`` and ``tquant::update_range``.

``update_range`` is the first half of the QAT training forward (DESIGN §4): ONE launch of
``_update_range_kernel`` whatever the values, with no host synchronisation:

- a split reduction: each program reduces a strided set of tiles of one row block to the min
  and max of the finite values, published to a small fp32 partials buffer (``[C, P]`` per
  channel, one pair per program per tensor) in a workspace that the caller owns (a quantizer's buffers);
- the last program to arrive (an atomic counter, reset by that program) reduces the partials
  in a fixed order (so the result does not depend on scheduling), applies the estimator
  (current / all / running EMA; a NaN old range or ``first`` takes the batch, a batch without a
  finite value keeps the old range), clamps the range
  to ``x_min <= 0 < x_max``, takes the symmetric sign across all channels, and writes
  ``range_min``, ``range_max``, ``delta``, ``zero_float`` and ``signed`` in place.

``batch_minmax`` (the half used when ranges are all-reduced across processes) keeps two
launches: partials, then a finalize that only reduces them.

The fake-quant pass (``_triton_fake_quant.py``) then reads ``delta``/``zero_float``/``signed``
from the device and recomputes scale, zero point and grid in every program.

Numerics equal ``_finalize_torch(batch_minmax_reference(x), ...)`` bit for bit: divisions use
``tl.math.div_rn``; the EMA ``(1 - m) * b + m * old`` takes ``1 - m`` computed in Python double
and rounded to fp32 as torch does, and the kernels run with ``enable_fp_fusion=False`` so the
sum of products is not contracted into an FMA.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from ._triton_launch import Launcher
from ._triton_math import _maximum, _minimum
from ._triton_plan import (
    LAUNCH_OPTS,
    TritonPlan,
    _as_2d,
    _finalize_blocks,
    _split_plan,
    device_ctx,
    grid_consts,
    plan_for,
)
from .range_update import range_workspace
from .reference import ESTIMATOR_ALL, ESTIMATOR_CURRENT, ESTIMATOR_RUNNING

__all__ = ["batch_minmax_triton", "update_range_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Range rule applied by the finalize kernel (a constexpr: each is straight-line code).
_RULE_BATCH = 0  # current_minmax: the batch range
_RULE_ALL = 1  # min of mins, max of maxes
_RULE_EMA = 2  # (1 - m) * batch + m * old, finite fallbacks
_RULE_FIRST = 3  # ``first``: the batch range, the old one ignored (as if NaN)


@triton.jit
def _program_minmax(p_x, ROWS, COLS, sx_row, sx_col, P, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(pid, split, rows, rmask, lo, hi)`` of this program: program ``pid`` takes row block ``pid // P``
    and its column tiles ``split, split + P, ...`` (``split = pid % P``); ``lo`` / ``hi`` are the
    ``[BLOCK_C, BLOCK_R]`` min / max of the finite values seen (+inf / -inf where none; a zero is
    +0.0, so the reductions after this one need no order to give the reference's sign)."""
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // P
    split = pid - rb * P
    rows = rb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < ROWS
    lo = tl.full([BLOCK_C, BLOCK_R], float("inf"), tl.float32)
    hi = tl.full([BLOCK_C, BLOCK_R], float("-inf"), tl.float32)
    n_cb = tl.cdiv(COLS, BLOCK_R)
    for cb in range(split, n_cb, P):
        cols = cb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        m = rmask[:, None] & (cols < COLS)[None, :]
        x = tl.load(p_x + rows[:, None] * sx_row + cols[None, :] * sx_col, mask=m, other=0.0).to(tl.float32)
        ok = m & (tl.abs(x) < float("inf"))  # NaN and +-inf are left out
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    return pid, split, rows, rmask, lo + 0.0, hi + 0.0


@triton.jit
def _minmax_partials_kernel(
    p_x, p_pmin, p_pmax,
    ROWS, COLS, sx_row, sx_col, P,
    PER_CHANNEL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Min / max of the finite values seen by program ``(row block, split)``; ``+inf / -inf`` if none."""
    pid, split, rows, rmask, lo, hi = _program_minmax(p_x, ROWS, COLS, sx_row, sx_col, P, BLOCK_C, BLOCK_R)
    if PER_CHANNEL:
        tl.store(p_pmin + rows * P + split, tl.min(lo, axis=1), mask=rmask)
        tl.store(p_pmax + rows * P + split, tl.max(hi, axis=1), mask=rmask)
    else:
        tl.store(p_pmin + pid, tl.min(tl.min(lo, axis=1), axis=0))
        tl.store(p_pmax + pid, tl.max(tl.max(hi, axis=1), axis=0))


@triton.jit
def _reduce_partials(p_pmin, p_pmax, rows, rmask, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Batch ``(min, max)`` of channels ``rows`` from their ``[C, P]`` partials.

    ``volatile`` loads: in the fused update the partials were written by other programs of the
    same launch, so they must come from L2, never from a stale L1 line.
    """
    lo = tl.full([BLOCK_C, BLOCK_P], float("inf"), tl.float32)
    hi = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        m = rmask[:, None] & (cols < P)[None, :]
        offs = rows[:, None] * P + cols[None, :]
        lo = tl.minimum(lo, tl.load(p_pmin + offs, mask=m, other=float("inf"), volatile=True))
        hi = tl.maximum(hi, tl.load(p_pmax + offs, mask=m, other=float("-inf"), volatile=True))
    return tl.min(lo, axis=1), tl.max(hi, axis=1)


@triton.jit
def _ema(b, old, one_minus_m, m):
    """``ema_range``: ``(1 - m) * b + m * old``, or whichever side is finite.

    Each product is rounded before the sum, as in torch: the selects between the products and the add
    keep the compiler from contracting them into an FMA even when a launcher (inductor's) enables FP
    fusion; they change no value (a non-finite side is replaced below anyway).
    """
    ok_b = tl.abs(b) < float("inf")
    ok_o = tl.abs(old) < float("inf")
    p_b = tl.where(ok_b, one_minus_m * b, 0.0)
    p_o = tl.where(ok_o, m * old, 0.0)
    return tl.where(ok_b & ok_o, p_b + p_o, tl.where(ok_b, b, old))


@triton.jit
def _old_range(p_rmin, p_rmax, idx, mask, RULE: tl.constexpr, BLOCK: tl.constexpr):
    """The stored range at ``idx`` (``[BLOCK]``), all NaN for ``RULE == 3`` (the first batch: ignore it)."""
    if RULE == 3:
        old_min = tl.full([BLOCK], float("nan"), tl.float32)
        old_max = tl.full([BLOCK], float("nan"), tl.float32)
    else:
        old_min = tl.load(p_rmin + idx, mask=mask, other=0.0)
        old_max = tl.load(p_rmax + idx, mask=mask, other=0.0)
    return old_min, old_max


@triton.jit
def _apply_rule(bmin, bmax, old_min, old_max, one_minus_m, m, RULE: tl.constexpr):
    """The running range after a batch range ``(bmin, bmax)`` (``update_range_reference``; ``RULE`` as
    :func:`range_rule` gives it; for ``RULE == 3`` an all-NaN old range, as :func:`_old_range` gives).

    A NaN old range means "no range yet": those elements take the batch range. An element whose
    batch had no finite value (``bmin = +inf``) keeps its old range (NaN when it had none).
    """
    if RULE == 1:
        new_min = _minimum(old_min, bmin)
        new_max = _maximum(old_max, bmax)
    elif RULE == 2:
        new_min = _ema(bmin, old_min, one_minus_m, m)
        new_max = _ema(bmax, old_max, one_minus_m, m)
    else:
        new_min = bmin
        new_max = bmax
    new_min = tl.where(old_min != old_min, bmin, new_min)
    new_max = tl.where(old_max != old_max, bmax, new_max)
    seen = bmin < float("inf")  # a finite value was seen (else bmin = +inf, bmax = -inf)
    return tl.where(seen, new_min, old_min), tl.where(seen, new_max, old_max)


@triton.jit
def _new_range(p_pmin, p_pmax, p_rmin, p_rmax, rows, rmask, P, one_minus_m, m,
               RULE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The running range after this batch for channels ``rows`` (:func:`_apply_rule` on the reduced partials)."""
    bmin, bmax = _reduce_partials(p_pmin, p_pmax, rows, rmask, P, BLOCK_C, BLOCK_P)
    old_min, old_max = _old_range(p_rmin, p_rmax, rows, rmask, RULE, BLOCK_C)
    return _apply_rule(bmin, bmax, old_min, old_max, one_minus_m, m, RULE)


@triton.jit
def _batch_minmax_finalize_kernel(p_pmin, p_pmax, p_bmin, p_bmax, C, P,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < C
    bmin, bmax = _reduce_partials(p_pmin, p_pmax, rows, rmask, P, BLOCK_C, BLOCK_P)
    tl.store(p_bmin + rows, bmin, mask=rmask)
    tl.store(p_bmax + rows, bmax, mask=rmask)


@triton.jit
def _finalize_state(
    p_pmin, p_pmax, p_rmin, p_rmax, p_delta, p_zf, p_signed,
    C, P, one_minus_m, m, full, half,
    SYMMETRIC: tl.constexpr, RULE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """New running range and ``qparams_from_range`` for all ``C`` channels, in one program.

    Symmetric quantizers need the sign over all channels before any ``delta``: a first loop only
    reads (partials, old range) to find it, the second recomputes the range and writes, so no
    element is read after this program wrote it.
    """
    neg = tl.full([], 0, tl.int32)
    if SYMMETRIC:
        for c0 in range(0, C, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            rmask = rows < C
            new_min, new_max = _new_range(p_pmin, p_pmax, p_rmin, p_rmax, rows, rmask, P, one_minus_m, m,
                                          RULE, BLOCK_C, BLOCK_P)
            x_min = _minimum(new_min, 0.0)
            neg = tl.maximum(neg, tl.max(tl.where(rmask & (x_min < 0.0), 1, 0), axis=0))
    qmax = tl.where(neg > 0, half - 1.0, full)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        rmask = rows < C
        new_min, new_max = _new_range(p_pmin, p_pmax, p_rmin, p_rmax, rows, rmask, P, one_minus_m, m,
                                      RULE, BLOCK_C, BLOCK_P)
        tl.store(p_rmin + rows, new_min, mask=rmask)
        tl.store(p_rmax + rows, new_max, mask=rmask)
        x_min = _minimum(new_min, 0.0)
        x_max = _maximum(new_max, 1e-8)
        if SYMMETRIC:
            delta = tl.math.div_rn(_maximum(tl.abs(x_min), x_max), qmax)
            zero_float = tl.zeros([BLOCK_C], dtype=tl.float32)
        else:
            delta = tl.math.div_rn(x_max - x_min, full)
            # x * -1.0, not -x: compiled Triton negates as 0 - x, which gives +0.0 for x = +0.0
            # where torch's -x gives the reference's -0.0.
            zero_float = tl.math.div_rn(x_min * -1.0, delta)
        tl.store(p_delta + rows, delta, mask=rmask)
        tl.store(p_zf + rows, zero_float, mask=rmask)
    tl.store(p_signed, neg > 0)


@triton.jit(do_not_specialize_on_alignment=["p_ws", "p_count", "p_rmin", "p_rmax", "p_delta", "p_zf", "p_signed"])
def _update_range_kernel(
    p_x, p_ws, p_count, p_rmin, p_rmax, p_delta, p_zf, p_signed,
    ROWS, COLS, sx_row, sx_col, P, N_PROGRAMS, C, one_minus_m, m, full, half,
    PER_CHANNEL: tl.constexpr, SYMMETRIC: tl.constexpr, RULE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, FIN_C: tl.constexpr,
):
    """The whole range update in one launch: a split min/max reduction whose last program finalises.

    The workspace ``p_ws`` holds the batch min (``[0, C)``, +inf between launches) and max
    (``[C, 2C)``, -inf); ``p_count`` is an int32 arrival counter (0 between launches). Each program
    folds its min / max in with atomic min / max — exact and order-independent, so the result does
    not depend on scheduling — then bumps the counter. The program that sees ``N_PROGRAMS - 1``
    acquires the batch range, runs :func:`_finalize_state`, and restores the workspace and the
    counter for the next launch: no fill kernel, no host synchronisation.
    """
    p_bmin = p_ws
    p_bmax = p_ws + C
    _, _, rows, rmask, lo, hi = _program_minmax(p_x, ROWS, COLS, sx_row, sx_col, P, BLOCK_C, BLOCK_R)
    if PER_CHANNEL:
        tl.atomic_min(p_bmin + rows, tl.min(lo, axis=1), mask=rmask, sem="release")
        tl.atomic_max(p_bmax + rows, tl.max(hi, axis=1), mask=rmask, sem="release")
    else:
        tl.atomic_min(p_bmin, tl.min(tl.min(lo, axis=1), axis=0), sem="release")
        tl.atomic_max(p_bmax, tl.max(tl.max(hi, axis=1), axis=0), sem="release")
    tl.debug_barrier()
    done = tl.atomic_add(p_count, 1, sem="acq_rel")
    if done == N_PROGRAMS - 1:
        _finalize_state(p_bmin, p_bmax, p_rmin, p_rmax, p_delta, p_zf, p_signed, C, 1,
                        one_minus_m, m, full, half, SYMMETRIC, RULE, FIN_C, 1)
        for c0 in range(0, C, FIN_C):
            channels = c0 + tl.arange(0, FIN_C).to(tl.int64)  # not `rows`: a loop-carried name keeps its shape
            tl.store(p_bmin + channels, float("inf"), mask=channels < C)
            tl.store(p_bmax + channels, float("-inf"), mask=channels < C)
        tl.store(p_count, 0)


@triton.jit(do_not_specialize_on_alignment=["p_bmin", "p_bmax", "p_rmin", "p_rmax", "p_delta", "p_zf", "p_signed"])
def _finalize_range_kernel(
    p_bmin, p_bmax, p_rmin, p_rmax, p_delta, p_zf, p_signed, C, one_minus_m, m, full, half,
    SYMMETRIC: tl.constexpr, RULE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``finalize_range`` in one program: the running range and the parameters from a batch range
    ``[C]`` (the synchronised-ranges path, after the batch range was all-reduced)."""
    _finalize_state(p_bmin, p_bmax, p_rmin, p_rmax, p_delta, p_zf, p_signed, C, 1,
                    one_minus_m, m, full, half, SYMMETRIC, RULE, BLOCK_C, 1)


def _check_input(x: torch.Tensor, axis: int, op: str) -> bool:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if axis not in (-1, 0):
        raise ValueError(f"{op}: axis must be -1 (per tensor) or 0 (per channel, dim 0), got {axis}")
    if axis == 0 and x.dim() == 0:
        raise ValueError(f"{op}: per-channel ranges (axis=0) need x.dim() >= 1")
    return axis == 0


def _minmax_partials(x: torch.Tensor, per_channel: bool):
    """Launch pass 1; returns ``(pmin, pmax, C, P)`` with partials laid out ``[C, P]``."""
    (xv,), _, rows, cols, ((s_row, s_col),), _ = _as_2d([x], per_channel)
    block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials = _split_plan(
        x, rows, cols, per_channel
    )
    pmin = torch.empty(n_channels * n_partials, dtype=torch.float32, device=x.device)
    pmax = torch.empty_like(pmin)
    if n_programs > 0:
        _minmax_partials_kernel[(n_programs,)](
            xv, pmin, pmax, rows, cols, s_row, s_col, n_split,
            PER_CHANNEL=per_channel, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps, **LAUNCH_OPTS,
        )
    return pmin, pmax, n_channels, n_partials


def batch_minmax_triton(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (fp32) of the finite values of ``x``, per tensor (0-dim) or per channel (``[C]``).

    NaN and +-inf are ignored; a tensor or channel without a finite value gives ``(+inf, -inf)``
    (``batch_minmax_reference``). Two launches: split reduction into partials, then their reduction.
    """
    per_channel = _check_input(x, axis, "batch_minmax")
    shape = (x.shape[0],) if per_channel else ()
    bmin = torch.empty(shape, dtype=torch.float32, device=x.device)
    bmax = torch.empty(shape, dtype=torch.float32, device=x.device)
    with device_ctx(x):
        pmin, pmax, n_channels, n_partials = _minmax_partials(x.detach(), per_channel)
        if n_channels > 0:
            fin_c, fin_p = _finalize_blocks(n_channels, n_partials)
            _batch_minmax_finalize_kernel[(triton.cdiv(n_channels, fin_c),)](
                pmin, pmax, bmin, bmax, n_channels, n_partials, BLOCK_C=fin_c, BLOCK_P=fin_p,
            )
    return bmin, bmax


def finalize_range_triton(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits: int,
                          symmetric: bool, estimator: int, momentum: float, first: bool) -> None:
    """``finalize_range`` (``range_update.py``) in one launch: fp32 contiguous 0-dim or ``[C]`` tensors on
    one CUDA device (or CPU tensors in the interpreter), written in place; no host synchronisation."""
    c = bmin.numel()
    if c == 0:
        return
    full, half = grid_consts(n_bits)
    block_c, _ = _finalize_blocks(c, 1)
    with device_ctx(bmin):
        _finalize_range_kernel[(1,)](
            bmin.contiguous(), bmax.contiguous(), range_min, range_max, delta, zero_float, signed, c,
            1.0 - momentum, momentum, full, half,
            SYMMETRIC=bool(symmetric), RULE=range_rule(estimator, first), BLOCK_C=block_c, **LAUNCH_OPTS,
        )


def update_range_triton(
    x: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
    estimator: int,
    momentum: float,
    first: bool,
) -> None:
    """Estimate the range of ``x`` and write the five quantizer state tensors in place.

    Same result as ``_finalize_torch(*batch_minmax_reference(x, axis), ...)``: the batch range of
    the finite values, the estimator update (``first`` or ``ESTIMATOR_CURRENT``: the batch;
    ``ESTIMATOR_ALL``: min/max with the old range; ``ESTIMATOR_RUNNING``:
    ``(1 - m) * batch + m * old`` with finite fallbacks), then ``qparams_from_range``.

    Args:
        x: any shape, strides, fp32/fp16/bf16 (not modified).
        range_min, range_max, delta, zero_float: fp32, contiguous, 0-dim or ``[1]`` (``axis=-1``)
            or ``[x.shape[0]]`` (``axis=0``); overwritten.
        signed: 0-dim bool, overwritten.
    One launch, no host synchronisation; ``first`` and ``estimator`` only pick the kernel variant.
    A NaN in ``range_min``/``range_max`` means "no range yet" (that channel takes the batch range).
    """
    per_channel = _check_input(x, axis, "update_range")
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"update_range: n_bits must be an int in 1..16, got {n_bits!r}")
    if estimator not in (ESTIMATOR_CURRENT, ESTIMATOR_ALL, ESTIMATOR_RUNNING):
        raise ValueError(f"update_range: unknown estimator code {estimator}")
    want = (x.shape[0],) if per_channel else ()
    for name, t in (("range_min", range_min), ("range_max", range_max), ("delta", delta),
                    ("zero_float", zero_float)):
        # per tensor, a quantizer's delta/zero_float are [1] (FSDP2 shards no 0-dim parameter)
        shape_ok = tuple(t.shape) == want or (not per_channel and tuple(t.shape) == (1,))
        ok = shape_ok and t.dtype == torch.float32 and t.is_contiguous()
        if not ok or t.device != x.device:
            raise ValueError(
                f"update_range: {name} must be a contiguous float32 tensor of shape {want} on {x.device}, "
                f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
            )
    if signed.dtype != torch.bool or signed.dim() != 0 or signed.device != x.device:
        raise ValueError(f"update_range: signed must be a 0-dim bool tensor on {x.device}")
    plan = plan_for(x, axis)
    launch_update_range(plan, x.detach(), plan_workspace(plan), range_min, range_max, delta, zero_float, signed,
                        n_bits, symmetric, estimator, momentum, first)


def plan_workspace(plan: TritonPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The range-update workspace of the functional entry point, one per cached plan (made with the plan,
    reused in stream order: every launch leaves it as it found it). Quantizers own theirs."""
    return plan.launcher("workspace", lambda: range_workspace(plan.n_channels, plan.device))


def range_rule(estimator: int, first: bool = False) -> int:
    """The ``RULE`` constexpr of :func:`_update_range_kernel` for an estimator code."""
    if first:
        return _RULE_FIRST
    if estimator == ESTIMATOR_CURRENT:
        return _RULE_BATCH
    return _RULE_ALL if estimator == ESTIMATOR_ALL else _RULE_EMA


def update_range_launcher(plan: TritonPlan, n_bits: int, symmetric: bool, rule: int, momentum: float,
                          x_aligned: bool, grid: tuple[float, float] | None = None) -> Launcher:
    """The plan's bound :func:`_update_range_kernel` variant; called with ``(x, workspace, counter,
    range_min, range_max, delta, zero_float, signed)`` (``x`` contiguous when the plan says so).
    ``grid``: ``(full, half)`` in place of ``grid_consts(n_bits)`` (FP8: ``(max, max + 1)``, so a symmetric
    ``delta`` is ``max(|x_min|, x_max) / max`` whatever the sign)."""
    full, half = grid or grid_consts(n_bits)
    n_programs = max(plan.n_programs, 1)
    tail = (plan.rows, plan.cols, *plan.sx, plan.n_split, n_programs, plan.n_channels, 1.0 - momentum, momentum,
            full, half)
    constexprs = dict(PER_CHANNEL=plan.per_channel, SYMMETRIC=bool(symmetric), RULE=rule, BLOCK_C=plan.block_c,
                      BLOCK_R=plan.block_r, FIN_C=plan.fin_c)
    return plan.launcher(("update_range", n_bits, bool(symmetric), rule, momentum, x_aligned, grid), lambda: Launcher(
        _update_range_kernel, (n_programs,), tail, constexprs, dict(num_warps=plan.num_warps, **LAUNCH_OPTS)))


def launch_update_range(plan, x, workspace, range_min, range_max, delta, zero_float, signed, n_bits: int,
                        symmetric: bool, estimator: int, momentum: float, first: bool = False,
                        grid: tuple[float, float] | None = None) -> None:
    """One launch of :func:`_update_range_kernel` on a checked input (see ``update_range_triton``).

    ``plan`` is the :class:`~tquant.kernels._triton_plan.TritonPlan` of ``x``; ``workspace`` the
    ``(minmax, counter)`` pair of :func:`~tquant.kernels.range_update.range_workspace` for its channels.
    """
    if plan.contiguous:
        x = x.contiguous()
    launcher = update_range_launcher(plan, n_bits, symmetric, range_rule(estimator, first), momentum,
                                     x.data_ptr() % 16 == 0, grid)
    launcher(x, *workspace, range_min, range_max, delta, zero_float, signed)
