"""Fake quantization with a given range: the ``tquant::fake_quant`` op family.

``fake_quant(x, delta, zero_float, signed, n_bits, symmetric, axis)`` computes
``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` (see ``reference.py`` for the
conventions). It is one pass over ``x``. Backward:

- ``x``: ``grad * mask`` where ``mask`` is the 1-byte in-range mask saved by the forward
  (the input itself is not saved);
- ``delta`` / ``zero_float`` (``learn_ranges``): the LSQ gradients autograd gives through the
  reference expression, reduced per tensor or per channel; only then is ``x`` saved.

Registered as ``torch.library`` ops (``_ops.define_op``) with fake implementations, so quantized models
run under ``torch.compile(fullgraph=True)`` and the ONNX exporter can find the op by name.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from . import backend
from ._ops import ANY_LAYOUT, define_op
from .host_chunks import chunked_fake_quant
from .host_math import fake_quant_consts
from .inline import fake_quant_inline, inline_ok
from .reference import EPS, fake_quant_reference, grid_bounds, param_view

__all__ = ["fake_quant", "fake_quant_forward", "fake_quant_range_grads"]


def _qparams_fast(delta, zero_float, signed, n_bits, symmetric):
    """(scale, zp or None, qmin, qmax) with the reference's values; zp is None when it is 0."""
    scale = torch.clamp(delta.float(), min=EPS)
    qmin, qmax = grid_bounds(n_bits, symmetric, signed)
    if symmetric:
        return scale, None, qmin, qmax
    zp = torch.clamp(torch.round(zero_float.float()), 0.0, float(2**n_bits - 1))
    return scale, zp, qmin, qmax


def _quantize_in_place(x, scale, zp, qmin, qmax, with_mask):
    """The reference's ``(y, mask)`` in four passes over one new fp32 buffer (two more with the mask).

    ``clamp(round(x / s) + zp, qmin, qmax) - zp`` is computed as ``clamp(round(x / s), qmin - zp,
    qmax - zp)``: the same integers, because the codes and ``zp`` are exact in fp32. ``+ 0.0``
    turns round's -0.0 into the +0.0 the reference gets from adding and subtracting ``zp``.
    ``scale``/``zp``/``qmin``/``qmax`` are Python floats (CPU, per tensor: torch's scalar fast
    path) or tensors broadcasting against ``x``; ``zp`` is None for a symmetric quantizer.
    """
    if x.device.type == "cpu" and x.is_contiguous() and x.numel() >= BLOCKED_MIN_NUMEL:
        return _quantize_blocks(x, scale, zp, qmin, qmax, with_mask)
    r = torch.div(x.float(), scale)
    r.round_()
    lo, hi = (qmin, qmax) if zp is None else (qmin - zp, qmax - zp)
    if with_mask:
        c = _clamp(r, lo, hi, torch.empty_like(r))
        mask = torch.eq(c, r)  # in range; NaN: False, like the reference's comparisons
    else:
        c, mask = _clamp(r, lo, hi, r), x.new_empty(0, dtype=torch.bool)
    c.mul_(scale).add_(0.0)
    return (c if c.dtype == x.dtype else c.to(x.dtype)), mask


def _clamp(r, lo, hi, out):
    """``torch.clamp(r, lo, hi)`` into ``out`` (which may be ``r``). Tensor bounds take ``maximum`` then
    ``minimum``, the same values (NaN propagates, and the zero's sign is reset later): torch's
    clamp with tensor bounds is several times slower on the CPU."""
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return torch.minimum(torch.maximum(r, lo, out=out), hi, out=out)
    return torch.clamp(r, lo, hi, out=out)


BLOCK = 1 << 18
"""Elements per block of the blocked CPU passes: a block of x, its fp32 codes, y and the mask
(about 2.3 MB for fp32) stay in cache across the passes, so memory sees one read and two writes."""
BLOCKED_MIN_NUMEL = 1 << 20
"""Smallest CPU tensor that takes the blocked passes (below it the whole tensor is cache-sized)."""


def _quantize_blocks(x, scale, zp, qmin, qmax, with_mask):
    """:func:`_quantize_in_place`'s passes, block by block, for a contiguous CPU ``x``.

    The same ops on the same elements (bit-identical results); per-channel parameters (tensors of
    ``x.dim()`` dims, dim 0 the channel) are applied to whole rows, per-tensor ones to blocks of
    :data:`BLOCK` elements. One fp32 block of scratch; ``y`` and the mask are written in place.
    """
    per_channel = isinstance(scale, torch.Tensor) and scale.dim() > 0
    rows = x.shape[0] if per_channel else 1
    x2 = x.view(rows, -1)
    cols = x2.shape[1]
    if per_channel:
        step = max(1, BLOCK // max(cols, 1))
        blocks = [(slice(i, i + step), slice(None)) for i in range(0, rows, step)]
    else:
        blocks = [(slice(None), slice(i, i + BLOCK)) for i in range(0, cols, BLOCK)]
    lo, hi = (qmin, qmax) if zp is None else (qmin - zp, qmax - zp)

    def block_of(p, rs):
        return p.reshape(rows, 1)[rs] if per_channel and isinstance(p, torch.Tensor) and p.dim() > 0 else p

    y2 = torch.empty_like(x2)
    mask2 = torch.empty(x2.shape, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    fp32 = x.dtype == torch.float32
    largest = min(x2.numel(), max(BLOCK, cols))  # elements of the largest block
    scratch = torch.empty(largest if fp32 else 2 * largest)  # codes (and, below fp32, the values)
    for rs, cs in blocks:
        xb = x2[rs, cs]
        n = xb.numel()
        rb = scratch[:n].view(xb.shape)
        if fp32:
            torch.div(xb, block_of(scale, rs), out=rb)
            cb = y2[rs, cs]
        else:
            rb.copy_(xb).div_(block_of(scale, rs))
            cb = scratch[n:2 * n].view(xb.shape)
        rb.round_()
        _clamp(rb, block_of(lo, rs), block_of(hi, rs), cb)
        if with_mask:
            torch.eq(cb, rb, out=mask2[rs, cs])  # in range; NaN: False
        cb.mul_(block_of(scale, rs)).add_(0.0)
        if not fp32:
            y2[rs, cs].copy_(cb)
    return y2.view(x.shape), (mask2.view(x.shape) if with_mask else mask2)


HOST_MAX_NUMEL = 1 << 16
"""Largest tensor the host lane takes: numpy runs on one core, torch's ops on all of them."""


def host_lane_fits(x: torch.Tensor, axis: int) -> bool:
    """Small contiguous fp32/fp16 CPU tensors per tensor: their elementwise passes run in numpy."""
    return (axis < 0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16)
            and x.is_contiguous() and x.numel() <= HOST_MAX_NUMEL)


CHUNKED_MIN_NUMEL = 1 << 20
"""Smallest per-tensor CPU tensor whose passes run chunk by chunk on threads (``host_chunks``): from
here on, chunks of ``host_chunks.CHUNK`` keep several per thread to balance (measured, 2-core Xeon:
0.77-1.2x torch's fused op on a quiet machine, 0.56-0.97x with a competing process, where the
cache-blocked torch passes took 1.9-5.3x); below it one torch op per pass is faster."""


def chunked_fits(x: torch.Tensor) -> bool:
    """Large contiguous fp32/fp16 CPU tensors, per tensor: their passes run in ``host_chunks``."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16) and x.is_contiguous()
            and x.numel() >= CHUNKED_MIN_NUMEL)


_HOST_ARRAY_TYPES = {torch.float32: (ctypes.c_float, np.float32), torch.float16: (ctypes.c_uint16, np.float16),
                     torch.bool: (ctypes.c_bool, np.bool_)}
_HOST_ARRAYS: dict = {}
"""ctypes array types by (dtype, numel), made once: making one costs more than the view."""


def host_array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous fp32/fp16/bool CPU tensor's memory (``t.numpy().ravel()``),
    which, unlike ``Tensor.numpy()``, leaves the storage resizable.

    ``Tensor.numpy()`` marks the storage non-resizable for good, and FSDP2 frees each unsharded
    parameter after the forward by resizing its storage to 0: a quantizer must not do that to a
    weight or to its own parameters. This view is made from the address and does not keep the
    memory alive: use it while ``t`` lives (the lanes hold ``t`` through the call, or check that
    ``t.data_ptr()`` did not change).
    """
    key = (t.dtype, t.numel())
    types = _HOST_ARRAYS.get(key)
    if types is None:
        if len(_HOST_ARRAYS) > 256:
            _HOST_ARRAYS.clear()
        ctype, dtype = _HOST_ARRAY_TYPES[t.dtype]
        types = _HOST_ARRAYS[key] = (ctype * key[1], dtype)
    if not key[1]:
        return np.empty(0, types[1])
    return np.frombuffer(types[0].from_address(t.data_ptr()), types[1])


def host_codes(xn: np.ndarray, consts) -> tuple[np.ndarray, np.ndarray]:
    """``(r, c)``: ``round(x / scale) + zp`` and its clamp to the grid, as float32 numpy arrays.

    ``consts`` is ``host_math.fake_quant_consts``' ``(scale, zp, qmin, qmax)``; numpy's float32
    division is correctly rounded like torch's and ``rint`` rounds half to even.
    """
    scale, zp, qmin, qmax = consts
    r = np.divide(xn, scale) if xn.dtype == np.float32 else np.divide(xn, scale, dtype=np.float32)
    np.rint(r, out=r)
    np.add(r, zp, out=r)  # + 0.0 too: round's -0.0 becomes +0.0, as in the reference
    c = np.maximum(r, qmin)
    np.minimum(c, qmax, out=c)
    return r, c


def host_values(c: np.ndarray, consts, y: torch.Tensor) -> torch.Tensor:
    """Write ``scale * (c - zp)`` into the CPU tensor ``y`` (cast to its dtype) and return it."""
    if consts[1]:
        np.subtract(c, consts[1], out=c)
    np.multiply(c, consts[0], out=y.detach().numpy(), casting="same_kind")
    return y


def _fake_quant_torch(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask):
    """Torch fast path: bit-identical to the reference."""
    if host_lane_fits(x, axis):
        consts = fake_quant_consts(delta.item(), zero_float.item(), signed.item(), n_bits, symmetric)
        r, c = host_codes(host_array(x).reshape(x.shape), consts)
        mask = torch.from_numpy(np.equal(c, r)) if with_mask else x.new_empty(0, dtype=torch.bool)
        return host_values(c, consts, torch.empty_like(x)), mask
    if x.device.type == "cpu" and axis < 0:
        consts = fake_quant_consts(delta.item(), zero_float.item(), signed.item(), n_bits, symmetric)
        if chunked_fits(x):
            y = torch.empty_like(x)
            mask = torch.empty(x.shape, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
            chunked_fake_quant(host_array(x), consts, y.numpy().reshape(-1),
                               mask.numpy().reshape(-1) if with_mask else None)
            return y, mask
        scale, zp, qmin, qmax = consts
        return _quantize_in_place(x, float(scale), None if symmetric else zp, qmin, qmax, with_mask)
    scale, zp, qmin, qmax = _qparams_fast(delta, zero_float, signed, n_bits, symmetric)
    if x.device.type == "cpu":  # the grid as Python floats: no device round trip here, and a faster clamp
        qmin, qmax = float(qmin), float(qmax)
    zp = None if zp is None else param_view(zp, x, axis)
    return _quantize_in_place(x, param_view(scale, x, axis), zp, qmin, qmax, with_mask)


def _fake_quant_impl(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask):
    if backend.resolve(x) == "triton":
        from ._triton_fake_quant import fake_quant_forward_triton

        return fake_quant_forward_triton(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)
    return _fake_quant_torch(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)


def _fake_quant_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)``: ``y`` like ``x``; ``mask`` bool like ``x`` (empty if not ``with_mask``)."""
    return _fake_quant_impl(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)


fake_quant_forward = define_op("fake_quant", _fake_quant_op, tags=ANY_LAYOUT)


@torch.library.register_fake("tquant::fake_quant")
def _(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask):
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    return torch.empty_like(x), mask


def _range_grads_torch(grad, x, delta, zero_float, signed, n_bits, symmetric, axis):
    """LSQ gradients of ``delta`` and ``zero_float`` (shapes of ``delta``), recomputed from ``x``."""
    scale, zp, qmin, qmax = _qparams_fast(delta, zero_float, signed, n_bits, symmetric)
    s = param_view(scale, x, axis)
    xs = x.float() / s
    v = torch.round(xs)
    if zp is not None:
        v = v + param_view(zp, x, axis)
    inside = (v >= qmin) & (v <= qmax)
    c = torch.clamp(v, qmin, qmax)
    if zp is not None:
        c = c - param_view(zp, x, axis)
    g = grad.float()
    # y = s * (c - zp): dy/ds = (c - zp) - inside * x / s ; dy/dzp = s * (inside - 1)
    g_scale_el = g * torch.where(inside, c - xs, c)
    dims = tuple(range(1, x.dim())) if axis >= 0 else tuple(range(x.dim()))
    g_scale = g_scale_el.sum(dim=dims) if dims else g_scale_el
    grad_delta = (g_scale * (delta >= EPS)).to(delta.dtype)
    if zp is None:
        return grad_delta, torch.zeros_like(zero_float)
    g_zp_el = torch.where(inside, torch.zeros_like(g), -g) * s
    g_zp = g_zp_el.sum(dim=dims) if dims else g_zp_el
    rz = torch.round(zero_float.float())
    grad_zf = (g_zp * ((rz >= 0) & (rz <= float(2**n_bits - 1)))).to(zero_float.dtype)
    return grad_delta, grad_zf


def _range_grads_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_delta, grad_zero_float)`` of ``fake_quant`` for learned ranges."""
    if backend.resolve(x) == "triton":
        from ._triton_fake_quant import fake_quant_range_grads_triton

        return fake_quant_range_grads_triton(grad, x, delta, zero_float, signed, n_bits, symmetric, axis)
    return _range_grads_torch(grad, x, delta, zero_float, signed, n_bits, symmetric, axis)


fake_quant_range_grads = define_op("fake_quant_range_grads", _range_grads_op)


@torch.library.register_fake("tquant::fake_quant_range_grads")
def _(grad, x, delta, zero_float, signed, n_bits, symmetric, axis):
    return torch.empty_like(delta), torch.empty_like(zero_float)


def _setup_context(ctx, inputs, output):
    x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask = inputs
    _, mask = output
    ctx.learn = delta.requires_grad or zero_float.requires_grad
    ctx.args = (n_bits, symmetric, axis)
    if ctx.learn:
        ctx.save_for_backward(mask, x, delta, zero_float, signed)
    else:
        ctx.save_for_backward(mask)


def _backward(ctx, grad_y, grad_mask):
    mask = ctx.saved_tensors[0]
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y * mask
    grad_delta = grad_zf = None
    if ctx.learn:
        _, x, delta, zero_float, signed = ctx.saved_tensors
        grad_delta, grad_zf = fake_quant_range_grads(grad_y, x, delta, zero_float, signed, *ctx.args)
    return grad_x, grad_delta, grad_zf, None, None, None, None, None


torch.library.register_autograd("tquant::fake_quant", _backward, setup_context=_setup_context)


class _FakeQuantFunction(torch.autograd.Function):
    """Eager twin of the ``tquant::fake_quant`` op: the same implementation and autograd formula,
    without the custom-op dispatch (tens of microseconds of Python per call)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fake_quant_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def fake_quant(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int = -1,
) -> torch.Tensor:
    """Fake-quantize ``x`` with a fixed range; differentiable in ``x``, ``delta``, ``zero_float``.

    Args:
        x: any shape, fp32/fp16/bf16, any strides; per-channel needs ``x.dim() >= 1``.
        delta, zero_float: fp32, 0-dim (``axis=-1``) or ``[x.shape[0]]`` (``axis=0``).
        signed: bool 0-dim (symmetric grids only; ignored when asymmetric).
    Returns:
        ``y`` of ``x``'s shape and dtype. Backward saves a 1-byte mask, plus ``x`` only when
        ``delta`` or ``zero_float`` requires grad.

    Example:
        >>> d = torch.tensor(0.1); z = torch.tensor(0.0); s = torch.tensor(True)
        >>> fake_quant(torch.tensor([0.26, -0.05]), d, z, s, n_bits=8, symmetric=True)
        tensor([0.3000, 0.0000])
    """
    if backend.resolve(x) == "reference":
        return fake_quant_reference(x, delta, zero_float, signed, n_bits, symmetric, axis)
    if not (delta.requires_grad or zero_float.requires_grad) and inline_ok(x):
        return fake_quant_inline(x, delta, zero_float, signed, n_bits, symmetric, axis)
    with_mask = torch.is_grad_enabled() and x.requires_grad
    if not torch.compiler.is_compiling():  # eager code skips the registered op's dispatch
        return _FakeQuantFunction.apply(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)[0]
    if backend.resolve(x) == "triton":  # traced code on the Triton lane: kernels inductor launches itself
        from . import _triton_ops

        if _triton_ops.traced_triton(x):
            return _triton_ops.fake_quant_triton(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)[0]
    return fake_quant_forward(x, delta, zero_float, signed, n_bits, symmetric, axis, with_mask)[0]
