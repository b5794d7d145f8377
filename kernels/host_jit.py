"""The host lane's fused per-tensor kernels, compiled by numba: one call per quantizer forward.

On the CPU the cost of a small quantizer call is its Python: a dozen numpy calls and scalar
operations cost more than the arithmetic on a few thousand elements. These kernels do a whole
call in compiled code, in two passes over ``x`` (the finite min/max, then the fake quantization
with the in-range mask) — the fusion plan of DESIGN §4 on the host.

Numerics: the reference's (``reference.py``) bit for bit. The range and parameter math is
``host_math``'s float32 transcription, compiled as it is (``update_range_f32``, ``qparams_f32``,
``fake_quant_consts``); the element pass is ``y = (clamp(rint(x / scale) + zp, qmin, qmax) - zp)
* scale`` in float32 (correctly rounded division, ``rint`` rounds half to even, no fast-math, so
no fused multiply-adds), ``mask = (clamped == unclamped)`` (NaN: False, like the reference).

Arguments: ``x`` and ``y`` 1-D contiguous float32 arrays of one size; ``mask`` float32 or bool of
that size, or of size 0 for no mask; the state (``delta``, ``zero_float``, ``range_min``,
``range_max`` float32, ``signed`` bool) as 0-d arrays (numpy views of the quantizer's tensors),
read and written in place. Compiled on first use in each process (about a second per argument
types; no disk cache, which could serve a kernel compiled from an older ``host_math``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .host_math import F32, fake_quant_consts, qparams_f32, update_range_f32

__all__ = ["fake_quant_kernel", "train_kernel"]

_JIT = {"nogil": True, "cache": False, "fastmath": False}
_update_range = njit(**_JIT)(update_range_f32)
_qparams = njit(**_JIT)(qparams_f32)
_consts = njit(**_JIT)(fake_quant_consts)


_ABS, _EXP = 0x7FFFFFFF, 0x7F800000
"""float32 bits: all but the sign; the exponent of inf/NaN (``bits & _ABS >= _EXP``: not finite)."""
_NONE_MIN, _NONE_MAX = 2**31 - 1, -(2**31)
"""Keys of NaN bit patterns: a reduction that stays at one of them saw no finite value."""


@njit(**_JIT)
def _finite_minmax(x):
    """Min and max of the finite values of ``x`` (a zero extreme is +0.0); ``(+inf, -inf)`` when
    there is none. One pass over order-preserving integer keys of the float bits (negative floats
    get their magnitude bits flipped): integer min/max vectorise where a NaN-aware float select
    does not, and a bit test leaves NaN and infinities out."""
    bits = x.view(np.int32)
    kmin, kmax = _NONE_MIN, _NONE_MAX
    for i in range(bits.size):
        b = np.int64(bits[i])
        k = b ^ ((b >> 31) & _ABS)
        finite = (b & _ABS) < _EXP
        kmin = min(kmin, k if finite else _NONE_MIN)
        kmax = max(kmax, k if finite else _NONE_MAX)
    out = np.empty(2, np.int32)
    out[0], out[1] = kmin ^ ((kmin >> 63) & _ABS), kmax ^ ((kmax >> 63) & _ABS)  # keys back to float bits
    lo, hi = out.view(np.float32)[0], out.view(np.float32)[1]
    lo = F32(math.inf) if kmin == _NONE_MIN else lo + F32(0.0)
    hi = F32(-math.inf) if kmax == _NONE_MAX else hi + F32(0.0)
    return lo, hi


@njit(**_JIT)
def _fake_quant_pass(x, y, mask, scale, zp, qmin, qmax):
    scale, zp, qmin, qmax = F32(scale), F32(zp), F32(qmin), F32(qmax)
    if mask.size:
        for i in range(x.size):
            r = np.rint(x[i] / scale) + zp  # + zp, 0.0 too: rint's -0.0 becomes +0.0, as in the reference
            c = qmin if r < qmin else (qmax if r > qmax else r)  # NaN stays NaN, like torch.clamp
            mask[i] = c == r
            y[i] = (c - zp) * scale
    else:
        for i in range(x.size):
            r = np.rint(x[i] / scale) + zp
            c = qmin if r < qmin else (qmax if r > qmax else r)
            y[i] = (c - zp) * scale


@njit(**_JIT)
def train_kernel(x, y, mask, delta, zero_float, signed, range_min, range_max, n_bits, symmetric, estimator,
                 momentum):
    """A min/max estimator's training forward: new running range and parameters into the state
    arrays, then ``y`` (and ``mask``) fake-quantized with them."""
    lo, hi = _finite_minmax(x)
    lo, hi = _update_range(lo, hi, range_min[()], range_max[()], estimator, momentum)
    d, z, s = _qparams(lo, hi, n_bits, symmetric)
    range_min[()], range_max[()], delta[()], zero_float[()], signed[()] = lo, hi, d, z, s
    scale, zp, qmin, qmax = _consts(d, z, s, n_bits, symmetric)
    _fake_quant_pass(x, y, mask, scale, zp, qmin, qmax)


@njit(**_JIT)
def fake_quant_kernel(x, y, mask, delta, zero_float, signed, n_bits, symmetric):
    """``y`` (and ``mask``) fake-quantized with the parameters held in the state arrays."""
    scale, zp, qmin, qmax = _consts(delta[()], zero_float[()], signed[()], n_bits, symmetric)
    _fake_quant_pass(x, y, mask, scale, zp, qmin, qmax)
