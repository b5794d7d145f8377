"""Eager references of FP8 fake quantization: the numerics the torch and Triton lanes reproduce.

An FP8 quantizer (``fmt="fp8_e4m3"`` or ``"fp8_e5m2"``, the OCP formats ``torch.float8_e4m3fn`` and
``torch.float8_e5m2``) has one scale per tensor or per channel (dim 0) and no zero point:

- range → scale: the range is clamped as for the integer quantizers (``x_min <= 0 < x_max``, ``EPS``),
  then ``delta = max(|x_min|, x_max) / FP8_MAX[fmt]`` (448 for E4M3, 57344 for E5M2) and
  ``scale = max(delta, EPS)``;
- fake quantization: ``y = scale * fp8(clamp(x / scale, -max, max))`` where ``fp8`` rounds to the
  nearest FP8 value, ties to even (subnormals included), as ``torch.Tensor.to(float8)`` does. The clamp
  makes it saturating: values beyond the format, infinities included, go to ``+-max``; NaN stays NaN.
  That is ONNX ``QuantizeLinear`` to a float8 type with ``saturate=1`` (its default) followed by
  ``DequantizeLinear``, bit for bit in onnxruntime (tested);
- gradients: straight-through for the rounding, zero where ``x / scale`` lies outside ``[-max, max]``;
  the scale gets what autograd gives through the expression (the LSQ form), as for the integer grid.
"""

from __future__ import annotations

import torch

from .reference import EPS, param_view

__all__ = ["FP8_DTYPES", "FP8_MAX", "fp8_fake_quant_reference", "fp8_max", "fp8_qparams_from_range",
           "fp8_quantize_reference"]

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
"""The torch dtype of each format."""
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
"""Largest finite value of each format."""


def fp8_max(fmt: str) -> float:
    """``FP8_MAX[fmt]``, with a clear error for an unknown format."""
    if fmt not in FP8_MAX:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {', '.join(FP8_MAX)}")
    return FP8_MAX[fmt]


def fp8_qparams_from_range(x_min: torch.Tensor, x_max: torch.Tensor, fmt: str) -> torch.Tensor:
    """``delta = max(|x_min|, x_max) / FP8_MAX[fmt]`` after the range clamp (fp32, ``x_min``'s shape)."""
    x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
    x_max = torch.maximum(x_max.float(), torch.full_like(x_max, EPS, dtype=torch.float32))
    return torch.maximum(x_min.abs(), x_max) / fp8_max(fmt)


class _Fp8RoundStraightThrough(torch.autograd.Function):
    """Round fp32 values (already within the format's range) to the nearest FP8 value; identity backward."""

    @staticmethod
    def forward(ctx, v, fmt):
        return v.to(FP8_DTYPES[fmt]).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fp8_fake_quant_reference(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int = -1) -> torch.Tensor:
    """``y = scale * fp8(clamp(x / scale, -max, max))`` with autograd; ``x``'s shape and dtype.

    ``delta``: fp32, 0-dim (``axis=-1``) or ``[x.shape[0]]`` (``axis=0``).
    """
    top = fp8_max(fmt)
    scale = param_view(torch.clamp(delta, min=EPS), x, axis)
    v = torch.clamp(x.float() / scale, -top, top)
    return (scale * _Fp8RoundStraightThrough.apply(v, fmt)).to(x.dtype)


def fp8_quantize_reference(x: torch.Tensor, delta: torch.Tensor, fmt: str, axis: int = -1) -> torch.Tensor:
    """The FP8 codes ``fp8(clamp(x / scale, -max, max))`` as a tensor of ``FP8_DTYPES[fmt]`` (no autograd)."""
    top = fp8_max(fmt)
    with torch.no_grad():
        scale = param_view(torch.clamp(delta.float(), min=EPS), x, axis)
        return torch.clamp(x.float() / scale, -top, top).to(FP8_DTYPES[fmt])
