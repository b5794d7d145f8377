"""Shared test helpers: tolerances by dtype, bit-level comparison, tie-heavy inputs, quantizer state builders."""

from __future__ import annotations

import pytest
import torch

import tquant
from tquant.kernels import reference as ref
from tquant.kernels._triton import HAS_TRITON

NO_TRITON = ("Triton is not installed: the Triton kernel tests run in Triton's CPU interpreter with the [dev] "
             "extra (pip install -e '.[dev]')")
NO_CUDA = "needs a CUDA device (the gpu tier: pytest -m gpu on a GPU machine)"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

# Float tolerances for gradients (values are compared exactly); one table for every test.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype, NaN positions and bits (so ``-0.0 != +0.0``; NaN payloads may differ)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype == torch.bool:
        assert torch.equal(actual, expected), f"{what}: {(actual != expected).sum()} mismatches"
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    ia = actual.masked_fill(nan_a, 0).contiguous().view(INT_VIEW[actual.dtype])
    ie = expected.masked_fill(nan_e, 0).contiguous().view(INT_VIEW[expected.dtype])
    bad = ia != ie
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} differ, e.g. {actual[bad][:4].tolist()} "
        f"vs {expected[bad][:4].tolist()}"
    )


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


def lane_device(lane: str) -> str:
    """Where a test runs a lane's kernels: the GPU for ``triton`` when there is one (else the interpreter, on
    CPU tensors), the CPU otherwise."""
    return "cuda" if lane == "triton" and torch.cuda.is_available() else "cpu"


def stand_in_ranges(model: torch.nn.Module) -> None:
    """Give every quantizer of ``model`` (a manager counts) a range where it has none: under
    ``triton_offline.offline`` the stubbed launches write none, and eval and ``learn_ranges`` need one."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tquant.QuantizationManager):
                m.quantizer._delta.nan_to_num_(1.0)
