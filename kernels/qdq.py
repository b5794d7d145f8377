"""Export-time quantize/dequantize ops: the ``tquant::quantize_dequantize`` op family.

These ops exist so that the ONNX exporter (``tquant.export``) can find every quantizer in a
traced graph by name and translate it into ``QuantizeLinear``/``DequantizeLinear`` nodes. They
take the quantizer's *deployment* constants — the scale, the integer zero point in its storage
dtype and the integer grid — which the exporter computes once, on the host, from the trained
``delta`` / ``zero_float`` / ``signed`` (see :func:`export_constants`). Training never calls
them; ``tquant::fake_quant`` stays the training op.

- ``quantize_dequantize(x, scale, zero_point, qmin, qmax, axis)`` is
  ``scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)``: exactly the reference's fake
  quantization (``reference.fake_quant_reference``) for the same quantizer, bit for bit;
  ONNX: ``QuantizeLinear`` → (``Clip`` when ``[qmin, qmax]`` is narrower than the storage
  type) → ``DequantizeLinear``.
- ``dequantize_codes(codes, scale, zero_point, axis)`` is ``scale * (codes - zp)`` on integer
  codes (the weights as stored); ONNX: an integer initializer → ``DequantizeLinear``.
  ``dequantize_codes(quantize_codes(w, ...), ...)`` equals the reference fake quantization of
  ``w`` bit for bit.
- ``dequantize_blocked(codes, scale, zero_point, axis, block_size, storage_bits)``: the same on a 2-D
  tensor of codes with one scale and zero point per ``block_size`` consecutive elements along ``axis``
  (a group-wise weight); ONNX: ``DequantizeLinear`` with ``block_size`` (opset 21).
- ``quantize_dequantize_fp8(x, scale, zero_point, axis)`` and ``dequantize_fp8(codes, scale, zero_point,
  axis)``: the FP8 forms (``zero_point`` a zero of the float8 dtype, which names the format); ONNX:
  ``QuantizeLinear`` → ``DequantizeLinear`` to and from float8 (opset 19), and a float8 initializer →
  ``DequantizeLinear``.

Conventions: ``axis < 0`` means per-tensor (``scale``/``zero_point`` 0-dim), ``axis >= 0`` per
channel along that dim (``[C]`` parameters); the storage type is the dtype of ``zero_point``
(``int8``, ``uint8``, ``int16`` or ``uint16``); ``scale`` is fp32; ``round`` is round half to
even and ``x / scale`` a true division, as ONNX ``QuantizeLinear`` specifies. No autograd: these
ops are for inference graphs only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .fp8_reference import FP8_DTYPES, fp8_max
from .reference import EPS, grid_bounds, scale_and_zero_point

__all__ = [
    "STORAGE_DTYPES",
    "ExportConstants",
    "dequantize_blocked",
    "dequantize_codes",
    "dequantize_fp8",
    "export_constants",
    "quantize_codes",
    "quantize_dequantize",
    "quantize_dequantize_fp8",
    "shift_to_unsigned",
    "storage_dtype",
]

STORAGE_DTYPES = {
    (8, True): torch.int8,
    (8, False): torch.uint8,
    (16, True): torch.int16,
    (16, False): torch.uint16,
}
"""Torch dtype of the codes / zero point for ``(storage bits, signed)``."""


def storage_dtype(n_bits: int, signed: bool) -> torch.dtype:
    """The narrowest of int8/uint8/int16/uint16 that holds an ``n_bits`` grid (``1 <= n_bits <= 16``)."""
    if not 1 <= n_bits <= 16:
        raise ValueError(f"storage_dtype: n_bits must be in [1, 16], got {n_bits}")
    return STORAGE_DTYPES[(8 if n_bits <= 8 else 16, bool(signed))]


def _view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if axis < 0 or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _check_axis(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, who: str) -> None:
    if scale.shape != zero_point.shape:
        raise ValueError(f"{who}: scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} differ")
    if axis < 0:
        if scale.dim() != 0:
            raise ValueError(f"{who}: per-tensor (axis < 0) needs 0-dim scale, got {tuple(scale.shape)}")
    elif scale.dim() != 1 or axis >= x.dim() or scale.shape[0] != x.shape[axis]:
        channels = x.shape[axis] if axis < x.dim() else "?"
        raise ValueError(
            f"{who}: per-channel axis={axis} needs scale of shape [{channels}], "
            f"got {tuple(scale.shape)} for input {tuple(x.shape)}"
        )


@torch.library.custom_op("tquant::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int
) -> torch.Tensor:
    """``scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` in fp32, returned in ``x``'s dtype.

    Args:
        x: any shape, floating point.
        scale: fp32, 0-dim (``axis < 0``) or ``[x.shape[axis]]``; already ``max(delta, EPS)``.
        zero_point: integer codes tensor like ``scale`` whose dtype is the storage type.
        qmin, qmax: the integer grid (within the storage type's range).
        axis: ``< 0`` per tensor, else the channel dim.

    Example:
        >>> s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int8)
        >>> quantize_dequantize(torch.tensor([0.26, -0.05, 9.0]), s, z, -8, 7, -1)
        tensor([0.3000, -0.0000, 0.7000])
    """
    _check_axis(x, scale, zero_point, axis, "quantize_dequantize")
    s = _view(scale.float(), x, axis)
    zp = _view(zero_point.float(), x, axis)
    v = torch.round(x.float() / s) + zp
    y = s * (torch.clamp(v, float(qmin), float(qmax)) - zp)
    return y.to(x.dtype)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x)


@torch.library.custom_op("tquant::dequantize_codes", mutates_args=())
def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, storage_bits: int
) -> torch.Tensor:
    """``scale * (codes - zp)`` as fp32, ``codes``' shape (ONNX ``DequantizeLinear``).

    Args:
        codes: integer tensor (int8/uint8/int16/uint16, same dtype as ``zero_point``).
        scale: fp32, 0-dim (``axis < 0``) or ``[codes.shape[axis]]``.
        zero_point: like ``scale``, ``codes``' dtype.
        axis: ``< 0`` per tensor, else the channel dim.
        storage_bits: how the exporter stores the codes in ONNX: 4 (int4/uint4; the codes must
            fit), 8 or 16 (the torch dtype). The result does not depend on it.
    """
    _check_axis(codes, scale, zero_point, axis, "dequantize_codes")
    if codes.dtype != zero_point.dtype:
        raise ValueError(f"dequantize_codes: codes {codes.dtype} and zero_point {zero_point.dtype} differ")
    if storage_bits not in (4, 8, 16):
        raise ValueError(f"dequantize_codes: storage_bits must be 4, 8 or 16, got {storage_bits}")
    s = _view(scale.float(), codes, axis)
    zp = _view(zero_point.float(), codes, axis)
    return s * (codes.float() - zp)


@dequantize_codes.register_fake
def _(codes, scale, zero_point, axis, storage_bits):
    return torch.empty_like(codes, dtype=torch.float32)


def _blocks(t: torch.Tensor, n: int, axis: int, block_size: int) -> torch.Tensor:
    """``t`` repeated ``block_size`` times along ``axis`` and cut to ``n`` there (block ``i`` covers
    elements ``i * block_size`` up to the next block; the last block may be shorter)."""
    return t.repeat_interleave(block_size, dim=axis).narrow(axis, 0, n)


@torch.library.custom_op("tquant::dequantize_blocked", mutates_args=())
def dequantize_blocked(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int, storage_bits: int
) -> torch.Tensor:
    """``scale * (codes - zp)`` (fp32, ``codes``' shape) with one scale per ``block_size`` elements along ``axis``.

    Args:
        codes: 2-D integer tensor (the zero point's dtype).
        scale: fp32, ``codes``' shape with ``ceil(codes.shape[axis] / block_size)`` along ``axis``.
        zero_point: like ``scale``, ``codes``' dtype.
        storage_bits: 4 (int4/uint4 in ONNX; the codes must fit), 8 or 16.
    """
    if codes.dim() != 2 or axis not in (0, 1) or block_size < 1:
        raise ValueError(f"dequantize_blocked: needs 2-D codes, axis 0 or 1 and block_size >= 1, got "
                         f"{tuple(codes.shape)}, axis={axis}, block_size={block_size}")
    blocks = -(-codes.shape[axis] // block_size)
    want = list(codes.shape)
    want[axis] = blocks
    if list(scale.shape) != want or scale.shape != zero_point.shape or codes.dtype != zero_point.dtype:
        raise ValueError(f"dequantize_blocked: scale {tuple(scale.shape)} / zero_point {tuple(zero_point.shape)} "
                         f"{zero_point.dtype} do not fit codes {tuple(codes.shape)} {codes.dtype} in blocks of "
                         f"{block_size} along axis {axis}")
    n = codes.shape[axis]
    s = _blocks(scale.float(), n, axis, block_size)
    return s * (codes.float() - _blocks(zero_point.float(), n, axis, block_size))


@dequantize_blocked.register_fake
def _(codes, scale, zero_point, axis, block_size, storage_bits):
    return torch.empty_like(codes, dtype=torch.float32)


def _fp8_format(zero_point: torch.Tensor) -> str:
    for fmt, dtype in FP8_DTYPES.items():
        if zero_point.dtype == dtype:
            return fmt
    raise ValueError(f"FP8 export ops: zero_point must be float8_e4m3fn or float8_e5m2, got {zero_point.dtype}")


@torch.library.custom_op("tquant::quantize_dequantize_fp8", mutates_args=())
def quantize_dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """``scale * fp8(clamp(x / scale, -max, max))`` in fp32, returned in ``x``'s dtype (``fp8_reference``).

    ``scale``: fp32 0-dim (``axis < 0``) or ``[x.shape[axis]]``, already ``max(delta, EPS)``;
    ``zero_point``: zeros of the float8 dtype (its dtype is the format), ``scale``'s shape.
    """
    fmt = _fp8_format(zero_point)
    top = fp8_max(fmt)
    s = _view(scale.float(), x, axis)
    return (s * torch.clamp(x.float() / s, -top, top).to(FP8_DTYPES[fmt]).float()).to(x.dtype)


@quantize_dequantize_fp8.register_fake
def _(x, scale, zero_point, axis):
    return torch.empty_like(x)


@torch.library.custom_op("tquant::dequantize_fp8", mutates_args=())
def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """``scale * codes`` (fp32) on float8 codes (ONNX ``DequantizeLinear``; the zero point is a float8 zero)."""
    _fp8_format(zero_point)
    if codes.dtype != zero_point.dtype:
        raise ValueError(f"dequantize_fp8: codes {codes.dtype} and zero_point {zero_point.dtype} differ")
    return _view(scale.float(), codes, axis) * codes.float()


@dequantize_fp8.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty_like(codes, dtype=torch.float32)


@dataclass(frozen=True)
class ExportConstants:
    """A quantizer's deployment constants (host values; computed once at export time).

    ``scale`` fp32 and ``zero_point`` (storage dtype) are 0-dim or ``[C]``; ``qmin``/``qmax`` the
    grid; ``axis`` ``-1`` (per tensor) or ``0``; ``dtype`` the storage dtype. Group-wise weights
    (``block_size`` > 0) have ``[C, n_groups]`` scale and zero point, one per ``block_size``
    elements of the weight's ``[C, K]`` view. FP8 (``fmt``) has a zero point of the float8 dtype
    and no integer grid (``qmin``/``qmax`` 0).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int
    n_bits: int
    symmetric: bool
    signed: bool
    block_size: int = 0
    fmt: str = "int"

    @property
    def dtype(self) -> torch.dtype:
        return self.zero_point.dtype


def export_constants(
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
) -> ExportConstants:
    """Deployment constants of a quantizer from its trained state, with the reference's math.

    ``scale = max(delta, EPS)``; ``zp = clamp(round(zero_float), 0, 2^b - 1)`` (0 if symmetric);
    grid from ``signed`` (symmetric) or ``[0, 2^b - 1]``; the storage type is the narrowest of
    int8/uint8/int16/uint16 holding the grid. Reads ``signed`` on the host (export time only).
    """
    with torch.no_grad():
        scale, zp = scale_and_zero_point(delta.detach(), zero_float.detach(), n_bits, symmetric)
        qmin_t, qmax_t = grid_bounds(n_bits, symmetric, signed.detach())
        qmin, qmax = int(qmin_t.item()), int(qmax_t.item())
        is_signed = qmin < 0
        dtype = storage_dtype(n_bits, is_signed)
        scale = scale.float().cpu().clone()
        zero_point = zp.cpu().to(torch.int64).to(dtype)
    return ExportConstants(
        scale, zero_point, qmin, qmax, axis if scale.dim() else -1, n_bits, symmetric, is_signed
    )


def shift_to_unsigned(c: ExportConstants, storage_bits: int) -> tuple[ExportConstants, int]:
    """The same quantizer stored in the unsigned type of ``storage_bits`` (4, 8 or 16 bits).

    A signed grid ``[qmin, qmax]`` with zero point ``zp`` becomes ``[qmin + h, qmax + h]`` with
    zero point ``zp + h``, ``h = 2^(storage_bits - 1)``: every ``QuantizeLinear`` /
    ``DequantizeLinear`` value is unchanged (``(q + h) - (zp + h) = q - zp``; all integers, exact in
    fp32). Returns ``(constants, h)``; unsigned grids come back unchanged with ``h = 0``.
    """
    if c.qmin >= 0:
        return c, 0
    h = 2 ** (storage_bits - 1)
    dtype = torch.uint16 if storage_bits == 16 else torch.uint8
    zp = (c.zero_point.to(torch.int64) + h).to(dtype)
    return dataclasses.replace(c, zero_point=zp, qmin=c.qmin + h, qmax=c.qmax + h), h


def quantize_codes(x: torch.Tensor, c: ExportConstants) -> torch.Tensor:
    """The integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` of ``x`` in ``c.dtype`` (on the CPU);
    group-wise constants per block of the ``[C, K]`` view, FP8 constants the float8 codes.

    The reference's quantization (``reference.quantize_reference``) with the constants' scale,
    zero point and grid, so ``dequantize_codes(quantize_codes(x, c), ...)`` equals the reference
    fake quantization of ``x`` bit for bit (also for constants from :func:`shift_to_unsigned`).
    """
    with torch.no_grad():
        xf = x.detach().cpu().float()
        if c.fmt != "int":
            top = fp8_max(c.fmt)
            s = _view(torch.clamp(c.scale, min=EPS), xf, c.axis)
            return torch.clamp(xf / s, -top, top).to(FP8_DTYPES[c.fmt]).contiguous()
        if c.block_size:  # group-wise: [C, n_groups] constants over the [C, K] view
            x2 = xf.reshape(xf.shape[0], -1)
            s = _blocks(c.scale, x2.shape[1], 1, c.block_size)
            zp = _blocks(c.zero_point.to(torch.float32), x2.shape[1], 1, c.block_size)
            v = torch.clamp(torch.round(x2 / s) + zp, float(c.qmin), float(c.qmax))
            return v.to(torch.int64).to(c.dtype).reshape(xf.shape).contiguous()
        s = _view(c.scale, xf, c.axis)
        zp = _view(c.zero_point.to(torch.float32), xf, c.axis)
        v = torch.clamp(torch.round(xf / s) + zp, float(c.qmin), float(c.qmax))
        return v.to(torch.int64).to(c.dtype).contiguous()
