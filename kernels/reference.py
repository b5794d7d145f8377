"""Eager torch references: the numerics every tquant quantizer path must reproduce.

These functions are written for clarity, not speed, and define the truth that the torch
fast path (``fake_quant.py``, ``range_update.py``) and the Triton kernels are tested
against. All math runs in fp32 whatever the input dtype; outputs come back in the input dtype.

Conventions shared by every op in ``tquant.kernels``:

- ``axis`` is ``-1`` for per-tensor parameters (0-dim tensors) or ``0`` for per-channel
  parameters along dim 0 (1-D tensors of length ``x.shape[0]``);
- ``delta`` is the linear-domain step, ``scale = max(delta, EPS)``;
- ``zero_float`` is the real-valued zero point of an asymmetric quantizer
  (``zp = clamp(round(zero_float), 0, 2^b - 1)``); symmetric quantizers have ``zp = 0``;
- ``signed`` is one bool per quantizer (0-dim): a symmetric grid is
  ``[-2^(b-1), 2^(b-1) - 1]`` if signed else ``[0, 2^b - 1]``; asymmetric grids are
  always ``[0, 2^b - 1]``;
- ``round`` is round-half-to-even and ``x / scale`` is a true (correctly rounded) division.
"""

from __future__ import annotations

import torch

EPS = 1e-8
"""Lower clamp of ``x_max`` and of the scale (aihwkit's ``eps``)."""

ESTIMATOR_CURRENT = 0
"""Range of this batch only (``RangeEstimators.current_minmax``)."""
ESTIMATOR_ALL = 1
"""Min of the minima, max of the maxima over all batches (``RangeEstimators.allminmax``)."""
ESTIMATOR_RUNNING = 2
"""Exponential moving average ``(1 - m) * batch + m * old`` (``RangeEstimators.running_minmax``)."""


class RoundStraightThrough(torch.autograd.Function):
    """``torch.round`` (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


round_ste = RoundStraightThrough.apply


def param_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-channel parameter ``[C]`` to broadcast against ``x`` along dim 0."""
    if axis < 0 or x.dim() <= 1:
        return t
    return t.reshape([-1] + [1] * (x.dim() - 1))


def true_divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b``, correctly rounded on every device.

    On CUDA, torch divides a tensor by a Python (CPU) scalar as ``a * (1 / b)``, which can be one bit
    off; a 0-dim divisor on ``a``'s device takes the true division (a fill, no host copy, capturable).
    """
    return a / (a.new_full((), b) if a.is_cuda else b)


def grid_bounds(n_bits: int, symmetric: bool, signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer grid ``(qmin, qmax)`` as fp32 0-dim tensors on ``signed``'s device (no host sync)."""
    full = float(2**n_bits - 1)
    if not symmetric:
        return signed.new_tensor(0.0, dtype=torch.float32), signed.new_tensor(full, dtype=torch.float32)
    half = float(2 ** (n_bits - 1))
    qmin = torch.where(signed, -half, 0.0).float()
    qmax = torch.where(signed, half - 1.0, full).float()
    return qmin, qmax


def qparams_from_range(
    x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """aihwkit's ``set_quant_range`` math: ``(delta, zero_float, signed)`` from a range.

    ``x_min``/``x_max``: fp32 0-dim (per tensor) or ``[C]`` (per channel). The range is first
    clamped to contain zero and be at least ``EPS`` wide (``x_min <= 0 < x_max``).
    Symmetric: ``signed = any(x_min < 0)`` (one flag per quantizer), ``zero_float = 0``.
    """
    x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
    x_max = torch.maximum(x_max.float(), torch.full_like(x_max, EPS, dtype=torch.float32))
    if not symmetric:
        delta = true_divide(x_max - x_min, float(2**n_bits - 1))
        zero_float = -x_min / delta
        signed = torch.zeros((), dtype=torch.bool, device=x_min.device)
        return delta, zero_float, signed
    signed = (x_min < 0).any()
    _, qmax = grid_bounds(n_bits, True, signed)
    delta = torch.maximum(x_min.abs(), x_max) / qmax
    return delta, torch.zeros_like(delta), signed


def scale_and_zero_point(
    delta: torch.Tensor, zero_float: torch.Tensor, n_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = max(delta, EPS)``; ``zp = clamp(round(zero_float), 0, 2^b - 1)`` or 0 (symmetric).

    Differentiable as in aihwkit (round is straight-through), so learned ranges get the
    gradients autograd gives through this expression.
    """
    scale = torch.clamp(delta, min=EPS)
    if symmetric:
        return scale, torch.zeros_like(scale)
    zp = torch.clamp(round_ste(zero_float), 0.0, float(2**n_bits - 1))
    return scale, zp


def fake_quant_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int = -1,
) -> torch.Tensor:
    """``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` with autograd.

    Gradients: straight-through for round, zero outside the grid (clamp), and for ``delta`` /
    ``zero_float`` whatever autograd gives through this expression (the LSQ form).
    Returns a tensor of ``x``'s shape and dtype.
    """
    scale, zp = scale_and_zero_point(delta, zero_float, n_bits, symmetric)
    qmin, qmax = grid_bounds(n_bits, symmetric, signed)
    scale, zp = param_view(scale, x, axis), param_view(zp, x, axis)
    v = round_ste(x.float() / scale) + zp
    y = scale * (torch.clamp(v, qmin, qmax) - zp)
    return y.to(x.dtype)


def quantize_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int = -1,
) -> torch.Tensor:
    """The integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` as int64 (no autograd)."""
    with torch.no_grad():
        scale, zp = scale_and_zero_point(delta, zero_float, n_bits, symmetric)
        qmin, qmax = grid_bounds(n_bits, symmetric, signed)
        scale, zp = param_view(scale, x, axis), param_view(zp, x, axis)
        v = torch.round(x.float() / scale) + zp
        return torch.clamp(v, qmin, qmax).to(torch.int64)


def batch_minmax_reference(x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the finite values of ``x`` (fp32), per tensor or per channel (dim 0).

    Non-finite values (NaN, +-Inf) are ignored; a tensor or channel with no finite value gives
    ``(+inf, -inf)``, which the range update and ``qparams_from_range`` turn into a safe range.
    A zero extreme is +0.0 (``+ 0.0``): which of -0.0 / +0.0 a min/max reduction returns depends on
    its order, so every path makes it the same.
    """
    xf = x.detach().float()
    rows = 1 if axis < 0 else x.shape[0]
    flat = xf.reshape(rows, xf.numel() // rows if rows else 0)
    finite = torch.isfinite(flat)
    inf = torch.tensor(float("inf"), device=x.device)
    if flat.shape[1] == 0:
        bmin = inf.expand(flat.shape[0]).clone()
        bmax = (-inf).expand(flat.shape[0]).clone()
    else:
        bmin = torch.where(finite, flat, inf).amin(dim=1) + 0.0
        bmax = torch.where(finite, flat, -inf).amax(dim=1) + 0.0
    if axis < 0:
        return bmin[0], bmax[0]
    return bmin, bmax


def ema_range(batch: torch.Tensor, old: torch.Tensor, momentum: float) -> torch.Tensor:
    """``(1 - m) * batch + m * old``, falling back to whichever side is finite."""
    ema = (1 - momentum) * batch + momentum * old
    ok_b, ok_o = torch.isfinite(batch), torch.isfinite(old)
    return torch.where(ok_b & ok_o, ema, torch.where(ok_b, batch, old))


def update_range_reference(
    bmin: torch.Tensor,
    bmax: torch.Tensor,
    old_min: torch.Tensor | None,
    old_max: torch.Tensor | None,
    estimator: int,
    momentum: float,
    first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new running range after a batch whose (finite) range is ``(bmin, bmax)``.

    A NaN in the old range means "no range yet" (a quantizer's state before its first batch):
    that element takes the batch range, as every element does when ``first`` is True. So the
    first, initialising step and every later one run the same code on tensors of the same shape.
    """
    if first or estimator == ESTIMATOR_CURRENT:
        return bmin, bmax
    if estimator == ESTIMATOR_ALL:
        new_min, new_max = torch.minimum(old_min, bmin), torch.maximum(old_max, bmax)
    elif estimator == ESTIMATOR_RUNNING:
        new_min, new_max = ema_range(bmin, old_min, momentum), ema_range(bmax, old_max, momentum)
    else:
        raise ValueError(f"update_range: unknown estimator code {estimator}")
    return torch.where(torch.isnan(old_min), bmin, new_min), torch.where(torch.isnan(old_max), bmax, new_max)
