"""Shared test helpers: tolerances by dtype, tie-heavy inputs, quantizer state builders."""

from __future__ import annotations

import torch

import tquant
from tquant.kernels import reference as ref

# Float tolerances for gradients (values are compared exactly); one table for every test.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def state_from_range(x_min, x_max, n_bits, symmetric):
    """(delta, zero_float, signed) for a range, via the reference."""
    x_min = torch.as_tensor(x_min, dtype=torch.float32)
    x_max = torch.as_tensor(x_max, dtype=torch.float32)
    return ref.qparams_from_range(x_min, x_max, n_bits, symmetric)


def tie_values(delta: float, n_bits: int) -> torch.Tensor:
    """Every half-integer multiple of ``delta`` across (and a bit beyond) a grid, both signs."""
    k = torch.arange(-(2**n_bits) - 2, 2**n_bits + 2, dtype=torch.float32)
    return (k + 0.5) * delta


def small_qmap(w_bits=8, a_bits=8, symmetric=True, per_channel=False, act_symmetric=None):
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(w_bits, symmetric, per_channel)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(
        a_bits, symmetric if act_symmetric is None else act_symmetric
    )
    tquant.append_default_conversions(qmap)
    return qmap
