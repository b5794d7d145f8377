"""Triton kernels of the ``tquant::fp8_*`` ops (``fp8_reference.py``), bit for bit.

The rounding to FP8 is built from the fp32 bits (:func:`_fp8_round`), not from a cast to Triton's
``float8e4nv``/``float8e5``: those casts need sm_89+ hardware (or differ in rounding and saturation
between architectures), and the interpreter has none. For ``|v| <= max`` the nearest FP8 value is
``rne(v / q) * q`` with the quantum ``q = 2^(max(e, EMIN) - MBITS)`` (``e`` the unbiased exponent of
``v``, ``EMIN`` the format's smallest normal exponent: below it the subnormals share one quantum). Both
scalings are by powers of two, so they are exact; :func:`_round_half_even` breaks ties to even and
keeps the sign of zero, as ``Tensor.to(float8)`` does.

Memory: a dense input (any dim order) is processed over its storage, so the output has the input's
layout (``torch.empty_like``) with no copy; per channel that needs dim 0 outermost (true of weights).
Other inputs go through contiguous temporaries.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from ._masked_autograd import masked_autograd
from ._triton import tl, triton
from ._triton_math import _clamp, _round_half_even
from ._triton_plan import LAUNCH_OPTS, device_ctx
from .fp8_reference import fp8_max

__all__ = ["FP8_BITS", "fp8_fake_quant_triton", "fp8_range_grads_triton"]

FP8_BITS = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}
"""``(mantissa bits, smallest normal exponent)`` of each format."""
_BLOCK = 1024
# Programs of the per-tensor gradient reduction (partials, then a sum).
_GRAD_SPLITS = 64


@triton.jit
def _fp8_round(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """The FP8 value nearest ``v`` (ties to even), ``v`` already within the format's range (NaN stays NaN)."""
    e = ((tl.abs(v).to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, EMIN) - MBITS
    up = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e
    down = ((127 + e) << 23).to(tl.float32, bitcast=True)  # 2^e
    return _round_half_even(v * up) * down


@triton.jit
def _fp8_codes(x, d, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """``(scale, x / scale, fp8(clamp(x / scale)))`` of fp32 ``x`` with ``delta`` ``d``."""
    scale = tl.where(d < 1e-8, 1e-8, d)
    v = tl.math.div_rn(x, scale)
    return scale, v, _fp8_round(_clamp(v, -FMAX, FMAX), MBITS, EMIN)


@triton.jit
def _fp8_fake_quant_kernel(
    p_x, p_y, p_mask, p_delta, N, ROW,
    FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """``y = scale * fp8(clamp(x / scale, -max, max))`` over ``N`` elements of storage (rows of ``ROW`` per
    channel); the mask is ``-max <= x / scale <= max``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < N
    x = tl.load(p_x + offs, mask=m, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        d = tl.load(p_delta + offs // ROW, mask=m, other=1.0)
    else:
        d = tl.load(p_delta)
    scale, v, c = _fp8_codes(x, d, FMAX, MBITS, EMIN)
    tl.store(p_y + offs, (scale * c).to(p_y.dtype.element_ty), mask=m)
    if HAS_MASK:
        tl.store(p_mask + offs, ((v >= -FMAX) & (v <= FMAX)).to(tl.uint8), mask=m)


@triton.jit
def _fp8_range_grads_kernel(
    p_g, p_x, p_delta, p_out, ROW, P,
    FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Partial LSQ sums ``sum(g * where(inside, c - x / s, c))``: program ``(row, split)`` takes the row's
    blocks ``split, split + P, ...`` and writes ``p_out[row * P + split]``."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // P
    split = pid - row * P
    if PER_CHANNEL:
        d = tl.load(p_delta + row)
    else:
        d = tl.load(p_delta)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(split, tl.cdiv(ROW, BLOCK), P):
        cols = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = cols < ROW
        x = tl.load(p_x + row * ROW + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(p_g + row * ROW + cols, mask=m, other=0.0).to(tl.float32)
        scale, xs, c = _fp8_codes(x, d, FMAX, MBITS, EMIN)
        inside = (xs >= -FMAX) & (xs <= FMAX)
        acc += tl.where(m, g * tl.where(inside, c - xs, c), 0.0)
    tl.store(p_out + pid, tl.sum(acc, axis=0))


def _flat(x: torch.Tensor, per_channel: bool) -> torch.Tensor | None:
    """``x``'s storage as a 1-D view when the kernels may walk it in memory order, else None."""
    if x.is_contiguous():
        return x.view(-1)
    y = torch.empty_like(x, device="meta")
    if y.stride() != x.stride():  # not dense: empty_like lays it out afresh
        return None
    if per_channel and x.dim() and x.shape[0] > 1 and x.stride(0) != x.numel() // x.shape[0]:
        return None
    return x.as_strided((x.numel(),), (1,))


def fp8_fake_quant_triton(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int, with_mask: bool,
                          wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_fake_quant`` in one launch: ``(y, mask)`` laid out like ``torch.empty_like(x)`` (mask empty
    unless ``with_mask``)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fp8_fake_quant: x must be float32, float16 or bfloat16, got {x.dtype}")
    mbits, emin = FP8_BITS[fmt]
    per_channel = axis == 0
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    flat = _flat(x, per_channel)
    staged = flat is None or (with_mask and _flat(mask, per_channel) is None) or _flat(y, per_channel) is None
    if staged:
        flat = x.contiguous().view(-1)
        y_flat, m_flat = torch.empty_like(flat), torch.empty(flat.shape, dtype=torch.bool, device=x.device)
    else:
        y_flat = _flat(y, per_channel)
        m_flat = _flat(mask, per_channel) if with_mask else y_flat
    n = x.numel()
    if n:
        row = n // x.shape[0] if per_channel else n
        with device_ctx(x):
            (_fp8_fake_quant_kernel if wrap is None else wrap(_fp8_fake_quant_kernel))[(triton.cdiv(n, _BLOCK),)](
                flat, y_flat, m_flat.view(torch.uint8) if with_mask else y_flat, delta.contiguous(), n, row,
                FMAX=fp8_max(fmt), MBITS=mbits, EMIN=emin, PER_CHANNEL=per_channel, HAS_MASK=bool(with_mask),
                BLOCK=_BLOCK, num_warps=4, **(LAUNCH_OPTS if wrap is None else {}),
            )
    if staged:
        y.copy_(y_flat.view(x.shape))
        if with_mask:
            mask.copy_(m_flat.view(x.shape))
    return y, mask


def fp8_range_grads_triton(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int,
                           wrap=None) -> torch.Tensor:
    """The LSQ gradient of ``delta`` (its shape, fp32): per-row partial sums (one launch), their sum and
    the ``delta >= EPS`` gate."""
    mbits, emin = FP8_BITS[fmt]
    per_channel = axis == 0
    rows = x.shape[0] if per_channel else 1
    n = x.numel()
    row = n // rows if rows else 0
    splits = 1 if per_channel else max(1, min(_GRAD_SPLITS, triton.cdiv(max(row, 1), _BLOCK)))
    out = torch.empty(rows * splits, dtype=torch.float32, device=x.device)
    if n:
        with device_ctx(x):
            (_fp8_range_grads_kernel if wrap is None else wrap(_fp8_range_grads_kernel))[(rows * splits,)](
                grad.contiguous(), x.contiguous(), delta.contiguous(), out, row, splits,
                FMAX=fp8_max(fmt), MBITS=mbits, EMIN=emin, PER_CHANNEL=per_channel, BLOCK=_BLOCK, num_warps=4,
                **(LAUNCH_OPTS if wrap is None else {}),
            )
    else:
        out.zero_()
    total = out.view(rows, splits).sum(dim=1)
    total = total if per_channel else total.reshape(())
    return (total * (delta >= 1e-8)).to(delta.dtype)


# the same launches as torch.library.triton_op: what traced code calls on GPU tensors (see _triton_ops.py;
# these kernels' values do not depend on FMA contraction, which inductor's launches may enable)


@triton_op("tquant::fp8_fake_quant_triton", mutates_args=())
def fp8_fake_quant_op(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int,
                      with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``tquant::fp8_fake_quant`` as a ``triton_op``; autograd in ``fp8.py``."""
    return fp8_fake_quant_triton(x, delta, fmt, axis, with_mask, wrap=wrap_triton)


@triton_op("tquant::fp8_fake_quant_range_grads_triton", mutates_args=())
def fp8_range_grads_op(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int) -> torch.Tensor:
    return fp8_range_grads_triton(grad, x, delta, fmt, axis, wrap=wrap_triton)


masked_autograd("fp8_fake_quant_triton", fp8_fake_quant_op, fp8_range_grads_op, 1)
