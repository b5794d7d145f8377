"""FP8 fake quantization: the ``tquant::fp8_*`` op family and the manager's planned call.

The numerics are :mod:`tquant.kernels.fp8_reference`'s (``y = scale * fp8(clamp(x / scale, -max, max))``,
one scale per tensor or per channel along dim 0), bit for bit on every lane:

- ``torch``: the reference's expression without its autograd node (``Tensor.to(float8)`` rounds to
  nearest even, as onnxruntime's ``QuantizeLinear`` does);
- ``triton``: ``_triton_fp8.py``, whose rounding is built from the fp32 exponent (it needs no FP8
  hardware: the same code runs in the interpreter, on sm_80 and on sm_90);
- ``reference``: the eager reference with autograd through it.

Ops (``torch.library``, with fake kernels):

- ``fp8_fake_quant(x, delta, fmt, axis, with_mask) -> (y, mask)``: ``y`` and the 1-byte in-range mask
  ``-max <= x / scale <= max`` laid out like ``torch.empty_like(x)``; autograd ``grad * mask`` for ``x`` and,
  with a learned scale, ``fp8_fake_quant_range_grads``;
- ``fp8_update_range(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first)``: the batch
  range (``batch_minmax``), the min/max estimators' update and ``delta``, in place, with no host
  synchronisation on a GPU.
"""

from __future__ import annotations

import torch

from . import backend
from ._masked_autograd import masked_autograd
from ._ops import define_op
from .fp8_reference import FP8_DTYPES, fp8_fake_quant_reference, fp8_max, fp8_qparams_from_range
from .range_update import _batch_minmax_op
from .reference import EPS, param_view, update_range_reference

__all__ = ["Fp8Call", "fp8_fake_quant", "fp8_fake_quant_forward", "fp8_fake_quant_range_grads",
           "fp8_finalize_range", "fp8_update_range"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int) -> None:
    fp8_max(fmt)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp8 quantization: x must be a float tensor, got {x.dtype}")
    if axis not in (-1, 0):
        raise ValueError(f"fp8 quantization: axis must be -1 (per tensor) or 0 (per channel), got {axis}")
    want = (x.shape[0],) if axis == 0 and x.dim() else ()
    if axis == 0 and x.dim() == 0:
        raise ValueError("fp8 quantization: per-channel scales (axis=0) need x.dim() >= 1")
    per_tensor_param = axis < 0 and tuple(delta.shape) == (1,)  # a quantizer's per-tensor state is [1] (FSDP2)
    if (tuple(delta.shape) != want and not per_tensor_param) or delta.device != x.device:
        raise ValueError(
            f"fp8 quantization: delta of shape {tuple(delta.shape)} on {delta.device} does not match x of shape "
            f"{tuple(x.shape)} on {x.device} with axis={axis} (expected {want or '() or (1,)'})"
        )


def like_empty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the layout of ``torch.empty_like(x)`` (what the ops' fake kernels promise)."""
    if x.is_contiguous() and y.is_contiguous():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    return y if out.stride() == y.stride() else out.copy_(y)


def _fp8_fake_quant_torch(x, delta, fmt, axis, with_mask):
    top = fp8_max(fmt)
    s = param_view(torch.clamp(delta.float(), min=EPS), x, axis)
    v = torch.div(x.float(), s)
    mask = like_empty(x, (v >= -top) & (v <= top)) if with_mask else x.new_empty(0, dtype=torch.bool)
    c = v.clamp_(-top, top).to(FP8_DTYPES[fmt]).float()
    return like_empty(x, c.mul_(s).to(x.dtype)), mask


def _fp8_range_grads_torch(grad, x, delta, fmt, axis):
    top = fp8_max(fmt)
    s = param_view(torch.clamp(delta.float(), min=EPS), x, axis)
    xs = x.float() / s
    inside = (xs >= -top) & (xs <= top)
    c = torch.clamp(xs, -top, top).to(FP8_DTYPES[fmt]).float()
    g = grad.float() * torch.where(inside, c - xs, c)
    dims = tuple(range(1, x.dim())) if axis >= 0 else tuple(range(x.dim()))
    g = g.sum(dim=dims) if dims else g
    return (g * (delta >= EPS)).to(delta.dtype)


def _fp8_fake_quant_impl(x, delta, fmt, axis, with_mask):
    _check(x, delta, fmt, axis)
    if backend.resolve(x) == "triton":
        from ._triton_fp8 import fp8_fake_quant_triton

        return fp8_fake_quant_triton(x, delta, fmt, axis, with_mask)
    return _fp8_fake_quant_torch(x, delta, fmt, axis, with_mask)


def _fp8_fake_quant_op(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int,
                       with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)`` like ``torch.empty_like(x)`` (mask bool; empty unless ``with_mask``)."""
    return _fp8_fake_quant_impl(x, delta, fmt, axis, with_mask)


fp8_fake_quant_forward = define_op("fp8_fake_quant", _fp8_fake_quant_op)


@torch.library.register_fake("tquant::fp8_fake_quant")
def _(x, delta, fmt, axis, with_mask):
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    return torch.empty_like(x), mask


def _fp8_range_grads_op(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int) -> torch.Tensor:
    """The LSQ gradient of ``delta``: ``sum(grad * where(inside, c - x / s, c)) * (delta >= EPS)`` per tensor or
    channel, ``c`` the FP8 value of the clamped ``x / s``."""
    _check(x, delta, fmt, axis)
    if backend.resolve(x) == "triton":
        from ._triton_fp8 import fp8_range_grads_triton

        return fp8_range_grads_triton(grad, x, delta, fmt, axis)
    return _fp8_range_grads_torch(grad, x, delta, fmt, axis)


fp8_fake_quant_range_grads = define_op("fp8_fake_quant_range_grads", _fp8_range_grads_op)


@torch.library.register_fake("tquant::fp8_fake_quant_range_grads")
def _(grad, x, delta, fmt, axis):
    return torch.empty_like(delta)


_Fp8FakeQuantFunction = masked_autograd("fp8_fake_quant", _fp8_fake_quant_impl, fp8_fake_quant_range_grads, 1)


def fp8_fake_quant(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int = -1) -> torch.Tensor:
    """Fake-quantize ``x`` to FP8 with a fixed scale; differentiable in ``x`` and ``delta``.

    Args:
        x: any shape, fp32/fp16/bf16, any strides.
        delta: fp32, 0-dim (``axis=-1``) or ``[x.shape[0]]`` (``axis=0``); ``scale = max(delta, EPS)``.
        fmt: ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    Returns:
        ``y`` like ``torch.empty_like(x)``. Backward saves the 1-byte mask, plus ``x`` when ``delta``
        requires grad.

    Example:
        >>> fp8_fake_quant(torch.tensor([0.3, 1000.0]), torch.tensor(1.0), "fp8_e4m3")
        tensor([  0.3125, 448.0000])
    """
    if backend.resolve(x) == "reference":
        return fp8_fake_quant_reference(x, delta, fmt, axis)
    with_mask = torch.is_grad_enabled() and x.requires_grad
    op = fp8_fake_quant_forward if torch.compiler.is_compiling() else _Fp8FakeQuantFunction.apply
    y, _ = op(x, delta, fmt, axis, with_mask)
    return y


def _fp8_update_range_op(
    x: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    delta: torch.Tensor,
    fmt: str,
    axis: int,
    estimator: int,
    momentum: float,
    first: bool,
) -> None:
    """The batch range of ``x`` (finite values), the estimator's update and ``delta``, written in place."""
    _check(x, delta, fmt, axis)
    bmin, bmax = _batch_minmax_op(x.detach(), axis)
    fp8_finalize_range(bmin, bmax, range_min, range_max, delta, fmt, estimator, momentum, first)


def fp8_finalize_range(bmin, bmax, range_min, range_max, delta, fmt: str, estimator: int, momentum: float,
                       first: bool) -> None:
    """The estimator's update of the running range from a batch range, and ``delta``, in place (a few
    ops on the range tensors; no host synchronisation)."""
    with torch.no_grad():
        new_min, new_max = update_range_reference(bmin, bmax, range_min, range_max, estimator, momentum, first)
        range_min.copy_(new_min)
        range_max.copy_(new_max)
        delta.copy_(fp8_qparams_from_range(new_min, new_max, fmt))


fp8_update_range = define_op("fp8_update_range", _fp8_update_range_op,
                             mutates_args=("range_min", "range_max", "delta"))


@torch.library.register_fake("tquant::fp8_update_range")
def _(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first):
    return None


class Fp8Call:
    """An FP8 quantizer's eager forward, planned once per input layout (as ``QuantizerCall``).

    ``state``: the ``(dict, key)`` pairs of ``delta``, ``zero_float``, ``signed``, ``range_min``,
    ``range_max`` (``zero_float`` and ``signed`` are not used by FP8). ``train(x)``: range update and
    ``delta``, then the fake quantization; ``fixed(x)``: the fake quantization alone.
    """

    def __init__(self, x: torch.Tensor, fmt: str, axis: int, estimator: int | None, momentum: float, state):
        fp8_max(fmt)
        self.lane = backend.resolve(x)
        self.fmt, self.axis = fmt, axis
        self.fused = estimator is not None
        self.estimator, self.momentum = estimator, float(momentum)
        self.state = state

    def update(self, x: torch.Tensor) -> None:
        (d, kd), _, _, (lo, klo), (hi, khi) = self.state[:5]
        _fp8_update_range_op(x.detach(), lo[klo], hi[khi], d[kd], self.fmt, self.axis, self.estimator,
                             self.momentum, False)

    def train(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return self.fixed(x)

    def fixed(self, x: torch.Tensor) -> torch.Tensor:
        d, kd = self.state[0]
        return fp8_fake_quant(x, d[kd], self.fmt, self.axis)
