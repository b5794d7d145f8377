"""The ``@triton.jit`` helpers every quantizer kernel shares: torch's rounding, min/max/clamp and qparams.

Each helper reproduces the torch op it is named after bit for bit, in the interpreter and compiled:

- :func:`_round_half_even` is ``torch.round`` built from ``tl.floor``/``tl.where`` (``libdevice.rint``
  does not exist in the interpreter; ``libdevice.round`` rounds half away from zero);
- :func:`_minimum` / :func:`_maximum` / :func:`_clamp` are written with ``tl.where`` in the argument
  order torch uses, so NaN propagation and signed zeros follow torch (``tl.minimum`` on the GPU drops
  NaNs);
- :func:`_qparams` turns the quantizer state (``delta``, ``zero_float``, ``signed``) into
  ``(scale, zp, qmin, qmax)`` as ``reference.scale_and_zero_point`` / ``grid_bounds`` do.

The kernels spell ``EPS`` as the literal ``1e-8`` (a module global is not a constexpr in every Triton).
"""

from __future__ import annotations

from ._triton import tl, triton
from .reference import EPS

assert EPS == 1e-8


@triton.jit
def _round_half_even(v):
    """``torch.round`` (half to even, sign of zero kept) in fp32 without libdevice."""
    r = tl.floor(v)
    frac = v - r  # exact for |v| < 2^23
    r_up = r + 1.0
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    res = tl.where(frac > 0.5, r_up, tl.where(frac < 0.5, r, tl.where(odd, r_up, r)))
    res = tl.where(res == 0.0, v * 0.0, res)  # -0.3 -> -0.0 like rint
    # |v| >= 2^23 is already an integer; inf and NaN pass through.
    return tl.where(tl.abs(v) < 8388608.0, res, v)


@triton.jit
def _minimum(a, b):
    """``torch.minimum(a, b)``: NaN-propagating, returns ``a`` on ties (signed zeros)."""
    return tl.where((b < a) | (b != b), b, a)


@triton.jit
def _maximum(a, b):
    """``torch.maximum(a, b)``: NaN-propagating, returns ``a`` on ties (signed zeros)."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _clamp(v, lo, hi):
    """``torch.clamp(v, lo, hi)``: NaN stays NaN."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _qparams(p_delta, p_zf, p_signed, rows, rmask, full, half, SYMMETRIC: tl.constexpr,
             PER_CHANNEL: tl.constexpr):
    """``(scale, zp, qmin, qmax)`` from the state tensors, shaped to broadcast on a [rows, cols] tile.

    ``scale = max(delta, EPS)``; ``zp = clamp(round(zero_float), 0, full)`` or 0 (symmetric);
    the grid is ``[0, full]`` or, symmetric and signed, ``[-half, half - 1]``.
    """
    if PER_CHANNEL:
        delta = tl.load(p_delta + rows, mask=rmask, other=1.0).to(tl.float32)[:, None]
    else:
        delta = tl.load(p_delta).to(tl.float32)
    scale = tl.where(delta < 1e-8, 1e-8, delta)
    if SYMMETRIC:
        signed = tl.load(p_signed) != 0
        qmin = tl.where(signed, -half, 0.0)
        qmax = tl.where(signed, half - 1.0, full)
        zp = 0.0  # the reference adds a zero zp too (it turns round's -0.0 into +0.0)
    else:
        if PER_CHANNEL:
            zf = tl.load(p_zf + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        else:
            zf = tl.load(p_zf).to(tl.float32)
        zp = _clamp(_round_half_even(zf), 0.0, full)
        qmin = 0.0
        qmax = full
    return scale, zp, qmin, qmax


@triton.jit
def _tile_ids(pid, COLS, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row and column indices (int64) of elementwise tile ``pid`` of a [ROWS, COLS] grid."""
    n_cb = tl.cdiv(COLS, BLOCK_R)
    rb = pid // n_cb
    cb = pid - rb * n_cb
    rows = rb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cols = cb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, cols
