"""The quantizer's scalar math on the host, for CPU tensors (the torch path's fast lane).

On the CPU a value read costs no device round trip, and a few numpy float32 operations on a
range and its parameters cost far less than the dozens of tiny torch ops the same formulas
take. Every function here is the float32 transcription of its counterpart in
``reference.py`` (same operations in the same order; IEEE float32 arithmetic is correctly
rounded in numpy and torch alike), and the tests compare the two bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .reference import EPS, ESTIMATOR_ALL, ESTIMATOR_CURRENT, ESTIMATOR_RUNNING

F32 = np.float32
EPS32 = float(F32(EPS))


def update_range_host(bmin: np.ndarray, bmax: np.ndarray, old_min: np.ndarray | None, old_max: np.ndarray | None,
                      estimator: int, momentum: float, first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``update_range_reference`` in numpy float32 (a NaN old range means "no range yet")."""
    if first or estimator == ESTIMATOR_CURRENT:
        return bmin, bmax
    if estimator == ESTIMATOR_ALL:
        new_min, new_max = np.minimum(old_min, bmin), np.maximum(old_max, bmax)
    elif estimator == ESTIMATOR_RUNNING:
        a, m = F32(1 - momentum), F32(momentum)

        def ema(batch, old):
            with np.errstate(all="ignore"):
                value = a * batch + m * old
            ok_b, ok_o = np.isfinite(batch), np.isfinite(old)
            return np.where(ok_b & ok_o, value, np.where(ok_b, batch, old)).astype(F32)

        new_min, new_max = ema(bmin, old_min), ema(bmax, old_max)
    else:
        raise ValueError(f"update_range: unknown estimator code {estimator}")
    return np.where(np.isnan(old_min), bmin, new_min), np.where(np.isnan(old_max), bmax, new_max)


def qparams_host(x_min: np.ndarray, x_max: np.ndarray, n_bits: int, symmetric: bool):
    """``qparams_from_range`` in numpy float32: ``(delta, zero_float, signed)``."""
    x_min = np.minimum(x_min, F32(0.0))
    x_max = np.maximum(x_max, F32(EPS))
    with np.errstate(all="ignore"):
        if not symmetric:
            delta = (x_max - x_min) / F32(2**n_bits - 1)
            return delta, -x_min / delta, False
        signed = bool((x_min < 0).any())
        qmax = F32(2 ** (n_bits - 1) - 1) if signed else F32(2**n_bits - 1)
        delta = np.maximum(np.abs(x_min), x_max) / qmax
    return delta, np.zeros_like(delta), signed


def scalar_qparams(delta: torch.Tensor, zero_float: torch.Tensor, signed: torch.Tensor, n_bits: int,
                   symmetric: bool) -> tuple[float, float, float, float]:
    """Per-tensor ``(scale, zp, qmin, qmax)`` as Python floats holding float32 values."""
    d = float(delta)
    scale = d if not d < EPS32 else EPS32  # torch.clamp(min=EPS) keeps NaN
    full = float(2**n_bits - 1)
    if symmetric:
        if bool(signed):
            half = float(2 ** (n_bits - 1))
            return scale, 0.0, -half, half - 1.0
        return scale, 0.0, 0.0, full
    zp = min(max(float(round(float(zero_float))), 0.0), full)  # Python's round is half to even
    return scale, zp, 0.0, full


def write_state(values, tensors) -> None:
    """Copy numpy results into the state tensors in place (bumping their version counters)."""
    for value, tensor in zip(values, tensors):
        tensor.copy_(torch.as_tensor(np.asarray(value), dtype=tensor.dtype).reshape(tensor.shape))


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (ties to even). Any +, -, *, / of two float32
    values done in Python's double and rounded once with this is the correctly rounded float32
    result (binary64 has more than 2 * 24 + 2 bits), so scalar code matches torch's float32 ops."""
    return float(F32(v))


def update_range_scalar(lo: float, hi: float, old_lo: float | None, old_hi: float | None, estimator: int,
                        momentum: float, first: bool = False) -> tuple[float, float]:
    """``update_range_host`` for one range held in Python floats (float32 values)."""
    if first or estimator == ESTIMATOR_CURRENT or old_lo != old_lo:  # NaN: no range yet
        return lo, hi
    if estimator == ESTIMATOR_ALL:
        return _nan_min(old_lo, lo), _nan_max(old_hi, hi)
    if estimator == ESTIMATOR_RUNNING:
        a, m = f32(1 - momentum), f32(momentum)

        def ema(batch: float, old: float) -> float:
            ok_b, ok_o = math.isfinite(batch), math.isfinite(old)
            if ok_b and ok_o:
                return f32(f32(a * batch) + f32(m * old))
            return batch if ok_b else old

        return ema(lo, old_lo), ema(hi, old_hi)
    raise ValueError(f"update_range: unknown estimator code {estimator}")


def qparams_scalar(x_min: float, x_max: float, n_bits: int, symmetric: bool) -> tuple[float, float, bool]:
    """``qparams_host`` for one range held in Python floats: ``(delta, zero_float, signed)``."""
    x_min = _nan_min(x_min, 0.0)
    x_max = _nan_max(x_max, EPS32)
    if not symmetric:
        delta = f32(f32(x_max - x_min) / float(2**n_bits - 1))
        return delta, f32(-x_min / delta), False
    signed = x_min < 0
    qmax = float(2 ** (n_bits - 1) - 1) if signed else float(2**n_bits - 1)
    return f32(_nan_max(abs(x_min), x_max) / qmax), 0.0, signed


def _nan_min(a: float, b: float) -> float:
    """``torch.minimum`` on two floats (NaN propagates)."""
    return a if (a != a or a <= b) and b == b else b


def _nan_max(a: float, b: float) -> float:
    """``torch.maximum`` on two floats (NaN propagates)."""
    return a if (a != a or a >= b) and b == b else b
