"""Group-wise quantization: the ``tquant::group_*`` op family and the manager's planned call.

The numerics are :mod:`tquant.kernels.group_reference`'s (a tensor seen as ``[C, K]``, one parameter
per row and group of ``group_len`` elements), bit for bit on every lane:

- ``torch``: the groups as rows of a ``[C * n_groups, group_len]`` view (a copy padded to whole groups
  only when ``group_len`` does not divide K), run through the per-channel torch path of
  ``fake_quant.py`` / ``range_update.py``, whose values are the reference's;
- ``triton``: the kernels of ``_triton_group.py`` (CUDA tensors, or the interpreter);
- ``reference``: the eager reference with autograd through it (``TQUANT_BACKEND=reference``).

Ops (``torch.library``, with fake kernels, so ``torch.compile`` and ``torch.export`` trace them):

- ``group_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask) -> (y, mask)``:
  ``y`` contiguous in ``x``'s shape and dtype, ``mask`` its 1-byte in-range mask (empty unless asked);
  autograd: ``grad * mask`` for ``x`` and, with learned ranges, the LSQ gradients of ``delta`` /
  ``zero_float`` (``group_fake_quant_range_grads``, which recomputes them from the saved ``x``);
- ``group_minmax(x, group_len) -> (min, max)``: fp32 ``[C, n_groups]`` of the finite values;
- ``group_update_range(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, group_len,
  estimator, momentum, first)``: the min/max estimators' update and the parameters, in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from ._masked_autograd import masked_autograd
from ._ops import define_op
from .fake_quant import _qparams_fast, _quantize_in_place, _range_grads_torch
from .group_reference import group_fake_quant_reference, group_minmax_reference, group_shape
from .range_update import _finalize_torch

__all__ = [
    "GroupCall",
    "group_fake_quant",
    "group_fake_quant_forward",
    "group_fake_quant_range_grads",
    "group_minmax",
    "group_rows",
    "group_update_range",
    "group_update_range_op",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x: torch.Tensor, group_len: int, *params: torch.Tensor) -> tuple[int, int, int]:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"group quantization: x must be a float tensor, got {x.dtype}")
    c, k, ng = group_shape(x, group_len)
    for p in params:
        if tuple(p.shape) != (c, ng) or p.device != x.device:
            raise ValueError(
                f"group quantization: parameter of shape {tuple(p.shape)} on {p.device} does not match x of shape "
                f"{tuple(x.shape)} on {x.device} in groups of {group_len} (expected {(c, ng)})"
            )
    return c, k, ng


def _rows(x: torch.Tensor, c: int, k: int, ng: int, group_len: int, mode: str = "constant") -> torch.Tensor:
    """``x`` as ``[C * n_groups, group_len]``: a view when the groups tile K, else a copy whose last group
    is padded (``mode="replicate"`` repeats the row's last element, which leaves every group's min/max as
    it was; ``"constant"`` pads zeros, which add nothing to the LSQ sums)."""
    x2 = x.reshape(c, k)
    pad = ng * group_len - k
    if pad:
        x2 = F.pad(x2, (0, pad), mode=mode) if mode == "replicate" else F.pad(x2, (0, pad))
    return x2.reshape(c * ng, group_len)


def group_rows(x: torch.Tensor, group_len: int) -> torch.Tensor:
    """The groups of ``x`` as the rows of ``[C * n_groups, group_len]``, a row's last group padded with zeros
    (zero is on every grid: the MSE searches see no error there)."""
    c, k, ng = group_shape(x, group_len)
    return _rows(x, c, k, ng, group_len)


# --------------------------------------------------------------------------------------------
# torch lane
# --------------------------------------------------------------------------------------------


def _group_minmax_torch(x: torch.Tensor, group_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One amin/amax pass over the groups; the masked reference only when a result is not finite."""
    c, k, ng = group_shape(x, group_len)
    if c * ng == 0 or k == 0:
        return group_minmax_reference(x, group_len)
    rows = _rows(x.detach(), c, k, ng, group_len, "replicate")
    bmin = rows.amin(dim=1).float().reshape(c, ng) + 0.0  # a zero extreme is +0.0, as in the reference
    bmax = rows.amax(dim=1).float().reshape(c, ng) + 0.0
    if x.device.type == "cpu":
        if bool(torch.isfinite(bmin).all()) and bool(torch.isfinite(bmax).all()):
            return bmin, bmax
        return group_minmax_reference(x, group_len)
    finite = torch.isfinite(bmin) & torch.isfinite(bmax)
    mmin, mmax = group_minmax_reference(x, group_len)
    return torch.where(finite, bmin, mmin), torch.where(finite, bmax, mmax)


def _group_fake_quant_torch(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask):
    """``(y, mask)``: the per-channel torch path on the groups' rows, bit-identical to the reference."""
    c, k, ng = group_shape(x, group_len)
    rows = _rows(x, c, k, ng, group_len)
    scale, zp, qmin, qmax = _qparams_fast(delta, zero_float, signed, n_bits, symmetric)
    if x.device.type == "cpu":
        qmin, qmax = float(qmin), float(qmax)
    y, mask = _quantize_in_place(rows, scale.reshape(-1, 1), None if zp is None else zp.reshape(-1, 1), qmin, qmax,
                                 with_mask)
    if ng * group_len != k:
        y = y.reshape(c, ng * group_len)[:, :k]
        mask = mask.reshape(c, ng * group_len)[:, :k] if with_mask else mask
    y = y.reshape(x.shape)
    mask = mask.reshape(x.shape) if with_mask else x.new_empty(0, dtype=torch.bool)
    return y.contiguous(), mask.contiguous()


def _group_range_grads_torch(grad, x, delta, zero_float, signed, n_bits, symmetric, group_len):
    c, k, ng = group_shape(x, group_len)
    gd, gz = _range_grads_torch(_rows(grad, c, k, ng, group_len), _rows(x, c, k, ng, group_len), delta.reshape(-1),
                                zero_float.reshape(-1), signed, n_bits, symmetric, 0)
    return gd.reshape(c, ng), gz.reshape(c, ng)


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def _group_fake_quant_impl(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask):
    _check(x, group_len, delta, zero_float)
    if backend.resolve(x) == "triton":
        from ._triton_group import group_fake_quant_triton

        return group_fake_quant_triton(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask)
    return _group_fake_quant_torch(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask)


def _group_fake_quant_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)``: ``y`` contiguous like ``x``; ``mask`` bool like ``x`` (empty if not ``with_mask``)."""
    return _group_fake_quant_impl(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask)


group_fake_quant_forward = define_op("group_fake_quant", _group_fake_quant_op)


@torch.library.register_fake("tquant::group_fake_quant")
def _(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask):
    mask = x.new_empty(x.shape, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    return x.new_empty(x.shape), mask


def _group_range_grads_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_delta, grad_zero_float)`` of ``group_fake_quant`` for learned ranges (``[C, n_groups]``)."""
    _check(x, group_len, delta, zero_float)
    if backend.resolve(x) == "triton":
        from ._triton_group import group_range_grads_triton

        return group_range_grads_triton(grad, x, delta, zero_float, signed, n_bits, symmetric, group_len)
    return _group_range_grads_torch(grad, x, delta, zero_float, signed, n_bits, symmetric, group_len)


group_fake_quant_range_grads = define_op("group_fake_quant_range_grads", _group_range_grads_op)


@torch.library.register_fake("tquant::group_fake_quant_range_grads")
def _(grad, x, delta, zero_float, signed, n_bits, symmetric, group_len):
    return torch.empty_like(delta), torch.empty_like(zero_float)


_GroupFakeQuantFunction = masked_autograd("group_fake_quant", _group_fake_quant_impl, group_fake_quant_range_grads, 2)


def group_fake_quant(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
) -> torch.Tensor:
    """Fake-quantize ``x`` group-wise with fixed parameters; differentiable in ``x``, ``delta``, ``zero_float``.

    Args:
        x: ``[C, ...]``, fp32/fp16/bf16, any strides (seen as ``[C, K]`` in row-major order).
        delta, zero_float: fp32 ``[C, ceil(K / group_len)]``.
        signed: bool 0-dim (symmetric grids).
        group_len: elements of a ``[C, K]`` row per group.
    Returns:
        ``y``, contiguous, ``x``'s shape and dtype. Backward saves the 1-byte mask, plus ``x`` when
        ``delta`` or ``zero_float`` requires grad.

    Example:
        >>> w = torch.randn(4, 256)
        >>> d, z, s = qparams_from_range(*group_minmax(w, 128), 4, True)
        >>> group_fake_quant(w, d, z, s, 4, True, 128)
    """
    if backend.resolve(x) == "reference":
        return group_fake_quant_reference(x, delta, zero_float, signed, n_bits, symmetric, group_len)
    with_mask = torch.is_grad_enabled() and x.requires_grad
    op = group_fake_quant_forward if torch.compiler.is_compiling() else _GroupFakeQuantFunction.apply
    if op is group_fake_quant_forward and backend.resolve(x) == "triton":
        from . import _triton_ops

        if _triton_ops.traced_triton(x):  # a triton_op: inductor launches the kernel itself
            from ._triton_group import group_fake_quant_op as op
    y, _ = op(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask)
    return y


def _group_minmax_op(x: torch.Tensor, group_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (fp32 ``[C, n_groups]``) of the finite values of each group of ``x``."""
    _check(x, group_len)
    impl = backend.resolve(x)
    if impl == "triton":
        from ._triton_group import group_minmax_triton

        return group_minmax_triton(x, group_len)
    if impl == "reference":
        return group_minmax_reference(x, group_len)
    return _group_minmax_torch(x, group_len)


group_minmax = define_op("group_minmax", _group_minmax_op)


@torch.library.register_fake("tquant::group_minmax")
def _(x, group_len):
    c, _, ng = group_shape(x, group_len)
    return x.new_empty((c, ng), dtype=torch.float32), x.new_empty((c, ng), dtype=torch.float32)


def _group_update_range_op(
    x: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
    estimator: int,
    momentum: float,
    first: bool,
) -> None:
    """The group ranges of ``x``, the estimator's update and the parameters, written in place.

    ``range_min``/``range_max``/``delta``/``zero_float``: fp32 ``[C, n_groups]`` (a NaN range: no range
    yet); ``signed``: bool 0-dim. As ``update_range`` per group (``update_range_reference`` then
    ``qparams_from_range`` on the ``[C, n_groups]`` ranges).
    """
    _check(x, group_len, range_min, range_max, delta, zero_float)
    impl = backend.resolve(x)
    if impl == "triton":
        from ._triton_group import group_update_range_triton

        group_update_range_triton(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, group_len,
                                  estimator, momentum, first)
        return
    bmin, bmax = (group_minmax_reference if impl == "reference" else _group_minmax_torch)(x, group_len)
    with torch.no_grad():  # the reference's update and qparams (as update_range's torch path)
        _finalize_torch(bmin, bmax, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, estimator,
                        momentum, first)


group_update_range_op = define_op("group_update_range", _group_update_range_op,
                                  mutates_args=("range_min", "range_max", "delta", "zero_float", "signed"))


def group_update_range(x: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor, delta: torch.Tensor,
                       zero_float: torch.Tensor, signed: torch.Tensor, n_bits: int, symmetric: bool, group_len: int,
                       estimator: int, momentum: float, first: bool, workspace: torch.Tensor | None = None) -> None:
    """The op's work (see ``_group_update_range_op``) from eager or traced code.

    Eager code runs the implementation directly; traced code calls ``tquant::group_update_range_triton`` (a
    ``triton_op``: inductor launches its kernels) on the Triton lane when the quantizer's ``workspace``
    (int32 ``[2]``) is given, else the registered op ``tquant::group_update_range``.
    """
    args = (n_bits, symmetric, group_len, estimator, momentum, first)
    if not torch.compiler.is_compiling():
        _group_update_range_op(x, range_min, range_max, delta, zero_float, signed, *args)
        return
    if workspace is not None and backend.resolve(x) == "triton":
        from . import _triton_ops

        if _triton_ops.traced_triton(x):
            from ._triton_group import group_update_range_op as traced

            traced(x, workspace, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, group_len,
                   0 if first else estimator, momentum)
            return
    group_update_range_op(x, range_min, range_max, delta, zero_float, signed, *args)


@torch.library.register_fake("tquant::group_update_range")
def _(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, group_len, estimator, momentum, first):
    return None


# --------------------------------------------------------------------------------------------
# the quantization manager's planned call
# --------------------------------------------------------------------------------------------


class GroupCall:
    """A group-wise quantizer's eager forward, planned once per input layout (as ``QuantizerCall``).

    ``state`` is the ``(dict, key)`` pairs of ``delta``, ``zero_float``, ``signed``, ``range_min``,
    ``range_max`` and the estimator's workspace, int32 ``[2]`` (looked up at each call). ``train(x)``: the
    min/max estimators' update, then the fake quantization (torch: a few vectorised passes; Triton: two
    launches, ``group_train_triton``, saving the 1-byte mask); ``fixed(x)``: the fake quantization alone (one
    launch; learned ranges get their gradients).
    """

    def __init__(self, x: torch.Tensor, n_bits: int, symmetric: bool, group_len: int, estimator: int | None,
                 momentum: float, state):
        _check(x, group_len)
        self.lane = backend.resolve(x)
        self.n_bits, self.symmetric, self.group_len = n_bits, symmetric, group_len
        self.fused = estimator is not None
        self.estimator, self.momentum = estimator, float(momentum)
        self.state = state

    def params(self) -> tuple:
        (d, kd), (z, kz), (s, ks) = self.state[:3]
        return d[kd], z[kz], s[ks]

    def update(self, x: torch.Tensor) -> None:
        (d, kd), (z, kz), (s, ks), (lo, klo), (hi, khi) = self.state[:5]
        _group_update_range_op(x.detach(), lo[klo], hi[khi], d[kd], z[kz], s[ks], self.n_bits, self.symmetric,
                               self.group_len, self.estimator, self.momentum, False)

    def train(self, x: torch.Tensor) -> torch.Tensor:
        if self.lane == "triton":  # two launches (range, then fake quant), gradient grad * mask
            return _GroupTrainTriton.apply(x, self, torch.is_grad_enabled() and x.requires_grad)
        self.update(x)
        return self.fixed(x)

    def fixed(self, x: torch.Tensor) -> torch.Tensor:
        delta, zero_float, signed = self.params()
        return group_fake_quant(x, delta, zero_float, signed, self.n_bits, self.symmetric, self.group_len)


class _GroupTrainTriton(torch.autograd.Function):
    """A training forward with range estimation on the Triton lane (``group_train_triton``); saves the mask.
    (Ranges are never learned while they are estimated, so ``x`` is the only input with a gradient.)"""

    @staticmethod
    def forward(ctx, x, call, with_mask):
        from ._triton_group import group_train_triton

        (d, kd), (z, kz), (s, ks), (lo, klo), (hi, khi) = call.state[:5]
        work = call.state[5][0][call.state[5][1]] if len(call.state) > 5 else None
        y, mask = group_train_triton(x.detach(), lo[klo], hi[khi], d[kd], z[kz], s[ks], call.n_bits, call.symmetric,
                                     call.group_len, call.estimator, call.momentum, with_mask, work)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None

