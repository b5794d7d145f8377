"""The quantizer's scalar math on the host, for CPU tensors (the torch path's fast lane).

On the CPU a value read costs no device round trip, and a few numpy float32 operations on a
range and its parameters cost far less than the dozens of tiny torch ops the same formulas
take. Every function here is the float32 transcription of its counterpart in
``reference.py`` (same operations in the same order; IEEE float32 arithmetic is correctly
rounded in numpy and torch alike), and the tests compare the two bit for bit: ``*_host`` on
numpy arrays (per channel), ``*_f32`` on numpy float32 scalars (per tensor).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .reference import EPS, ESTIMATOR_ALL, ESTIMATOR_CURRENT, ESTIMATOR_RUNNING

F32 = np.float32
EPS32 = float(F32(EPS))
_EPS, _ZERO = F32(EPS), F32(0.0)


def update_range_host(bmin: np.ndarray, bmax: np.ndarray, old_min: np.ndarray | None, old_max: np.ndarray | None,
                      estimator: int, momentum: float, first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``update_range_reference`` in numpy float32 (a NaN old range means "no range yet"; an element
    whose batch saw no finite value, ``bmin = +inf``, keeps its old range)."""
    seen = np.isfinite(bmin)
    if first or old_min is None or old_max is None:
        old_min = old_max = np.full(np.shape(bmin), np.nan, F32)
    if estimator == ESTIMATOR_CURRENT:
        new_min, new_max = bmin, bmax
    elif estimator == ESTIMATOR_ALL:
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
    new_min = np.where(np.isnan(old_min), bmin, new_min)
    new_max = np.where(np.isnan(old_max), bmax, new_max)
    return np.where(seen, new_min, old_min).astype(F32), np.where(seen, new_max, old_max).astype(F32)


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


def fake_quant_consts(delta, zero_float, signed: bool, n_bits: int, symmetric: bool):
    """Per-tensor ``(scale, zp, qmin, qmax)`` from the parameter values: ``scale`` a float32 scalar,
    the rest Python floats (``reference.scale_and_zero_point`` and ``grid_bounds``)."""
    delta = F32(delta)
    scale = delta if not delta < _EPS else _EPS  # torch.clamp(min=EPS) keeps NaN
    full = float(2**n_bits - 1)
    if not symmetric:
        zp = float(np.rint(F32(zero_float)))  # round half to even
        zp = 0.0 if zp < 0.0 else (full if zp > full else zp)  # torch.clamp: NaN stays NaN
        return scale, zp, 0.0, full
    if signed:
        half = float(2 ** (n_bits - 1))
        return scale, 0.0, -half, half - 1.0
    return scale, 0.0, 0.0, full


def write_state(values, tensors) -> None:
    """Copy numpy results into the state tensors in place (bumping their version counters)."""
    for value, tensor in zip(values, tensors):
        tensor.copy_(torch.as_tensor(np.asarray(value), dtype=tensor.dtype).reshape(tensor.shape))


def update_range_f32(lo, hi, old_lo, old_hi, estimator: int, momentum: float):
    """``update_range_reference`` for one range held in numpy float32 scalars (each operation is
    rounded to float32, as torch's are). A NaN old bound means "no range yet": that bound takes
    the batch's, each side on its own, as in the reference; a batch without a finite value
    (``lo = +inf``) keeps the old range, NaN included."""
    if not math.isfinite(lo):
        return old_lo, old_hi
    if estimator == ESTIMATOR_CURRENT:
        return lo, hi
    if estimator == ESTIMATOR_ALL:  # torch.minimum / maximum: the first argument on ties; NaN: the batch's
        return (old_lo if old_lo <= lo else lo), (old_hi if old_hi >= hi else hi)
    if estimator == ESTIMATOR_RUNNING:  # ema_range: a * batch + m * old, or whichever side is finite
        a, m = F32(1 - momentum), F32(momentum)
        if old_lo == old_lo:
            if math.isfinite(lo):
                lo = a * lo + m * old_lo if math.isfinite(old_lo) else lo
            else:
                lo = old_lo
        if old_hi == old_hi:
            if math.isfinite(hi):
                hi = a * hi + m * old_hi if math.isfinite(old_hi) else hi
            else:
                hi = old_hi
        return lo, hi
    raise ValueError("update_range: unknown estimator code " + str(estimator))


def qparams_f32(x_min, x_max, n_bits: int, symmetric: bool):
    """``qparams_from_range`` for one range held in numpy float32 scalars: ``(delta, zero_float, signed)``."""
    x_min = _ZERO if x_min > 0 else x_min  # torch.minimum / maximum: a NaN ("no range yet") stays NaN
    x_max = _EPS if x_max < _EPS else x_max
    if not symmetric:
        delta = (x_max - x_min) / F32(2**n_bits - 1)
        return delta, -x_min / delta, False
    signed = bool(x_min < 0)
    top = -x_min if (-x_min >= x_max or x_min != x_min) else x_max  # torch.maximum(|x_min|, x_max): NaN wins
    return top / F32(2 ** (n_bits - 1) - 1 if signed else 2**n_bits - 1), _ZERO, signed
