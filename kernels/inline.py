"""Quantizer math that ``torch.compile`` sees through, for CPU tensors on the torch backend.

Inductor cannot fuse into a registered op: called through ``tquant::update_range`` and
``tquant::fake_quant``, a CPU quantizer costs a min/max pass plus six elementwise passes and a
mask pass, as in eager. Written with the reference's own expressions instead, inductor compiles
the range update into one reduction and the fake quantization (with its mask) into one loop, fused
with the ops around it. The values are the reference's: same expressions in the same order, true
division, ``round`` half to even, no contraction (inductor's CPU default ``-ffp-contract=off``);
``tests/test_compile.py`` checks them bit for bit against eager.

Used only where :func:`inline_ok` says so: while compiling (not exporting: ``torch.export`` keeps
the ops so the graph names them), on CPU tensors under the torch backend, and without learned
ranges (their LSQ gradients stay in the op's autograd formula). CUDA tensors keep the Triton ops.
"""

from __future__ import annotations

import torch

from . import backend
from .reference import (
    EPS,
    batch_minmax_reference,
    grid_bounds,
    param_view,
    qparams_from_range,
    update_range_reference,
)

__all__ = ["fake_quant_inline", "inline_ok", "update_range_inline"]


def inline_ok(x: torch.Tensor) -> bool:
    """True when traced code should use this module instead of the ``tquant`` ops for ``x``."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and x.device.type == "cpu" and backend.resolve(x) == "torch")


def _batch_minmax(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_minmax_reference`` reduced over dims rather than a reshaped view: inductor then walks
    ``x`` in memory order (a channels-last activation too) with vector loads."""
    if x.numel() == 0 or x.dim() == 0:
        return batch_minmax_reference(x, axis)
    xf = x.float()
    finite = torch.isfinite(xf)
    dims = tuple(range(1 if axis >= 0 else 0, x.dim()))
    if not dims:  # per channel on a 1-D tensor: each element is its channel
        inf = torch.full_like(xf, float("inf"))
        return torch.where(finite, xf, inf), torch.where(finite, xf, -inf)
    return (torch.where(finite, xf, float("inf")).amin(dim=dims) + 0.0,  # a zero extreme is +0.0
            torch.where(finite, xf, -float("inf")).amax(dim=dims) + 0.0)


def update_range_inline(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, axis, estimator,
                        momentum, first) -> None:
    """``tquant::update_range`` (same arguments, same in-place writes) as reference expressions."""
    with torch.no_grad():
        bmin, bmax = _batch_minmax(x, axis)
        new_min, new_max = update_range_reference(bmin, bmax, range_min, range_max, estimator, momentum, first)
        d, z, s = qparams_from_range(new_min, new_max, n_bits, symmetric)
        for dst, src in ((range_min, new_min), (range_max, new_max), (delta, d), (zero_float, z), (signed, s)):
            dst.copy_(src)


class _InlineFakeQuant(torch.autograd.Function):
    """``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)``; backward ``grad * mask``.

    Saves the in-range mask (NaN: out of range) as uint8 0/1, made from a float select: inductor's
    CPU code stores a bool computed from comparisons ten times slower than that. No gradient for the
    range. The expression is written out rather than taken from ``fake_quant_reference``, whose
    straight-through round (an ``autograd.Function``) compiled to a slower graph here.
    """

    @staticmethod
    def forward(ctx, x, delta, zero_float, signed, n_bits: int, symmetric: bool, axis: int):
        scale = param_view(torch.clamp(delta, min=EPS), x, axis)
        qmin, qmax = grid_bounds(n_bits, symmetric, signed)
        v = torch.round(x.float() / scale)
        zp = None
        if not symmetric:
            zp = param_view(torch.clamp(torch.round(zero_float), 0.0, float(2**n_bits - 1)), x, axis)
            v = v + zp
        else:
            v = v + 0.0  # the reference adds zp = 0: round's -0.0 becomes +0.0
        c = torch.clamp(v, qmin, qmax)
        ctx.save_for_backward(torch.where((v >= qmin) & (v <= qmax), 1.0, 0.0).to(torch.uint8))
        return (scale * (c if zp is None else c - zp)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None, None  # a bool derived from mask would be saved


def fake_quant_inline(x, delta, zero_float, signed, n_bits: int, symmetric: bool, axis: int) -> torch.Tensor:
    """``tquant::fake_quant``'s ``y`` with its straight-through gradient in ``x`` (fixed range)."""
    return _InlineFakeQuant.apply(x, delta, zero_float, signed, n_bits, symmetric, axis)
