"""Export op for int32 biases: ``tquant::dequantize_bias(codes, scale, axis)`` = ``scale * codes`` (fp32).

A Conv/Gemm bias quantized at ``scale = s_x * s_w`` (input scale times weight scale, per output
channel when the weight is per-channel) with zero point 0 is what onnxruntime's integer kernels
add to their int32 accumulators. The exporter translates this op to ``DequantizeLinear`` on the
int32 initializer (``tquant.export.translations``); eager code computes the same values.
"""

from __future__ import annotations

import torch

__all__ = ["INT32_MAX", "INT32_MIN", "bias_codes", "dequantize_bias"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def bias_codes(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(bias / scale), int32 range)`` as int32 (``scale`` 0-dim or like ``bias``)."""
    with torch.no_grad():
        v = torch.round(bias.detach().float() / scale.float())
        return torch.clamp(v, INT32_MIN, INT32_MAX).to(torch.int32)


@torch.library.custom_op("tquant::dequantize_bias", mutates_args=())
def dequantize_bias(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``scale * codes`` as fp32 for int32 ``codes`` ``[C]``; ``scale`` 0-dim (``axis < 0``) or ``[C]``."""
    if codes.dtype != torch.int32 or codes.dim() != 1:
        raise ValueError(f"dequantize_bias: codes must be 1-D int32, got {codes.dtype} {tuple(codes.shape)}")
    if axis >= 0 and scale.shape != codes.shape:
        raise ValueError(f"dequantize_bias: per-channel scale {tuple(scale.shape)} for codes {tuple(codes.shape)}")
    return scale.float() * codes.float()


@dequantize_bias.register_fake
def _(codes, scale, axis):
    return torch.empty_like(codes, dtype=torch.float32)
