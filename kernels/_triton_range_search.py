"""Triton kernel of the MSE range searches: the squared error of a block of candidate quantizers.

``grid_mse_triton(x, scale, lo, hi)`` returns, for ``K`` candidate quantizers and the rows of
``x [R, M]``, the loss array ``[K, R]`` (fp64) with

    loss[k, r] = sum_m (x[r, m] - scale[k] * clamp(round(x[r, m] / scale[k]), lo[k], hi[k]))^2

(``lo``/``hi`` are the grid bounds minus the zero point: ``clamp(round(v) + zp, qmin, qmax) - zp``
equals ``clamp(round(v), qmin - zp, qmax - zp)`` exactly). Candidate parameters are ``[K, P]``
with ``P == 1`` (one range for every row: the grid search) or ``P == R`` (a range per row: the
per-channel golden section). Non-finite elements of ``x`` count as zeros, which quantize to
zero on every grid, so they add nothing to any loss (the torch path does the same).

One launch per call. Program ``(row, split, candidate block)`` loads each tile of its slice of
the row once, evaluates all ``BLOCK_K`` candidates of its block on it (a ``[BLOCK_K, BLOCK_M]``
tile of element-candidate pairs) and accumulates the per-candidate sums in registers; it writes
one fp32 partial per candidate, and the partials ``[K, R, SPLITS]`` are summed in fp64 by torch
(deterministic: no atomics). No host synchronisation; the arg-min over the accumulated losses
(``best_range``) stays on the device too.

Numerics equal the eager reference element for element (``tl.math.div_rn`` for ``x / scale``,
the portable round-half-to-even helper, no FMA contraction); sums differ from the torch path
only in summation order. Non-fp32 inputs: the dequantized value is rounded to the input dtype
before the error is taken, as the quantizer hands back the input dtype.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from ._triton_math import _round_half_even
from ._triton_plan import LAUNCH_OPTS, device_ctx, plans_for_gpu, target_programs

__all__ = ["grid_mse_triton"]

# Tile of element-candidate pairs per step: [BLOCK_K, BLOCK_M]; the interpreter (tests) uses
# tiny tiles so that several candidate blocks, splits and tiles run on tiny tensors.
_BLOCK_K_GPU, _BLOCK_M_GPU, _NUM_WARPS_GPU = 16, 512, 8
_BLOCK_K_CPU, _BLOCK_M_CPU = 4, 64
# Programs the launch aims for per SM (GPU) and in total without a GPU (interpreter).
_PROGRAMS_PER_SM = 8
_CPU_PROGRAMS = 4
# Partials above this many fp32 values: fewer splits (the partials buffer stays small).
_MAX_PARTIALS = 1 << 24


@triton.jit
def _grid_mse_kernel(
    p_x, p_scale, p_lo, p_hi, p_part,
    COLS, sx_row, K, P, SPLITS, TILES_PER_SPLIT, R,
    CAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial squared errors ``part[k, row, split]`` of candidates ``k`` of this program's block."""
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    row = pid // SPLITS
    split = pid - row * SPLITS
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    kmask = ks < K
    # P == 1: one range per candidate; P == R: each row its own range.
    p_off = ks * P + tl.where(P == 1, 0, row)
    scale = tl.load(p_scale + p_off, mask=kmask, other=1.0)[:, None]
    lo = tl.load(p_lo + p_off, mask=kmask, other=0.0)[:, None]
    hi = tl.load(p_hi + p_off, mask=kmask, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    col0 = split * TILES_PER_SPLIT * BLOCK_M
    offs = tl.arange(0, BLOCK_M).to(tl.int64)
    for t in range(0, TILES_PER_SPLIT):
        cols = col0 + t * BLOCK_M + offs
        x = tl.load(p_x + row * sx_row + cols, mask=cols < COLS, other=0.0)
        xf = x.to(tl.float32)
        # Non-finite values count as zeros: zero quantizes to zero (lo <= 0 <= hi), no error.
        xf = tl.where(tl.abs(xf) <= 3.4028234663852886e38, xf, 0.0)[None, :]  # NaN compares false
        v = _round_half_even(tl.math.div_rn(xf, scale))
        v = tl.where(v < lo, lo, tl.where(v > hi, hi, v))
        q = v * scale
        if CAST:
            q = q.to(x.dtype).to(tl.float32)
        e = xf - q
        acc += tl.sum(e * e, axis=1)
    tl.store(p_part + (ks * R + row) * SPLITS + split, acc, mask=kmask)


def _plan(x: torch.Tensor, rows: int, cols: int, k: int) -> tuple[int, int, int, int, int]:
    """``(block_k, block_m, num_warps, splits, tiles_per_split)`` for ``K = k`` candidates."""
    if plans_for_gpu(x):
        block_k, block_m, num_warps = _BLOCK_K_GPU, _BLOCK_M_GPU, _NUM_WARPS_GPU
    else:
        block_k, block_m, num_warps = _BLOCK_K_CPU, _BLOCK_M_CPU, 1
    target = target_programs(x, _PROGRAMS_PER_SM, _CPU_PROGRAMS)
    n_kb = triton.cdiv(k, block_k)
    n_tiles = max(1, triton.cdiv(cols, block_m))
    splits = max(1, min(n_tiles, target // max(rows * n_kb, 1), _MAX_PARTIALS // max(k * rows, 1)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return block_k, block_m, num_warps, splits, tiles_per_split


def grid_mse_triton(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Squared errors ``[K, R]`` (fp64) of ``K`` candidate quantizers on the rows of ``x``.

    Args:
        x: ``[R, M]``, fp32/fp16/bf16, unit stride along dim 1 (non-finite values ignored).
        scale: fp32 ``[K, P]`` (``P`` 1 or ``R``), every entry ``> 0``.
        lo, hi: fp32, broadcastable to ``[K, P]``: the integer bounds of ``round(x / scale)``
            (``qmin - zp``, ``qmax - zp``), ``lo <= 0 <= hi``.
    Returns:
        ``[K, R]`` float64 on ``x``'s device (no host synchronisation).
    """
    rows, cols = x.shape
    k, p = scale.shape
    if p not in (1, rows):
        raise ValueError(f"grid_mse_triton: scale has {p} columns, expected 1 or the {rows} rows of x")
    if x.stride(1) != 1 and cols > 1:
        x = x.contiguous()
    scale = scale.to(torch.float32).contiguous()
    lo = lo.to(torch.float32).expand(k, p).contiguous()
    hi = hi.to(torch.float32).expand(k, p).contiguous()
    if k == 0 or rows == 0:
        return torch.zeros((k, rows), dtype=torch.float64, device=x.device)
    block_k, block_m, num_warps, splits, tiles = _plan(x, rows, cols, k)
    part = torch.empty((k, rows, splits), dtype=torch.float32, device=x.device)
    grid = (rows * splits, triton.cdiv(k, block_k))
    with device_ctx(x):
        _grid_mse_kernel[grid](
            x, scale, lo, hi, part,
            cols, x.stride(0), k, p, splits, tiles, rows,
            CAST=x.dtype != torch.float32, BLOCK_K=block_k, BLOCK_M=block_m,
            num_warps=num_warps, **LAUNCH_OPTS,
        )
    return part.sum(dim=2, dtype=torch.float64)
