"""Triton kernels for ``tquant::fake_quant`` and ``tquant::fake_quant_range_grads``.

Numerics are those of :func:`tquant.kernels.reference.fake_quant_reference`, bit for bit:

- all math in fp32 whatever the input dtype, cast to the output dtype on store;
- ``x / scale`` and the qparam divisions use ``tl.math.div_rn`` (on NVIDIA GPUs a plain fp32
  ``/`` compiles to an approximate division that can flip a code);
- round half to even is :func:`_round_half_even`, built from ``tl.floor``/``tl.where`` because
  ``libdevice.rint`` does not exist in the interpreter; it keeps the sign of zero like
  ``torch.round``;
- ``min``/``max``/``clamp`` are written with ``tl.where`` in the argument order torch uses, so
  NaN propagation and signed zeros follow torch (``tl.minimum`` on the GPU drops NaNs);
- kernels are launched with ``enable_fp_fusion=False`` so ``a * b + c`` is never contracted
  into an FMA that the eager reference does not do.

Memory layout and launch plans: ``_triton_plan.py``. The hot path (a planned quantizer call) launches
through the plan's bound variants (:func:`fake_quant_launcher`); the functional entry points below plan
through the same cache.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from ._triton_launch import Launcher
from ._triton_math import _clamp, _qparams, _round_half_even, _tile_ids
from ._triton_plan import (
    LAUNCH_OPTS,
    TritonPlan,
    _as_2d,
    _finalize_blocks,
    _split_plan,
    device_ctx,
    grid_consts,
    plan_for,
)

__all__ = ["fake_quant_forward_triton", "fake_quant_launcher", "fake_quant_range_grads_triton", "run_fake_quant"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


_STATE_PTRS = ["p_delta", "p_zf", "p_signed"]  # scalars or [C]: their alignment is not specialised on


@triton.jit(do_not_specialize_on_alignment=_STATE_PTRS)
def _fake_quant_fwd_kernel(
    p_x, p_y, p_mask, p_delta, p_zf, p_signed,
    ROWS, COLS, sx_row, sx_col, sy_row, sy_col,
    full, half,
    SYMMETRIC: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One tile of ``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` (+ in-range mask)."""
    pid = tl.program_id(0).to(tl.int64)
    rows, cols = _tile_ids(pid, COLS, BLOCK_C, BLOCK_R)
    rmask = rows < ROWS
    m = rmask[:, None] & (cols < COLS)[None, :]
    x = tl.load(p_x + rows[:, None] * sx_row + cols[None, :] * sx_col, mask=m, other=0.0).to(tl.float32)
    scale, zp, qmin, qmax = _qparams(p_delta, p_zf, p_signed, rows, rmask, full, half, SYMMETRIC, PER_CHANNEL)
    v = _round_half_even(tl.math.div_rn(x, scale)) + zp
    y = scale * (_clamp(v, qmin, qmax) - zp)
    offs = rows[:, None] * sy_row + cols[None, :] * sy_col  # the mask has y's layout
    tl.store(p_y + offs, y.to(p_y.dtype.element_ty), mask=m)
    if HAS_MASK:
        tl.store(p_mask + offs, (v >= qmin) & (v <= qmax), mask=m)


@triton.jit(do_not_specialize_on_alignment=_STATE_PTRS)
def _range_grads_partials_kernel(
    p_g, p_x, p_delta, p_zf, p_signed, p_ps, p_pz,
    ROWS, COLS, sg_row, sg_col, sx_row, sx_col, P,
    full, half,
    SYMMETRIC: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums of the LSQ scale / zero-point gradients: program ``(row block, split)``.

    Per channel the partials are ``[ROWS, P]`` (``row * P + split``); per tensor one per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // P
    split = pid - rb * P
    rows = rb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < ROWS
    scale, zp, qmin, qmax = _qparams(p_delta, p_zf, p_signed, rows, rmask, full, half, SYMMETRIC, PER_CHANNEL)
    acc_s = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    n_cb = tl.cdiv(COLS, BLOCK_R)
    for cb in range(split, n_cb, P):
        cols = cb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        m = rmask[:, None] & (cols < COLS)[None, :]
        x = tl.load(p_x + rows[:, None] * sx_row + cols[None, :] * sx_col, mask=m, other=0.0).to(tl.float32)
        g = tl.load(p_g + rows[:, None] * sg_row + cols[None, :] * sg_col, mask=m, other=0.0).to(tl.float32)
        xs = tl.math.div_rn(x, scale)
        v = _round_half_even(xs) + zp
        inside = (v >= qmin) & (v <= qmax)
        c = _clamp(v, qmin, qmax) - zp
        # y = s * (c - zp): dy/ds = (c - zp) - inside * x / s ; dy/dzp = s * (inside - 1)
        acc_s += tl.where(m, g * tl.where(inside, c - xs, c), 0.0)
        if not SYMMETRIC:
            acc_z += tl.where(m, tl.where(inside, 0.0, g * -1.0) * scale, 0.0)
    if PER_CHANNEL:
        tl.store(p_ps + rows * P + split, tl.sum(acc_s, axis=1), mask=rmask)
        if not SYMMETRIC:
            tl.store(p_pz + rows * P + split, tl.sum(acc_z, axis=1), mask=rmask)
    else:
        tl.store(p_ps + pid, tl.sum(tl.sum(acc_s, axis=1), axis=0))
        if not SYMMETRIC:
            tl.store(p_pz + pid, tl.sum(tl.sum(acc_z, axis=1), axis=0))


@triton.jit(do_not_specialize_on_alignment=["p_delta", "p_zf"])
def _range_grads_finalize_kernel(
    p_ps, p_pz, p_delta, p_zf, p_gd, p_gz, C, P, full,
    SYMMETRIC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Sum the ``[C, P]`` partials; gate by ``delta >= EPS`` and ``0 <= round(zero_float) <= full``."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < C
    acc_s = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        m = rmask[:, None] & (cols < P)[None, :]
        offs = rows[:, None] * P + cols[None, :]
        acc_s += tl.load(p_ps + offs, mask=m, other=0.0)
        if not SYMMETRIC:
            acc_z += tl.load(p_pz + offs, mask=m, other=0.0)
    delta = tl.load(p_delta + rows, mask=rmask, other=1.0).to(tl.float32)
    g_delta = tl.sum(acc_s, axis=1) * tl.where(delta >= 1e-8, 1.0, 0.0)
    tl.store(p_gd + rows, g_delta, mask=rmask)
    if SYMMETRIC:
        tl.store(p_gz + rows, tl.zeros([BLOCK_C], dtype=tl.float32), mask=rmask)
    else:
        rz = _round_half_even(tl.load(p_zf + rows, mask=rmask, other=0.0).to(tl.float32))
        g_zf = tl.sum(acc_z, axis=1) * tl.where((rz >= 0.0) & (rz <= full), 1.0, 0.0)
        tl.store(p_gz + rows, g_zf, mask=rmask)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _check_common(x: torch.Tensor, params: list[torch.Tensor], n_bits: int, axis: int, op: str) -> bool:
    """Validate inputs; returns ``per_channel``."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"{op}: n_bits must be an int in 1..16, got {n_bits!r}")
    if axis not in (-1, 0):
        raise ValueError(f"{op}: axis must be -1 (per tensor) or 0 (per channel, dim 0), got {axis}")
    per_channel = axis == 0
    if per_channel and x.dim() == 0:
        raise ValueError(f"{op}: per-channel quantization (axis=0) needs x.dim() >= 1")
    want = (x.shape[0],) if per_channel else ()
    for p in params:
        if tuple(p.shape) != want and (per_channel or tuple(p.shape) != (1,)):  # a quantizer's are [1] per tensor
            raise ValueError(
                f"{op}: parameter of shape {tuple(p.shape)} does not match x of shape {tuple(x.shape)} "
                f"with axis={axis} (expected {want if per_channel else '() or (1,)'})"
            )
        if p.device != x.device:
            raise ValueError(f"{op}: parameters must be on {x.device}, got {p.device}")
    return per_channel


def _check_signed(signed: torch.Tensor) -> None:
    if signed.dtype != torch.bool or signed.dim() != 0:
        raise ValueError(
            f"signed must be a 0-dim bool tensor, got {signed.dtype} of shape {tuple(signed.shape)}"
        )


def fake_quant_launcher(plan: TritonPlan, n_bits: int, symmetric: bool, with_mask: bool, x_aligned: bool) -> Launcher:
    """The plan's bound :func:`_fake_quant_fwd_kernel` variant; called with ``(x, y, mask or y, delta,
    zero_float, signed)``, ``x`` as :func:`run_fake_quant` passes it."""
    full, half = grid_consts(n_bits)
    constexprs = dict(SYMMETRIC=bool(symmetric), PER_CHANNEL=plan.per_channel, HAS_MASK=bool(with_mask),
                      BLOCK_C=plan.block_c, BLOCK_R=plan.block_r)
    return plan.launcher(("fake_quant", n_bits, bool(symmetric), bool(with_mask), x_aligned), lambda: Launcher(
        _fake_quant_fwd_kernel, plan.grid, (plan.rows, plan.cols, *plan.sx, *plan.sy, full, half), constexprs,
        dict(num_warps=plan.num_warps, **LAUNCH_OPTS)))


def run_fake_quant(plan: TritonPlan, launchers, x, delta, zero_float, signed, with_mask: bool):
    """One launch of :func:`_fake_quant_fwd_kernel` on a checked input: ``(y, mask or None)``.

    ``launchers`` maps the input's alignment (``True``: 16-byte aligned) to the variant, as
    :func:`fake_quant_launcher` makes them. ``y`` and ``mask`` get ``torch.empty_like(x)``'s layout.
    """
    y = plan.empty_output(x)
    mask = plan.empty_output(x, torch.bool) if with_mask else None
    if plan.contiguous:
        x = x.contiguous()
    if plan.grid[0]:
        launchers[x.data_ptr() % 16 == 0](x, y, y if mask is None else mask, delta, zero_float, signed)
    if plan.staged:
        return plan.unstage(y), (None if mask is None else plan.unstage(mask))
    return y, mask


class FakeQuantLaunchers:
    """``{aligned: Launcher}`` of one (plan, n_bits, symmetric, with_mask), made on first use."""

    __slots__ = ("plan", "args")

    def __init__(self, plan: TritonPlan, n_bits: int, symmetric: bool, with_mask: bool):
        self.plan, self.args = plan, (n_bits, symmetric, with_mask)

    def __getitem__(self, x_aligned: bool) -> Launcher:
        return fake_quant_launcher(self.plan, *self.args, x_aligned)


class RangeGradsPlan:
    """The learned-range backward for gradients laid out like ``grad``: the 2-D view (``desc``, from
    :func:`~tquant.kernels._triton_plan._as_2d` of ``[grad, x]``), the split reduction's grid, its partials
    (reused in stream order) and its two launchers. ``plan(grad, x, delta, zero_float, signed)`` launches them
    bound (a quantizer call's plan, from :meth:`make`: None when ``grad`` and ``x`` have no common view without
    copies); :meth:`unbound` launches them on the views ``desc`` holds (the functional op; ``wrap``: the
    ``triton_op``). Both return ``(grad_delta, grad_zero_float)``, fp32, fresh."""

    __slots__ = ("part_s", "part_z", "partials", "finalize")

    def __init__(self, desc, x, per_channel: bool, n_bits: int, symmetric: bool):
        _, _, rows, cols, ((sg_row, sg_col), (sx_row, sx_col)), _ = desc
        block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials = _split_plan(
            x, rows, cols, per_channel)
        self.part_s = torch.empty(n_channels * n_partials, dtype=torch.float32, device=x.device)
        self.part_z = torch.empty_like(self.part_s)
        full, half = grid_consts(n_bits)
        self.partials = Launcher(
            _range_grads_partials_kernel, (n_programs,),
            (rows, cols, sg_row, sg_col, sx_row, sx_col, n_split, full, half),
            dict(SYMMETRIC=bool(symmetric), PER_CHANNEL=per_channel, BLOCK_C=block_c, BLOCK_R=block_r),
            dict(num_warps=num_warps, **LAUNCH_OPTS)) if n_programs > 0 else None
        fin_c, fin_p = _finalize_blocks(n_channels, n_partials)
        self.finalize = Launcher(
            _range_grads_finalize_kernel, (triton.cdiv(n_channels, fin_c),), (n_channels, n_partials, full),
            dict(SYMMETRIC=bool(symmetric), BLOCK_C=fin_c, BLOCK_P=fin_p), dict(LAUNCH_OPTS)
        ) if n_channels > 0 else None

    @classmethod
    def make(cls, grad, x, per_channel: bool, n_bits: int, symmetric: bool):
        desc = _as_2d([grad, x], per_channel)
        return None if desc[-1] else cls(desc, x, per_channel, n_bits, symmetric)

    def __call__(self, grad, x, delta, zero_float, signed):
        if self.partials is not None and (grad.data_ptr() % 16 or x.data_ptr() % 16):
            grad, x = grad.clone(), x.clone()  # the bound variant assumed aligned views
        return self._launch(grad, x, delta, zero_float, signed, self.partials, self.finalize)

    def unbound(self, grad, x, delta, zero_float, signed, wrap=None):
        def unbound(launcher):
            return None if launcher is None else lambda *args: launcher.unbound(*args, wrap=wrap)

        return self._launch(grad, x, delta, zero_float, signed, unbound(self.partials), unbound(self.finalize))

    def _launch(self, grad, x, delta, zero_float, signed, partials, finalize):
        grad_delta = torch.empty(delta.shape, dtype=torch.float32, device=x.device)
        grad_zf = torch.empty(zero_float.shape, dtype=torch.float32, device=x.device)
        if partials is not None:
            partials(grad, x, delta, zero_float, signed, self.part_s, self.part_z)
        if finalize is not None:
            finalize(self.part_s, self.part_z, delta, zero_float, grad_delta, grad_zf)
        return grad_delta, grad_zf


# --------------------------------------------------------------------------------------
# Functional entry points (the registered ops)
# --------------------------------------------------------------------------------------


def fake_quant_forward_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` in one pass: ``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)``.

    Args:
        x: any shape and strides, fp32/fp16/bf16 (not modified).
        delta, zero_float: fp32, 0-dim or ``[1]`` (``axis=-1``) or ``[x.shape[0]]`` (``axis=0``).
        signed: 0-dim bool (symmetric grids).
        with_mask: also write the 1-byte in-range mask ``qmin <= round(x / scale) + zp <= qmax``
            that the backward uses (``grad_x = grad * mask``).
    Returns:
        ``(y, mask)``: ``y`` like ``torch.empty_like(x)`` (shape, dtype and layout, as the op's fake
        implementation says); ``mask`` bool with the same layout, or an empty bool tensor when not
        ``with_mask``. Bit-identical to the reference.

    Example:
        >>> fake_quant_forward_triton(x, torch.tensor(0.1), torch.tensor(0.0), torch.tensor(True),
        ...                           8, True, -1, False)
    """
    _check_common(x, [delta, zero_float], n_bits, axis, "fake_quant")
    _check_signed(signed)
    plan = plan_for(x, axis)
    y, mask = run_fake_quant(plan, FakeQuantLaunchers(plan, n_bits, symmetric, with_mask), x, delta.contiguous(),
                             zero_float.contiguous(), signed, with_mask)
    return y, (mask if with_mask else x.new_empty(0, dtype=torch.bool))


def fake_quant_range_grads_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ gradients ``(grad_delta, grad_zero_float)`` of :func:`fake_quant_forward_triton`.

    With ``xs = x / scale``, ``v = round(xs) + zp``, ``inside = qmin <= v <= qmax`` and
    ``c = clamp(v, qmin, qmax) - zp``:
    ``grad_delta = sum(grad * where(inside, c - xs, c)) * (delta >= EPS)`` and (asymmetric)
    ``grad_zero_float = sum(where(inside, 0, -grad) * scale) * (0 <= round(zero_float) <= 2^b - 1)``;
    symmetric quantizers get ``grad_zero_float = 0``. Sums run per tensor or per channel (dim 0):
    a split reduction into fp32 partials, then one small kernel adds them (deterministic).
    Shapes and dtypes are those of ``delta`` / ``zero_float``.
    """
    per_channel = _check_common(x, [delta, zero_float], n_bits, axis, "fake_quant_range_grads")
    if grad.shape != x.shape:
        raise ValueError(
            f"fake_quant_range_grads: grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}"
        )
    _check_signed(signed)
    desc = _as_2d([grad, x], per_channel)
    with device_ctx(x):
        grad_delta, grad_zf = RangeGradsPlan(desc, x, per_channel, n_bits, symmetric).unbound(
            *desc[0], delta.contiguous(), zero_float.contiguous(), signed)
    return grad_delta.to(delta.dtype), grad_zf.to(zero_float.dtype)
