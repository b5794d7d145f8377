"""One quantizer's eager forward: range estimation and fake quantization as one planned call.

The quantization manager calls this on the hot path of QAT (DESIGN §4, "host cost"). Everything
that does not depend on the values of ``x`` — the backend, input checks, the Triton launch plan
(2-D view, grid, blocks, workspaces) — is decided once per (shape, strides, dtype, device,
backend) by :func:`quantizer_call` and cached by the caller; a call is then a few Python lines
and at most two launches:

- ``call.train(x)``: the min/max estimators' training forward — update the running range and
  the quantizer parameters in place (a NaN running range means "no range yet"), then
  fake-quantize with them. Triton: 2 launches.
- ``call.fixed(x)``: fake quantization with the current parameters (eval, ``fix_ranges``; with
  ``learn_ranges`` also the LSQ gradients of ``delta`` and ``zero_float``). Triton: 1 launch.

Autograd: the gradient of ``x`` is ``grad * mask`` with the in-range mask saved by the forward
(``x`` itself is saved only for learned ranges). On the GPU that is a small ``autograd.Function``
saving a 1-byte mask, whose backward is one launch. On small CPU tensors, where a Python
backward costs more than the whole op, the output is made by ``x * mask`` — a native autograd
node that saves only the mask (in ``x``'s dtype) — and the fake-quantized values are written
into it in place. Values are the reference's (``reference.py``) bit for bit on every lane.

Lanes (chosen when the call is planned):

- ``triton``: CUDA tensors (or any tensor with ``TQUANT_BACKEND=triton``), the fused kernels;
- ``host``: small contiguous fp32/fp16 CPU tensors per tensor: numpy on the host (no torch op
  dispatch, float32 arithmetic identical to torch's);
- ``torch``: vectorised torch ops on any other tensor;
- ``reference``: ``TQUANT_BACKEND=reference``, the eager reference with autograd through it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import backend
from .fake_quant import (
    HOST_MAX_NUMEL,
    _fake_quant_torch,
    _range_grads_torch,
    host_array,
    host_codes,
    host_lane_fits,
    host_values,
)
from .host_math import F32, fake_quant_consts, qparams_f32, update_range_f32
from .range_update import _batch_minmax_torch, _finalize_torch, _update_range_scalar
from .reference import (
    batch_minmax_reference,
    fake_quant_reference,
    qparams_from_range,
    update_range_reference,
)

__all__ = ["QuantizerCall", "TritonLaneCall", "quantizer_call"]


class QuantizerCall:
    """Base of the lanes. ``state`` names where the state tensors live, as ``(dict, key)`` pairs for
    ``delta``, ``zero_float``, ``signed``, ``range_min``, ``range_max`` and the range-update workspace
    and its counter (a module's ``_parameters`` / ``_buffers``): the call looks them up at each call,
    so it always sees the tensors the module holds now, at the cost of a dict lookup rather than
    ``nn.Module.__getattr__``."""

    lane = ""

    def __init__(self, n_bits: int, symmetric: bool, axis: int, estimator: int | None, momentum: float, state):
        self.n_bits = n_bits
        self.symmetric = symmetric
        self.axis = axis
        self.fused = estimator is not None
        """Whether :meth:`train` applies (the estimator is one of the min/max family)."""
        self.estimator = estimator
        self.momentum = float(momentum)
        self.state = state

    def tensors(self) -> tuple:
        """``(delta, zero_float, signed, range_min, range_max)`` as the modules hold them now."""
        (d, kd), (z, kz), (s, ks), (lo, klo), (hi, khi) = self.state[:5]
        return d[kd], z[kz], s[ks], lo[klo], hi[khi]

    def params(self) -> tuple:
        """``(delta, zero_float, signed)`` as the quantizer holds them now."""
        (d, kd), (z, kz), (s, ks) = self.state[:3]
        return d[kd], z[kz], s[ks]

    def train(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running range and the parameters from ``x``, then fake-quantize ``x``."""
        delta, zero_float, signed, range_min, range_max = self.tensors()
        self.update(x.detach(), delta, zero_float, signed, range_min, range_max)
        return self.apply(x, delta, zero_float, signed)

    def fixed(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the current parameters (learned ones get their gradients)."""
        return self.apply(x, *self.params())

    def update(self, x, delta, zero_float, signed, range_min, range_max) -> None:
        raise NotImplementedError

    def apply(self, x, delta, zero_float, signed) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.forward(x, delta, zero_float, signed, False)[0]
        if delta.requires_grad or zero_float.requires_grad:
            return _LearnedFakeQuant.apply(x, delta, zero_float, signed, self)
        if not x.requires_grad:
            return self.forward(x, delta, zero_float, signed, False)[0]
        return self.masked(x, delta, zero_float, signed)

    def masked(self, x, delta, zero_float, signed) -> torch.Tensor:
        """``y`` whose gradient is ``grad * mask`` (``x`` requires grad).

        Small CPU tensors: a native ``x * mask`` node (cheaper than a Python backward, which costs
        more than the op there); elsewhere the ``autograd.Function`` saving the 1-byte mask (no
        extra passes over a large tensor)."""
        if x.device.type == "cpu" and x.numel() <= HOST_MAX_NUMEL:
            y, mask = self.forward(x.detach(), delta, zero_float, signed, True)
            out = torch.mul(x, mask.to(x.dtype))  # a native node that saves only the mask
            out.detach().copy_(y)
            return out
        self.args = (delta, zero_float, signed)
        return masked_fake_quant(x, self)

    def forward(self, x, delta, zero_float, signed, with_mask: bool):
        """``(y, mask or None)`` without autograd."""
        raise NotImplementedError

    def range_grads(self, grad, x, delta, zero_float, signed):
        return _range_grads_torch(grad, x, delta, zero_float, signed, self.n_bits, self.symmetric, self.axis)


class _TorchCall(QuantizerCall):
    lane = "torch"

    def update(self, x, delta, zero_float, signed, range_min, range_max) -> None:
        if self.axis < 0 and x.device.type == "cpu":
            _update_range_scalar(x, range_min, range_max, delta, zero_float, signed, self.n_bits, self.symmetric,
                                 self.estimator, self.momentum, False)
            return
        bmin, bmax = _batch_minmax_torch(x, self.axis)
        _finalize_torch(bmin, bmax, range_min, range_max, delta, zero_float, signed, self.n_bits, self.symmetric,
                        self.estimator, self.momentum, False)

    def forward(self, x, delta, zero_float, signed, with_mask):
        y, mask = _fake_quant_torch(x, delta, zero_float, signed, self.n_bits, self.symmetric, self.axis, with_mask)
        return y, (mask if with_mask else None)


class _HostCall(QuantizerCall):
    """Per-tensor, contiguous fp32/fp16 CPU tensors of at most :data:`HOST_MAX_NUMEL` elements.

    The range and parameter math runs on numpy float32 scalars (``host_math``'s formulas, each
    operation correctly rounded to float32 as torch's are); the elementwise passes are numpy
    float32 ufuncs; ``rint`` is round half to even. The five state tensors are read and written
    through cached numpy views of their storage (re-made when a tensor's storage changes), which
    does not bump their autograd version counters: nothing saves them for backward while ranges
    are being estimated. The gradient of ``x`` comes from ``x * mask`` (a native autograd node
    that saves only the float mask), into whose output the fake-quantized values are written.
    """

    lane = "host"

    def __init__(self, *args):
        super().__init__(*args)
        self._ptrs = self._views = None

    def _state(self, delta, zero_float, signed, range_min, range_max):
        ptrs = (delta.data_ptr(), zero_float.data_ptr(), signed.data_ptr(), range_min.data_ptr(),
                range_max.data_ptr())
        if ptrs != self._ptrs:
            # 0-d views: per-tensor parameters are [1] (FSDP2 shards no 0-dim parameter), the kernels take scalars
            self._views = tuple(host_array(t).reshape(()) for t in (delta, zero_float, signed, range_min, range_max))
            self._ptrs = ptrs
        return self._views

    def train(self, x):
        xd = x.detach()
        consts = self._update(host_array(xd), *self._state(*self.tensors()))
        if x.requires_grad and torch.is_grad_enabled():
            return self._masked(x, xd, consts)
        return self._values(xd, consts, False)[0]

    def update(self, x, delta, zero_float, signed, range_min, range_max) -> None:
        self._update(host_array(x), *self._state(delta, zero_float, signed, range_min, range_max))

    def _update(self, xn, d_v, z_v, s_v, rmin_v, rmax_v):
        """New range and parameters into the views; returns the fake-quant constants."""
        if xn.size:
            lo, hi = F32(xn.min() + 0.0), F32(xn.max() + 0.0)  # a zero extreme is +0.0
        else:
            lo, hi = F32(math.inf), F32(-math.inf)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf in the batch: the masked min/max
            lo_t, hi_t = batch_minmax_reference(torch.from_numpy(xn), -1)
            lo, hi = F32(lo_t.item()), F32(hi_t.item())
        lo, hi = update_range_f32(lo, hi, rmin_v[()], rmax_v[()], self.estimator, self.momentum)
        delta, zero_float, signed = qparams_f32(lo, hi, self.n_bits, self.symmetric)
        rmin_v[()], rmax_v[()], d_v[()], z_v[()], s_v[()] = lo, hi, delta, zero_float, signed
        return fake_quant_consts(delta, zero_float, signed, self.n_bits, self.symmetric)

    def _values(self, x, consts, with_mask):
        r, c = host_codes(host_array(x).reshape(x.shape), consts)
        mask = torch.from_numpy(np.equal(c, r)) if with_mask else None  # NaN: False, like the reference
        return host_values(c, consts, torch.empty_like(x)), mask

    def _masked(self, x, xd, consts):
        xn = host_array(xd).reshape(xd.shape)
        r, c = host_codes(xn, consts)
        out = torch.mul(x, torch.from_numpy(np.equal(c, r).astype(xn.dtype)))  # autograd saves the mask only
        return host_values(c, consts, out)

    def _fixed_consts(self, delta, zero_float, signed):
        return fake_quant_consts(delta.item(), zero_float.item(), signed.item(), self.n_bits, self.symmetric)

    def forward(self, x, delta, zero_float, signed, with_mask):
        return self._values(x, self._fixed_consts(delta, zero_float, signed), with_mask)

    def masked(self, x, delta, zero_float, signed):
        return self._masked(x, x.detach(), self._fixed_consts(delta, zero_float, signed))


class TritonLaneCall(QuantizerCall):
    """Base of the Triton lanes' calls (integer here; group-wise and FP8 in ``_triton_group`` / ``_triton_fp8``):
    the gradient of ``x`` always comes from the ``autograd.Function`` saving the 1-byte mask, whose backward
    is one ``where`` (no launch of ours). A subclass plans its launches when made and implements ``train``,
    ``forward`` and ``range_grads``."""

    lane = "triton"

    def masked(self, x, delta, zero_float, signed):
        self.args = (delta, zero_float, signed)
        return masked_fake_quant(x, self)


class _TritonCall(TritonLaneCall):
    """The fused Triton kernels, launched through the plan's bound variants (``_triton_launch``): a call
    costs its launches and a few allocations, not ``JITFunction.run``'s binding. The state entries 6 and
    7 locate the quantizer's range-update workspace (``range_update.range_workspace``)."""

    def __init__(self, x: torch.Tensor, *args):
        super().__init__(*args)
        from ._triton_fake_quant import fake_quant_launcher, run_fake_quant
        from ._triton_launch import by_alignment
        from ._triton_plan import TritonPlan
        from ._triton_range import range_rule, update_range_launcher

        self._run_fake_quant = run_fake_quant
        self.plan = plan = TritonPlan(x, self.axis)
        n_bits, sym = self.n_bits, self.symmetric
        self._fq = {m: by_alignment(lambda a, m=m: fake_quant_launcher(plan, n_bits, sym, m, a)) for m in (0, 1)}
        if self.fused:
            rule = range_rule(self.estimator)
            self._up = by_alignment(lambda a: update_range_launcher(plan, n_bits, sym, rule, self.momentum, a))
        (self._dd, self._kd), (self._dz, self._kz), (self._ds, self._ks) = self.state[:3]
        (self._dlo, self._klo), (self._dhi, self._khi) = self.state[3:5]
        (self._dws, self._kws), (self._dcnt, self._kcnt) = self.state[5:7]
        self._grad_plans: dict = {}  # learned ranges' backward, by the gradient's strides

    def train(self, x):
        d, z, s = self._dd[self._kd], self._dz[self._kz], self._ds[self._ks]
        xk = x.contiguous() if self.plan.contiguous else x
        self._up[xk.data_ptr() % 16 == 0](xk, self._dws[self._kws], self._dcnt[self._kcnt], self._dlo[self._klo],
                                          self._dhi[self._khi], d, z, s)
        return self.apply(x, d, z, s)

    def update(self, x, delta, zero_float, signed, range_min, range_max) -> None:
        xk = x.contiguous() if self.plan.contiguous else x
        self._up[xk.data_ptr() % 16 == 0](xk, self._dws[self._kws], self._dcnt[self._kcnt], range_min, range_max,
                                          delta, zero_float, signed)

    def forward(self, x, delta, zero_float, signed, with_mask):
        return self._run_fake_quant(self.plan, self._fq[with_mask], x, delta, zero_float, signed, with_mask)

    def range_grads(self, grad, x, delta, zero_float, signed):
        """The LSQ gradients through a plan per gradient layout (bound launchers, reused partials)."""
        from ._triton_fake_quant import RangeGradsPlan, fake_quant_range_grads_triton

        key = grad.stride()
        plans = self._grad_plans
        if key not in plans:
            plans[key] = RangeGradsPlan.make(grad, x, self.plan.per_channel, self.n_bits, self.symmetric)
        plan = plans[key]
        if plan is None:  # no common view without copies: the functional path copies
            return fake_quant_range_grads_triton(grad, x, delta, zero_float, signed, self.n_bits, self.symmetric,
                                                 self.axis)
        return plan(grad, x, delta, zero_float, signed)


class _ReferenceCall(QuantizerCall):
    lane = "reference"

    def update(self, x, delta, zero_float, signed, range_min, range_max) -> None:
        bmin, bmax = batch_minmax_reference(x, self.axis)
        new_min, new_max = update_range_reference(bmin, bmax, range_min, range_max, self.estimator, self.momentum)
        d, z, s = qparams_from_range(new_min, new_max, self.n_bits, self.symmetric)
        with torch.no_grad():
            for dst, src in ((range_min, new_min), (range_max, new_max), (delta, d), (zero_float, z), (signed, s)):
                dst.copy_(src)

    def apply(self, x, delta, zero_float, signed):
        return fake_quant_reference(x, delta, zero_float, signed, self.n_bits, self.symmetric, self.axis)


class _MaskedFakeQuant(torch.autograd.Function):
    """``y = fake_quant(x)``; backward ``where(mask, grad, 0)`` from the saved 1-byte mask.

    Called as ``masked_fake_quant(x, call)`` with the parameters in ``call.args`` (``(delta, zero_float,
    signed)``, none of which needs a gradient here): the fewer the arguments, the less autograd's apply
    does per call."""

    @staticmethod
    def forward(ctx, x, call):
        y, mask = call.forward(x, *call.args, True)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None


# ``Function.apply`` minus its Python preamble (functorch bookkeeping for wrapped tensors, which the lanes
# never receive: a kernel needs a real tensor's data pointer): about 2 us less per quantizer call.
masked_fake_quant = super(torch.autograd.Function, _MaskedFakeQuant).apply


class _LearnedFakeQuant(torch.autograd.Function):
    """``learn_ranges``: also the LSQ gradients of ``delta``/``zero_float``; saves ``x`` and the mask."""

    @staticmethod
    def forward(ctx, x, delta, zero_float, signed, call):
        y, mask = call.forward(x, delta, zero_float, signed, True)
        ctx.save_for_backward(x, delta, zero_float, signed, mask)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, grad):
        x, delta, zero_float, signed, mask = ctx.saved_tensors
        grad_x = torch.where(mask, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_delta, grad_zf = ctx.call.range_grads(grad, x, delta, zero_float, signed)
        return grad_x, grad_delta, grad_zf, None, None


def quantizer_call(x: torch.Tensor, n_bits: int, symmetric: bool, axis: int, estimator: int | None,
                   momentum: float, state) -> QuantizerCall:
    """Plan the call for inputs like ``x`` (shape, strides, dtype, device) under the current backend.

    ``estimator``: the ``ESTIMATOR_*`` code of a min/max estimator, or None (``train`` does not apply).
    ``state``: ``(dict, key)`` pairs locating ``delta``, ``zero_float``, ``signed``, ``range_min``,
    ``range_max``, and the range-update workspace and counter (see :class:`QuantizerCall`). Raises
    ``RuntimeError`` when the backend cannot run on ``x`` (``TQUANT_BACKEND=triton`` on a CPU tensor
    without ``TRITON_INTERPRET=1``), ``TypeError``/``ValueError`` for inputs the kernels do not take.
    The result is valid for every tensor with the same shape, strides, dtype and device while the
    backend stays the same.
    """
    args = (n_bits, symmetric, axis, estimator, momentum, state)
    impl = backend.resolve(x)
    if impl == "triton":
        return _TritonCall(x, *args)
    if impl == "reference":
        return _ReferenceCall(*args)
    if not host_lane_fits(x, axis):
        return _TorchCall(*args)
    return _HostCall(*args)
