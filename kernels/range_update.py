"""Range estimation for the min/max estimators: the ``tquant::update_range`` op family.

One call does what aihwkit spreads over a range estimator and ``set_quant_range``:

1. the batch range: min and max of the finite values of ``x`` (per tensor or per channel);
2. the running range: ``current`` (this batch), ``all`` (min of mins, max of maxes) or
   ``running`` (``(1 - m) * batch + m * old``); the first batch always sets it;
3. the quantizer parameters from the running range (clamp to ``x_min <= 0 < x_max``,
   symmetric sign, ``delta``, ``zero_float``), written in place.

No host synchronisation on the Triton path and on CUDA. A NaN in the running range means "no
range yet" (that channel takes the batch range), so callers need not know whether a batch is the
first; ``first=True`` forces it (every channel takes the batch range). Non-finite values never
reach the scale: they are left out of the batch range, and a batch without a finite value (empty,
all NaN/inf) leaves the running range as it was — NaN ("no range yet") when there was none, so a
quantizer that never saw a finite value stays uninitialised.

``batch_minmax`` and ``finalize_range`` are the two halves, for callers that must combine
the batch range across processes (``tquant.convert_sync_ranges``) before the update.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import backend
from ._ops import ANY_LAYOUT, define_op
from .fake_quant import chunked_fits, host_array
from .host_chunks import chunked_minmax
from .host_math import F32, qparams_f32, qparams_host, update_range_f32, update_range_host, write_state
from .inline import inline_ok, update_range_inline
from .reference import (
    ESTIMATOR_ALL,
    ESTIMATOR_CURRENT,
    ESTIMATOR_RUNNING,
    batch_minmax_reference,
    qparams_from_range,
    update_range_reference,
)

__all__ = [
    "ESTIMATOR_ALL",
    "ESTIMATOR_CURRENT",
    "ESTIMATOR_RUNNING",
    "batch_minmax",
    "finalize_range",
    "range_workspace",
    "update_range",
]


def range_workspace(n_channels: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scratch state of the one-launch Triton range update for ``n_channels`` channels (1 per tensor).

    ``(minmax, counter)``: fp32 ``[2 * C]`` holding +inf (the batch minimum, ``[0, C)``) and -inf (the
    maximum, ``[C, 2C)``), and an int32 ``[1]`` arrival counter at 0 — the state every launch leaves them
    in. A quantizer owns one (buffers made with its other state, so they exist before any CUDA-graph
    capture); the launches of one quantizer run in stream order.
    """
    c = max(int(n_channels), 1)
    minmax = torch.empty(2 * c, device=device)
    minmax[:c] = math.inf
    minmax[c:] = -math.inf
    return minmax, torch.zeros(1, dtype=torch.int32, device=device)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as 1-D in memory order: a view when ``x`` is dense in any dim order (channels-last too),
    a copy only for gapped strides. Reductions over all elements need no particular order."""
    if x.is_contiguous():
        return x.view(-1)
    perm = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.shape[d]), reverse=True)
    y = x.permute(perm)
    return y.view(-1) if y.is_contiguous() else x.reshape(-1)


def _batch_minmax_torch(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``aminmax`` pass; a second, masked pass only when the result is not finite."""
    xd = x.detach()
    rows = 1 if axis < 0 else x.shape[0]
    if xd.numel() == 0 or rows == 0:
        return batch_minmax_reference(xd, axis)
    if axis < 0:
        bmin, bmax = torch.aminmax(_flat(xd))
    else:  # per row: amin and amax vectorise along the row; aminmax(dim=1) is several times slower on the CPU
        xr = xd.reshape(rows, -1)
        bmin, bmax = xr.amin(dim=1), xr.amax(dim=1)
    bmin, bmax = bmin.float() + 0.0, bmax.float() + 0.0  # a zero extreme is +0.0, as in the reference
    if xd.device.type == "cpu":
        # On the CPU a value check costs no device round trip: pay the masked pass only if needed.
        if np.isfinite(bmin.numpy()).all() and np.isfinite(bmax.numpy()).all():
            return bmin, bmax
        return batch_minmax_reference(xd, axis)
    finite = torch.isfinite(bmin) & torch.isfinite(bmax)
    mmin, mmax = batch_minmax_reference(xd, axis)
    return torch.where(finite, bmin, mmin), torch.where(finite, bmax, mmax)


def _finalize_host(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric,
                   estimator, momentum, first):
    """``_finalize_torch`` for CPU tensors: the scalar math in numpy float32, five copies out."""
    lo, hi = bmin.numpy(), bmax.numpy()
    old_lo = None if first else range_min.numpy()
    old_hi = None if first else range_max.numpy()
    new_lo, new_hi = update_range_host(lo, hi, old_lo, old_hi, estimator, momentum, first)
    d, z, s = qparams_host(new_lo, new_hi, n_bits, symmetric)
    write_state((new_lo, new_hi, d, z, s), (range_min, range_max, delta, zero_float, signed))


def _finalize_torch(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric,
                    estimator, momentum, first):
    if bmin.device.type == "cpu":
        _finalize_host(bmin.detach(), bmax.detach(), range_min.detach(), range_max.detach(), delta, zero_float,
                       signed, n_bits, symmetric, estimator, momentum, first)
        return
    new_min, new_max = update_range_reference(bmin, bmax, range_min, range_max, estimator, momentum, first)
    d, z, s = qparams_from_range(new_min, new_max, n_bits, symmetric)
    range_min.copy_(new_min)
    range_max.copy_(new_max)
    delta.copy_(d)
    zero_float.copy_(z)
    signed.copy_(s)


def _batch_minmax_op(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (fp32) of the finite values of ``x``: 0-dim (``axis=-1``) or ``[C]`` (``axis=0``)."""
    impl = backend.resolve(x)
    if impl == "triton":
        from ._triton_range import batch_minmax_triton

        return batch_minmax_triton(x, axis)
    if impl == "reference":
        return batch_minmax_reference(x, axis)
    return _batch_minmax_torch(x, axis)


batch_minmax = define_op("batch_minmax", _batch_minmax_op, tags=ANY_LAYOUT)


@torch.library.register_fake("tquant::batch_minmax")
def _(x, axis):
    shape = () if axis < 0 else (x.shape[0],)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _finalize_range_op(
    bmin: torch.Tensor,
    bmax: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    estimator: int,
    momentum: float,
    first: bool,
) -> None:
    """Update the running range from a batch range and write the quantizer parameters in place."""
    if backend.resolve(bmin) == "triton":
        from ._triton_range import finalize_range_triton

        finalize_range_triton(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric,
                              estimator, momentum, first)
        return
    _finalize_torch(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric,
                    estimator, momentum, first)


_MUTATED = ("range_min", "range_max", "delta", "zero_float", "signed")
finalize_range = define_op("finalize_range", _finalize_range_op, mutates_args=_MUTATED)


@torch.library.register_fake("tquant::finalize_range")
def _(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, estimator, momentum,
      first):
    return None


def update_range(x: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor, delta: torch.Tensor,
                 zero_float: torch.Tensor, signed: torch.Tensor, n_bits: int, symmetric: bool, axis: int,
                 estimator: int, momentum: float, first: bool, workspace: tuple | None = None) -> None:
    """Estimate the range of ``x`` and set the quantizer parameters, all in place.

    Args:
        x: the tensor to be quantized (any shape, dtype, strides); not modified.
        range_min, range_max: fp32 running range, 0-dim or ``[C]``; read unless ``first``
            (NaN: no range yet).
        delta, zero_float: fp32 quantizer parameters of the same shape, overwritten.
        signed: bool 0-dim, overwritten (symmetric sign; False for asymmetric quantizers).
        estimator: ``ESTIMATOR_CURRENT``, ``ESTIMATOR_ALL`` or ``ESTIMATOR_RUNNING``.
        momentum: EMA momentum ``m`` of the running estimator.
        first: ignore the running range (this batch sets it), as if it were all NaN.
        workspace: the Triton range update's ``(minmax, counter)`` (:func:`range_workspace`), used by
            traced code on the Triton lane (a quantizer passes its own; without it one is made per call).

    Traced code calls the registered op ``tquant::update_range``, on the CPU under ``torch.compile`` its
    reference expressions (``inline.py``), on the Triton lane ``tquant::update_range_triton`` (inductor
    launches the kernel itself); eager code calls its implementation directly (no dispatch overhead).
    """
    args = (n_bits, symmetric, axis, estimator, momentum, first)
    if not torch.compiler.is_compiling():
        _update_range_impl(x, range_min, range_max, delta, zero_float, signed, *args)
    elif inline_ok(x):
        update_range_inline(x, range_min, range_max, delta, zero_float, signed, *args)
    elif backend.resolve(x) == "triton":
        from . import _triton_ops

        if not _triton_ops.traced_triton(x):
            update_range_op(x, range_min, range_max, delta, zero_float, signed, *args)
            return
        if workspace is None:
            workspace = range_workspace(x.shape[0] if axis >= 0 else 1, x.device)
        _triton_ops.update_range_triton(x, *workspace, range_min, range_max, delta, zero_float, signed, *args)
    else:
        update_range_op(x, range_min, range_max, delta, zero_float, signed, *args)


def _update_range_op(
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
    """The registered op behind :func:`update_range` (same arguments)."""
    _update_range_impl(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, axis, estimator,
                       momentum, first)


def _update_range_scalar(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, estimator,
                         momentum, first):
    """CPU, per tensor: one ``aminmax`` (chunk by chunk on threads for large tensors, as the fake
    quantization that follows), the scalar math on float32 scalars, five fills."""
    xd = x.detach()
    if chunked_fits(xd):
        lo, hi = chunked_minmax(host_array(xd))
        lo, hi = F32(lo + F32(0.0)), F32(hi + F32(0.0))  # a zero extreme is +0.0
    elif xd.numel():
        lo_t, hi_t = torch.aminmax(_flat(xd))
        lo, hi = F32(lo_t.item() + 0.0), F32(hi_t.item() + 0.0)  # a zero extreme is +0.0
    else:
        lo, hi = F32(math.inf), F32(-math.inf)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo_t, hi_t = batch_minmax_reference(xd, -1)
        lo, hi = F32(lo_t.item()), F32(hi_t.item())
    old_lo, old_hi = (F32(math.nan), F32(math.nan)) if first else (F32(range_min.item()), F32(range_max.item()))
    lo, hi = update_range_f32(lo, hi, old_lo, old_hi, estimator, momentum)
    d, z, s = qparams_f32(lo, hi, n_bits, symmetric)
    range_min.fill_(float(lo))
    range_max.fill_(float(hi))
    delta.fill_(float(d))
    zero_float.fill_(float(z))
    signed.fill_(s)


def _update_range_impl(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, axis, estimator,
                       momentum, first):
    impl = backend.resolve(x)
    if impl == "torch" and axis < 0 and x.device.type == "cpu":
        _update_range_scalar(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, estimator,
                             momentum, first)
        return
    if impl == "triton":
        from ._triton_range import update_range_triton

        update_range_triton(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, axis,
                            estimator, momentum, first)
        return
    bmin, bmax = batch_minmax_reference(x, axis) if impl == "reference" else _batch_minmax_torch(x, axis)
    _finalize_torch(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric,
                    estimator, momentum, first)


update_range_op = define_op("update_range", _update_range_op, mutates_args=_MUTATED, tags=ANY_LAYOUT)


@torch.library.register_fake("tquant::update_range")
def _(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, axis, estimator, momentum,
      first):
    return None
