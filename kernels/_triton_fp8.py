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

Host side: an :class:`Fp8Plan` states each kernel's launch once, as a
:class:`~tquant.kernels._triton_launch.Launcher`; the manager's planned call (:class:`Fp8TritonCall`) keeps
its launchers bound (no ``JITFunction.run`` per launch), the functional ops plan per call and launch
unbound, and the ``triton_op`` functions through ``wrap_triton``, with the same arguments.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from ._masked_autograd import masked_autograd
from ._triton import tl, triton
from ._triton_launch import Launcher, by_alignment
from ._triton_math import _clamp, _round_half_even
from ._triton_plan import LAUNCH_OPTS, TritonPlan, device_ctx
from ._triton_range import range_rule, update_range_launcher
from .fp8_reference import fp8_max
from .quantizer_call import TritonLaneCall

__all__ = ["FP8_BITS", "Fp8Plan", "Fp8TritonCall", "fp8_fake_quant_triton", "fp8_range_grads_triton"]

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


@triton.jit(do_not_specialize_on_alignment=["p_delta"])
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


@triton.jit(do_not_specialize_on_alignment=["p_delta"])
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


def _flat(x: torch.Tensor, per_channel: bool) -> bool:
    """Whether the kernels may walk ``x``'s storage in memory order as its elements (dense; per channel, dim 0
    outermost) and write ``torch.empty_like(x)`` the same way."""
    if x.is_contiguous():
        return True
    y = torch.empty_like(x, device="meta")
    if y.stride() != x.stride():  # not dense: empty_like lays it out afresh
        return False
    return not (per_channel and x.dim() and x.shape[0] > 1 and x.stride(0) != x.numel() // x.shape[0])


class Fp8Plan:
    """How the FP8 kernels run on inputs like ``x`` (shape, strides, dtype) with ``fmt`` and ``axis``: whether
    ``x`` is walked over its storage (``staged``: through contiguous temporaries instead), the sizes, and a
    :class:`~tquant.kernels._triton_launch.Launcher` per kernel variant (leading arguments: the pointers)."""

    __slots__ = ("fmt", "per_channel", "staged", "n", "row", "rows", "splits")

    def __init__(self, x: torch.Tensor, fmt: str, axis: int):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"fp8_fake_quant: x must be float32, float16 or bfloat16, got {x.dtype}")
        fp8_max(fmt)
        self.fmt, self.per_channel = fmt, axis == 0
        self.staged = not _flat(x, self.per_channel)
        self.n = x.numel()
        self.rows = x.shape[0] if self.per_channel else 1
        self.row = self.n // self.rows if self.rows else 0
        self.splits = 1 if self.per_channel else max(1, min(_GRAD_SPLITS, triton.cdiv(max(self.row, 1), _BLOCK)))

    def _constexprs(self) -> dict:
        mbits, emin = FP8_BITS[self.fmt]
        return dict(FMAX=fp8_max(self.fmt), MBITS=mbits, EMIN=emin, PER_CHANNEL=self.per_channel)

    def fake_quant(self, with_mask: bool) -> Launcher:
        """:func:`_fp8_fake_quant_kernel`: ``(x, y, mask or y, delta)`` over the storage (or contiguous
        temporaries when ``staged``)."""
        return Launcher(_fp8_fake_quant_kernel, (triton.cdiv(self.n, _BLOCK),), (self.n, self.row),
                        dict(self._constexprs(), HAS_MASK=bool(with_mask), BLOCK=_BLOCK),
                        dict(num_warps=4, **LAUNCH_OPTS))

    def range_grads(self) -> Launcher:
        """:func:`_fp8_range_grads_kernel`: ``(grad, x, delta, partials)``, ``grad`` and ``x`` contiguous;
        ``partials``: fp32 ``[rows * splits]``."""
        return Launcher(_fp8_range_grads_kernel, (self.rows * self.splits,), (self.row, self.splits),
                        dict(self._constexprs(), BLOCK=_BLOCK), dict(num_warps=4, **LAUNCH_OPTS))

    def outputs(self, x: torch.Tensor, with_mask: bool):
        """``(y, mask, y_k, mask_k)``: the outputs (``torch.empty_like(x)``'s layout; mask None unless asked) and
        what the kernel writes (the same tensors, or contiguous temporaries when ``staged``)."""
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.bool) if with_mask else None
        if not self.staged:
            return y, mask, y, mask
        return y, mask, torch.empty(x.shape, dtype=x.dtype, device=x.device), (
            torch.empty(x.shape, dtype=torch.bool, device=x.device) if with_mask else None)

    def finish(self, y, mask, y_k, mask_k) -> None:
        """Staged: copy the temporaries into the outputs."""
        if self.staged:
            y.copy_(y_k)
            if mask is not None:
                mask.copy_(mask_k)

    def reduce(self, partials: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The gradient of ``delta`` from the partial sums: their sum per row, gated by ``delta >= EPS``."""
        total = partials.view(self.rows, self.splits).sum(dim=1)
        total = total if self.per_channel else total.reshape(())
        return (total * (delta >= 1e-8)).to(delta.dtype)


def fp8_fake_quant_triton(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int, with_mask: bool,
                          wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_fake_quant`` in one launch: ``(y, mask)`` laid out like ``torch.empty_like(x)`` (mask empty
    unless ``with_mask``)."""
    plan = Fp8Plan(x, fmt, axis)
    y, mask, y_k, mask_k = plan.outputs(x, with_mask)
    if plan.n:
        with device_ctx(x):
            plan.fake_quant(with_mask).unbound(x.contiguous() if plan.staged else x, y_k,
                                               y_k if mask_k is None else mask_k, delta.contiguous(), wrap=wrap)
    plan.finish(y, mask, y_k, mask_k)
    return y, (x.new_empty(0, dtype=torch.bool) if mask is None else mask)


def fp8_range_grads_triton(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int,
                           wrap=None) -> torch.Tensor:
    """The LSQ gradient of ``delta`` (its shape, fp32): per-row partial sums (one launch), their sum and
    the ``delta >= EPS`` gate."""
    plan = Fp8Plan(x, fmt, axis)
    partials = torch.empty(plan.rows * plan.splits, dtype=torch.float32, device=x.device)
    if plan.n:
        with device_ctx(x):
            plan.range_grads().unbound(grad.contiguous(), x.contiguous(), delta.contiguous(), partials, wrap=wrap)
    else:
        partials.zero_()
    return plan.reduce(partials, delta)


class Fp8TritonCall(TritonLaneCall):
    """An FP8 quantizer's eager forward on the Triton lane (``fp8.fp8_call``): planned once per input layout,
    each launch through a bound variant (``_triton_launch``), as the per-tensor lane's ``_TritonCall``.
    ``train(x)``: two launches, the integer quantizers' one-launch range update with the FP8 grid (``delta =
    max(|x_min|, x_max) / max``; it writes ``zero_float`` 0 and ``signed`` too), then the fake quantization;
    ``fixed(x)``: one; autograd as ``QuantizerCall``'s (the 1-byte mask; a learned scale: one more launch and
    the partials' sum). The state's entries 5 and 6 locate the range-update workspace and its counter."""

    def __init__(self, x: torch.Tensor, fmt: str, axis: int, estimator: int | None, momentum: float, state):
        super().__init__(8, True, axis, estimator, momentum, state)
        self.fmt = fmt
        self.plan = plan = Fp8Plan(x, fmt, axis)

        self._fq = [by_alignment(lambda _, m=m: plan.fake_quant(m)) for m in (False, True)]
        if self.fused:
            self.range_plan = rp = TritonPlan(x, axis)
            top, rule = fp8_max(fmt), range_rule(estimator)
            self._up = by_alignment(lambda a: update_range_launcher(rp, 8, True, rule, self.momentum, a,
                                                                    grid=(top, top + 1.0)))
        self._grads = plan.range_grads()
        self._partials = torch.empty(plan.rows * plan.splits, dtype=torch.float32, device=x.device)

    def train(self, x):
        delta, zero_float, signed, range_min, range_max = self.tensors()
        (ws, kws), (cnt, kcnt) = self.state[5:7]
        xk = x.contiguous() if self.range_plan.contiguous else x
        self._up[xk.data_ptr() % 16 == 0](xk, ws[kws], cnt[kcnt], range_min, range_max, delta, zero_float, signed)
        return self.apply(x, delta, zero_float, signed)

    def forward(self, x, delta, zero_float, signed, with_mask):
        plan = self.plan
        y, mask, y_k, mask_k = plan.outputs(x, with_mask)
        if plan.n:
            xk = x.contiguous() if plan.staged else x
            self._fq[with_mask][xk.data_ptr() % 16 == 0](xk, y_k, y_k if mask_k is None else mask_k, delta)
        plan.finish(y, mask, y_k, mask_k)
        return y, mask

    def range_grads(self, grad, x, delta, zero_float, signed):
        partials = self._partials  # reused in stream order: the sum below reads it before the next launch
        if self.plan.n:
            grad, x = grad.contiguous(), x.contiguous()
            if grad.data_ptr() % 16 or x.data_ptr() % 16:  # the bound variant assumes aligned tensors
                grad, x = grad.clone(), x.clone()
            self._grads(grad, x, delta, partials)
        else:
            partials.zero_()
        return self.plan.reduce(partials, delta), None


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
