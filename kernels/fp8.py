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
  range, the min/max estimators' update and ``delta``, in place, with no host synchronisation on a GPU
  (Triton: one launch of the integer quantizers' range kernel with the FP8 grid; torch: ``batch_minmax`` and
  a few tensor ops).
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
           "fp8_finalize_range", "fp8_update_range", "fp8_update_range_op"]

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
    per_tensor_ok = axis < 0 and tuple(delta.shape) in ((), (1,))  # 0-dim, or [1] (sharded state)
    if (tuple(delta.shape) != want and not per_tensor_ok) or delta.device != x.device:
        raise ValueError(
            f"fp8 quantization: delta of shape {tuple(delta.shape)} on {delta.device} does not match x of shape "
            f"{tuple(x.shape)} on {x.device} with axis={axis} (expected {want})"
        )


def like_empty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the layout of ``torch.empty_like(x)`` (what the ops' fake kernels promise)."""
    if x.is_contiguous() and y.is_contiguous():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    return y if out.stride() == y.stride() else out.copy_(y)


def _fp8_fake_quant_torch(x, delta, fmt, axis, with_mask):
    top = fp8_max(fmt)
    scale = torch.clamp(delta.float(), min=EPS)
    s = param_view(scale, x, axis) if axis >= 0 else scale.reshape(())
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
    if op is fp8_fake_quant_forward and backend.resolve(x) == "triton":
        from . import _triton_ops

        if _triton_ops.traced_triton(x):  # a triton_op: inductor launches the kernel itself
            from ._triton_fp8 import fp8_fake_quant_op as op
    y, _ = op(x, delta, fmt, axis, with_mask)
    return y


def _fp8_update_range_impl(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first, state=None):
    """The range update on ``x``'s lane. Triton: one launch of the integer quantizers' range kernel with the
    FP8 grid (``_triton_range``: ``full = max``, ``half = max + 1``, so the symmetric ``delta`` is
    ``max(|x_min|, x_max) / max``), writing ``zero_float`` (0) and ``signed`` (unused) too: ``state`` gives
    those and the quantizer's workspace ``(zero_float, signed, workspace, arrivals)``, else temporaries."""
    _check(x, delta, fmt, axis)
    if backend.resolve(x) == "triton":
        from ._triton_plan import plan_for
        from ._triton_range import launch_update_range, plan_workspace

        plan = plan_for(x, axis)
        if state is None:
            state = (torch.empty_like(delta), torch.empty((), dtype=torch.bool, device=x.device),
                     *plan_workspace(plan))
        zero_float, signed, *workspace = state
        top = fp8_max(fmt)
        launch_update_range(plan, x.detach(), workspace, range_min, range_max, delta, zero_float, signed, 8, True,
                            estimator, momentum, first, grid=(top, top + 1.0))
        return
    bmin, bmax = _batch_minmax_op(x.detach(), axis)
    fp8_finalize_range(bmin, bmax, range_min, range_max, delta, fmt, estimator, momentum, first)


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
    _fp8_update_range_impl(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first)


def fp8_finalize_range(bmin, bmax, range_min, range_max, delta, fmt: str, estimator: int, momentum: float,
                       first: bool) -> None:
    """The estimator's update of the running range from a batch range, and ``delta``, in place (a few
    ops on the range tensors; no host synchronisation)."""
    with torch.no_grad():
        new_min, new_max = update_range_reference(bmin, bmax, range_min, range_max, estimator, momentum, first)
        range_min.copy_(new_min)
        range_max.copy_(new_max)
        delta.copy_(fp8_qparams_from_range(new_min, new_max, fmt))


fp8_update_range_op = define_op("fp8_update_range", _fp8_update_range_op,
                                mutates_args=("range_min", "range_max", "delta"))


def fp8_update_range(x: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor, delta: torch.Tensor,
                     fmt: str, axis: int, estimator: int, momentum: float, first: bool,
                     state: tuple | None = None) -> None:
    """The op's work from eager or traced code. ``state``: the quantizer's ``(zero_float, signed, workspace,
    arrivals)``; with it, traced code on the Triton lane calls ``tquant::update_range_triton`` with the FP8 grid
    (a ``triton_op``: inductor launches the kernel itself), else the registered op ``tquant::fp8_update_range``."""
    if not torch.compiler.is_compiling():
        _fp8_update_range_impl(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first, state)
        return
    if state is not None and backend.resolve(x) == "triton":
        from . import _triton_ops

        if _triton_ops.traced_triton(x):
            zero_float, signed, workspace, arrivals = state
            _triton_ops.update_range_triton(x, workspace, arrivals, range_min, range_max, delta, zero_float, signed,
                                            8, True, axis, estimator, momentum, first, fp8_max(fmt))
            return
    fp8_update_range_op(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first)


@torch.library.register_fake("tquant::fp8_update_range")
def _(x, range_min, range_max, delta, fmt, axis, estimator, momentum, first):
    return None


class Fp8Call:
    """An FP8 quantizer's eager forward, planned once per input layout (as ``QuantizerCall``).

    ``state``: the ``(dict, key)`` pairs of ``delta``, ``zero_float``, ``signed``, ``range_min``,
    ``range_max`` and the estimator's workspace (FP8 uses ``delta`` and the range only). ``train(x)``: the
    range update and ``delta``, then the fake quantization; ``fixed(x)``: the fake quantization alone.
    """

    def __init__(self, x: torch.Tensor, fmt: str, axis: int, estimator: int | None, momentum: float, state):
        fp8_max(fmt)
        self.lane = backend.resolve(x)
        self.fmt, self.axis = fmt, axis
        self.fused = estimator is not None
        self.estimator, self.momentum = estimator, float(momentum)
        self.state = state

    def update(self, x: torch.Tensor) -> None:
        (d, kd), (z, kz), (s, ks), (lo, klo), (hi, khi) = self.state[:5]
        state = (z[kz], s[ks], *(b[k] for b, k in self.state[5:7])) if len(self.state) >= 7 else None
        _fp8_update_range_impl(x.detach(), lo[klo], hi[khi], d[kd], self.fmt, self.axis, self.estimator,
                               self.momentum, False, state)

    def train(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return self.fixed(x)

    def fixed(self, x: torch.Tensor) -> torch.Tensor:
        d, kd = self.state[0]
        return fp8_fake_quant(x, d[kd], self.fmt, self.axis)
