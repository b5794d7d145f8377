"""Triton kernels of the ``tquant::group_*`` ops (group-wise quantization, ``group_reference.py``).

The tensor is the contiguous ``[C, K]`` view; group ``q`` (``0 <= q < C * n_groups``, row-major over
``[C, n_groups]``, so ``q`` also indexes the parameters) covers row ``q // n_groups``, columns
``(q % n_groups) * L`` up to ``L`` further (fewer in a row's last group). A program takes ``BLOCK_G``
groups and ``BLOCK_T`` columns of each: the elementwise kernel one such tile (grid: group blocks x
column chunks), the reductions every chunk of their groups (a loop), so no group is split across
programs and no partial sums are needed.

Launches: ``group_update_range`` is one launch for asymmetric quantizers (each program writes its
groups' range, ``delta`` and ``zero_float``) and two for symmetric ones, whose grid depends on the
sign of every group (one flag per quantizer): the range kernel folds its programs' signs into a
device flag with an atomic max and the last program to arrive (an arrival counter) publishes
``signed`` and resets both, with no host synchronisation; a second, elementwise kernel then computes
``delta``. ``group_fake_quant`` is one launch; its LSQ gradients one more. A quantizer's training forward
(:class:`GroupTritonCall`) is two launches either way: symmetric, the fake quantization computes and
stores ``delta`` from the new range on its way.

Host side: a :class:`GroupPlan` states each kernel's launch (geometry, tiles, trailing arguments) once, as
a :class:`~tquant.kernels._triton_launch.Launcher`. The manager's planned call keeps its launchers bound
(no ``JITFunction.run`` per launch); the functional ops plan per call and launch unbound, and the
``triton_op`` functions through ``wrap_triton``, with the same arguments.

Numerics are the reference's bit for bit (``tl.math.div_rn``, the portable round half to even, NaN-
and signed-zero-faithful min/max/clamp from ``_triton_math``, no FMA contraction).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from ._masked_autograd import masked_autograd
from ._triton import tl, triton
from ._triton_launch import Launcher, by_alignment
from ._triton_math import _clamp, _maximum, _minimum, _qparams, _round_half_even
from ._triton_plan import LAUNCH_OPTS, _next_pow2, device_ctx
from ._triton_range import _apply_rule, _old_range, range_rule
from .group_reference import group_shape
from .quantizer_call import TritonLaneCall
from .reference import ESTIMATOR_ALL, ESTIMATOR_CURRENT, ESTIMATOR_RUNNING

__all__ = [
    "GroupPlan",
    "GroupTritonCall",
    "group_fake_quant_triton",
    "group_minmax_triton",
    "group_range_grads_triton",
    "group_update_range_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of one tile; the columns of a group per step. Tests shrink them to exercise the loops.
_MAX_TILE = 2048
_MAX_BLOCK_T = 1024


@triton.jit
def _group_tile(q, t, NG, K, L, Q):
    """Offsets into ``[C, K]`` and the mask of columns ``t`` (``[BLOCK_T]``) of groups ``q`` (``[BLOCK_G]``)."""
    r = q // NG
    col = (q - r * NG)[:, None] * L + t[None, :]
    m = (q < Q)[:, None] & (t < L)[None, :] & (col < K)
    return r[:, None] * K + col, m


@triton.jit
def _symmetric_delta(p_rmin, p_rmax, p_signed, q, qmask, full, half):
    """Symmetric ``delta = max(|x_min|, x_max) / qmax`` of groups ``q`` from their range (after the clamp)."""
    x_min = _minimum(tl.load(p_rmin + q, mask=qmask, other=0.0), 0.0)
    x_max = _maximum(tl.load(p_rmax + q, mask=qmask, other=0.0), 1e-8)
    qmax = tl.where(tl.load(p_signed) != 0, half - 1.0, full)
    return tl.math.div_rn(_maximum(tl.abs(x_min), x_max), qmax)


@triton.jit(do_not_specialize_on_alignment=["p_delta", "p_zf", "p_signed", "p_rmin", "p_rmax"])
def _group_fake_quant_kernel(
    p_x, p_y, p_mask, p_delta, p_zf, p_signed, p_rmin, p_rmax,
    Q, NG, K, L, full, half,
    SYMMETRIC: tl.constexpr, HAS_MASK: tl.constexpr, FROM_RANGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One ``[BLOCK_G, BLOCK_T]`` tile of ``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)``.

    ``FROM_RANGE`` (symmetric, in a training forward): ``delta`` is computed here from the range the range
    kernel just wrote and ``signed``, and the programs of the first column chunk store it (and
    ``zero_float = 0``): the symmetric update's second launch, fused into this one.
    """
    q = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs, m = _group_tile(q, t, NG, K, L, Q)
    if FROM_RANGE:
        delta = _symmetric_delta(p_rmin, p_rmax, p_signed, q, q < Q, full, half)
        if tl.program_id(1) == 0:
            tl.store(p_delta + q, delta, mask=q < Q)
            tl.store(p_zf + q, tl.zeros([BLOCK_G], dtype=tl.float32), mask=q < Q)
        signed = tl.load(p_signed) != 0
        scale = tl.where(delta < 1e-8, 1e-8, delta)[:, None]
        zp = 0.0
        qmin = tl.where(signed, -half, 0.0)
        qmax = tl.where(signed, half - 1.0, full)
    else:
        scale, zp, qmin, qmax = _qparams(p_delta, p_zf, p_signed, q, q < Q, full, half, SYMMETRIC, True)
    x = tl.load(p_x + offs, mask=m, other=0.0).to(tl.float32)
    v = _round_half_even(tl.math.div_rn(x, scale)) + zp
    y = scale * (_clamp(v, qmin, qmax) - zp)
    tl.store(p_y + offs, y.to(p_y.dtype.element_ty), mask=m)
    if HAS_MASK:
        tl.store(p_mask + offs, (v >= qmin) & (v <= qmax), mask=m)


@triton.jit
def _group_batch_range(p_x, q, NG, K, L, Q, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """Min and max (``[BLOCK_G]``) of the finite values of groups ``q``: +inf / -inf where none, a zero +0.0."""
    lo = tl.full([BLOCK_G, BLOCK_T], float("inf"), tl.float32)
    hi = tl.full([BLOCK_G, BLOCK_T], float("-inf"), tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        offs, m = _group_tile(q, t, NG, K, L, Q)
        x = tl.load(p_x + offs, mask=m, other=0.0).to(tl.float32)
        ok = m & (tl.abs(x) < float("inf"))  # NaN and +-inf are left out
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    return tl.min(lo, axis=1) + 0.0, tl.max(hi, axis=1) + 0.0


@triton.jit
def _group_minmax_kernel(p_x, p_bmin, p_bmax, Q, NG, K, L, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    bmin, bmax = _group_batch_range(p_x, q, NG, K, L, Q, BLOCK_G, BLOCK_T)
    tl.store(p_bmin + q, bmin, mask=q < Q)
    tl.store(p_bmax + q, bmax, mask=q < Q)


@triton.jit(do_not_specialize_on_alignment=["p_rmin", "p_rmax", "p_delta", "p_zf", "p_signed", "p_work"])
def _group_range_kernel(
    p_x, p_rmin, p_rmax, p_delta, p_zf, p_signed, p_work,
    Q, NG, K, L, N_PROGRAMS, one_minus_m, m, full,
    SYMMETRIC: tl.constexpr, RULE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Batch range of each group, the estimator's update (``update_range_reference``; ``RULE`` as
    ``_triton_range.range_rule`` gives it), then, asymmetric,
    ``delta`` and ``zero_float``; symmetric, the sign flag (``p_work``: ``[neg, arrivals]``, 0 between
    launches; the last program to arrive stores ``signed`` and resets them)."""
    q = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    qmask = q < Q
    bmin, bmax = _group_batch_range(p_x, q, NG, K, L, Q, BLOCK_G, BLOCK_T)
    old_min, old_max = _old_range(p_rmin, p_rmax, q, qmask, RULE, BLOCK_G)
    new_min, new_max = _apply_rule(bmin, bmax, old_min, old_max, one_minus_m, m, RULE)
    tl.store(p_rmin + q, new_min, mask=qmask)
    tl.store(p_rmax + q, new_max, mask=qmask)
    x_min = _minimum(new_min, 0.0)
    if SYMMETRIC:
        neg = tl.max(tl.where(qmask & (x_min < 0.0), 1, 0), axis=0)
        tl.atomic_max(p_work, neg, sem="release")
        done = tl.atomic_add(p_work + 1, 1, sem="acq_rel")
        if done == N_PROGRAMS - 1:
            signed = tl.atomic_xchg(p_work, 0, sem="acquire")
            tl.store(p_signed, signed > 0)
            tl.store(p_work + 1, 0)
    else:
        x_max = _maximum(new_max, 1e-8)
        delta = tl.math.div_rn(x_max - x_min, full)
        tl.store(p_delta + q, delta, mask=qmask)
        # x * -1.0, not -x: compiled Triton negates as 0 - x (+0.0 for +0.0), torch's -x gives -0.0
        tl.store(p_zf + q, tl.math.div_rn(x_min * -1.0, delta), mask=qmask)


@triton.jit(do_not_specialize_on_alignment=["p_rmin", "p_rmax", "p_delta", "p_zf", "p_signed"])
def _group_symmetric_qparams_kernel(p_rmin, p_rmax, p_delta, p_zf, p_signed, Q, full, half,
                                    BLOCK: tl.constexpr):
    """Symmetric ``delta`` per group, once ``signed`` is known; ``zero_float = 0``."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    qmask = q < Q
    tl.store(p_delta + q, _symmetric_delta(p_rmin, p_rmax, p_signed, q, qmask, full, half), mask=qmask)
    tl.store(p_zf + q, tl.zeros([BLOCK], dtype=tl.float32), mask=qmask)


@triton.jit(do_not_specialize_on_alignment=["p_delta", "p_zf", "p_signed"])
def _group_range_grads_kernel(
    p_g, p_x, p_delta, p_zf, p_signed, p_gd, p_gz,
    Q, NG, K, L, full, half,
    SYMMETRIC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """LSQ gradients of each group's ``delta`` / ``zero_float`` (``fake_quant_range_grads`` per group)."""
    q = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    qmask = q < Q
    scale, zp, qmin, qmax = _qparams(p_delta, p_zf, p_signed, q, qmask, full, half, SYMMETRIC, True)
    acc_s = tl.zeros([BLOCK_G, BLOCK_T], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_G, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        offs, m = _group_tile(q, t, NG, K, L, Q)
        x = tl.load(p_x + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(p_g + offs, mask=m, other=0.0).to(tl.float32)
        xs = tl.math.div_rn(x, scale)
        v = _round_half_even(xs) + zp
        inside = (v >= qmin) & (v <= qmax)
        c = _clamp(v, qmin, qmax) - zp
        # y = s * (c - zp): dy/ds = (c - zp) - inside * x / s ; dy/dzp = s * (inside - 1)
        acc_s += tl.where(m, g * tl.where(inside, c - xs, c), 0.0)
        if not SYMMETRIC:
            acc_z += tl.where(m, tl.where(inside, 0.0, g * -1.0) * scale, 0.0)
    delta = tl.load(p_delta + q, mask=qmask, other=1.0)
    tl.store(p_gd + q, tl.sum(acc_s, axis=1) * tl.where(delta >= 1e-8, 1.0, 0.0), mask=qmask)
    if SYMMETRIC:
        tl.store(p_gz + q, tl.zeros([BLOCK_G], dtype=tl.float32), mask=qmask)
    else:
        rz = _round_half_even(tl.load(p_zf + q, mask=qmask, other=0.0))
        tl.store(p_gz + q, tl.sum(acc_z, axis=1) * tl.where((rz >= 0.0) & (rz <= full), 1.0, 0.0), mask=qmask)


# --------------------------------------------------------------------------------------------
# launch plans
# --------------------------------------------------------------------------------------------


def _blocks(q: int, group_len: int) -> tuple[int, int, int]:
    """``(BLOCK_G, BLOCK_T, num_warps)``: a group's columns (up to ``_MAX_BLOCK_T``), as many groups as fit."""
    block_t = min(_next_pow2(max(group_len, 1)), _MAX_BLOCK_T)
    block_g = min(_next_pow2(max(q, 1)), max(1, _MAX_TILE // block_t))
    tile = block_g * block_t
    return block_g, block_t, 8 if tile >= 2048 else (4 if tile >= 256 else 1)


def _grid_consts(n_bits: int) -> tuple[float, float]:
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"group quantization: n_bits must be an int in 1..16, got {n_bits!r}")
    return float(2**n_bits - 1), float(2 ** (n_bits - 1))


def _check_signed(signed: torch.Tensor) -> None:
    if signed.dtype != torch.bool or signed.numel() != 1:
        raise ValueError(f"signed must be a one-element bool tensor, got {signed.dtype} of shape {tuple(signed.shape)}")


class GroupPlan:
    """How the group kernels run on inputs like ``x`` (shape and dtype; any strides) in groups of ``group_len``
    with ``n_bits`` (None: the min/max kernel only): the ``[C, K]`` geometry, the tiles, and a
    :class:`~tquant.kernels._triton_launch.Launcher` per kernel variant (leading arguments: the pointers).

    The kernels read ``x`` as the contiguous ``[C, K]`` (``rows(x)``: ``x`` itself when contiguous); outputs
    are contiguous in ``x``'s shape.
    """

    __slots__ = ("c", "k", "ng", "q", "group_len", "full", "half", "block_g", "block_t", "num_warps", "copy")

    def __init__(self, x: torch.Tensor, group_len: int, n_bits: int | None, op: str):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
        self.c, self.k, self.ng = group_shape(x, group_len)
        self.q, self.group_len = self.c * self.ng, group_len
        self.full, self.half = (0.0, 0.0) if n_bits is None else _grid_consts(n_bits)
        self.block_g, self.block_t, self.num_warps = _blocks(self.q, group_len)
        self.copy = not x.is_contiguous()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the kernels read it: its contiguous ``[C, K]`` storage."""
        return x.contiguous() if self.copy else x

    def _launcher(self, kernel, grid, tail, constexprs) -> Launcher:
        return Launcher(kernel, grid, tail, dict(constexprs, BLOCK_G=self.block_g, BLOCK_T=self.block_t),
                        dict(num_warps=self.num_warps, **LAUNCH_OPTS))

    def fake_quant(self, symmetric: bool, with_mask: bool, from_range: bool) -> Launcher:
        """:func:`_group_fake_quant_kernel`: ``(x, y, mask or y, delta, zero_float, signed, range_min, range_max)``
        (the range only read ``from_range``; pass ``delta`` twice otherwise)."""
        grid = (triton.cdiv(self.q, self.block_g), triton.cdiv(self.group_len, self.block_t))
        return self._launcher(_group_fake_quant_kernel, grid,
                              (self.q, self.ng, self.k, self.group_len, self.full, self.half),
                              dict(SYMMETRIC=bool(symmetric), HAS_MASK=bool(with_mask), FROM_RANGE=bool(from_range)))

    def range(self, symmetric: bool, rule: int, momentum: float) -> Launcher:
        """:func:`_group_range_kernel`: ``(x, range_min, range_max, delta, zero_float, signed, workspace)``."""
        n_programs = triton.cdiv(self.q, self.block_g)
        return self._launcher(_group_range_kernel, (n_programs,),
                              (self.q, self.ng, self.k, self.group_len, n_programs, 1.0 - momentum, momentum,
                               self.full), dict(SYMMETRIC=bool(symmetric), RULE=rule))

    def symmetric_qparams(self) -> Launcher:
        """:func:`_group_symmetric_qparams_kernel`: ``(range_min, range_max, delta, zero_float, signed)``."""
        block = min(_next_pow2(self.q), 1024)
        return Launcher(_group_symmetric_qparams_kernel, (triton.cdiv(self.q, block),),
                        (self.q, self.full, self.half), dict(BLOCK=block), dict(LAUNCH_OPTS))

    def range_grads(self, symmetric: bool) -> Launcher:
        """:func:`_group_range_grads_kernel`: ``(grad, x, delta, zero_float, signed, grad_delta, grad_zf)``, the
        gradient laid out as ``x`` is read."""
        return self._launcher(_group_range_grads_kernel, (triton.cdiv(self.q, self.block_g),),
                              (self.q, self.ng, self.k, self.group_len, self.full, self.half),
                              dict(SYMMETRIC=bool(symmetric)))

    def minmax(self) -> Launcher:
        """:func:`_group_minmax_kernel`: ``(x, batch_min, batch_max)``."""
        return self._launcher(_group_minmax_kernel, (triton.cdiv(self.q, self.block_g),),
                              (self.q, self.ng, self.k, self.group_len), {})


# --------------------------------------------------------------------------------------------
# functional entry points (the registered ops; with wrap=wrap_triton, the triton_ops below)
# --------------------------------------------------------------------------------------------


def group_fake_quant_triton(x, delta, zero_float, signed, n_bits: int, symmetric: bool, group_len: int,
                            with_mask: bool, wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_fake_quant`` in one launch: ``(y, mask)``, both contiguous in ``x``'s shape (mask empty
    unless ``with_mask``). Parameters fp32 ``[C, n_groups]``; bit-identical to the reference."""
    plan = GroupPlan(x, group_len, n_bits, "group_fake_quant")
    _check_signed(signed)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if with_mask else x.new_empty(0, dtype=torch.bool)
    if plan.q and plan.k:
        with device_ctx(x):
            plan.fake_quant(symmetric, with_mask, False).unbound(
                plan.rows(x), y, mask if with_mask else y, delta, zero_float, signed, delta, delta, wrap=wrap)
    return y, mask


def group_minmax_triton(x: torch.Tensor, group_len: int, wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (fp32 ``[C, n_groups]``) of the finite values of each group: one launch."""
    plan = GroupPlan(x, group_len, None, "group_minmax")
    bmin = torch.empty((plan.c, plan.ng), dtype=torch.float32, device=x.device)
    bmax = torch.empty((plan.c, plan.ng), dtype=torch.float32, device=x.device)
    if plan.q:
        with device_ctx(x):
            plan.minmax().unbound(plan.rows(x.detach()), bmin, bmax, wrap=wrap)
    return bmin, bmax


_WORKSPACES: dict = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """``[neg, arrivals]`` int32 of the symmetric range kernel, per device: 0 between launches (the
    kernel's last program resets them), so it is allocated once, outside any CUDA-graph capture."""
    work = _WORKSPACES.get(device)
    if work is None:
        work = _WORKSPACES[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return work


def group_update_range_triton(x, range_min, range_max, delta, zero_float, signed, n_bits: int, symmetric: bool,
                              group_len: int, estimator: int, momentum: float, first: bool,
                              workspace: torch.Tensor | None = None, wrap=None) -> None:
    """``group_update_range`` (see ``group_quant.py``): one launch (asymmetric) or two (symmetric), no host
    synchronisation. The state tensors are fp32 contiguous ``[C, n_groups]`` (``signed``: bool 0-dim).
    ``workspace``: the quantizer's int32 ``[2]`` (zeros between launches), else one per device."""
    plan = GroupPlan(x, group_len, n_bits, "group_update_range")
    if estimator not in (ESTIMATOR_CURRENT, ESTIMATOR_ALL, ESTIMATOR_RUNNING):
        raise ValueError(f"group_update_range: unknown estimator code {estimator}")
    for name, t in (("range_min", range_min), ("range_max", range_max), ("delta", delta), ("zero_float", zero_float)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"group_update_range: {name} must be a contiguous float32 tensor, got {t.dtype}")
    _check_signed(signed)
    with device_ctx(x):
        if plan.q == 0:
            if symmetric:
                signed.fill_(False)
            return
        plan.range(symmetric, range_rule(estimator, first), momentum).unbound(
            plan.rows(x.detach()), range_min, range_max, delta, zero_float, signed,
            _workspace(x.device) if workspace is None else workspace, wrap=wrap)
        if symmetric:
            plan.symmetric_qparams().unbound(range_min, range_max, delta, zero_float, signed, wrap=wrap)


def group_range_grads_triton(grad, x, delta, zero_float, signed, n_bits: int, symmetric: bool,
                             group_len: int, wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ gradients ``(grad_delta, grad_zero_float)`` (fp32 ``[C, n_groups]``) of ``group_fake_quant``:
    one launch, each group summed by one program (deterministic)."""
    plan = GroupPlan(x, group_len, n_bits, "group_fake_quant_range_grads")
    if grad.shape != x.shape:
        raise ValueError(f"group_fake_quant_range_grads: grad {tuple(grad.shape)} != x {tuple(x.shape)}")
    _check_signed(signed)
    grad_delta = torch.empty((plan.c, plan.ng), dtype=torch.float32, device=x.device)
    grad_zf = torch.empty((plan.c, plan.ng), dtype=torch.float32, device=x.device)
    if plan.q:
        with device_ctx(x):
            plan.range_grads(symmetric).unbound(grad.contiguous(), plan.rows(x), delta.contiguous(),
                                                zero_float.contiguous(), signed, grad_delta, grad_zf, wrap=wrap)
    return grad_delta, grad_zf


# --------------------------------------------------------------------------------------------
# the quantization manager's planned call
# --------------------------------------------------------------------------------------------


class GroupTritonCall(TritonLaneCall):
    """A group-wise quantizer's eager forward on the Triton lane (``group_quant.group_call``): planned once per
    input layout, each launch through a bound variant (``_triton_launch``), as the per-tensor lane's
    ``_TritonCall``. ``train(x)``: two launches, the range kernel then the fake quantization (symmetric: it
    also computes and stores ``delta`` from the new range and ``signed``, the state that ``group_update_range``
    leaves, bit for bit); ``fixed(x)``: one; autograd as ``QuantizerCall``'s (the 1-byte mask; learned ranges:
    one more launch for their gradients). State entry 5 locates the estimator's int32 ``[2]`` workspace.
    """

    def __init__(self, x: torch.Tensor, n_bits: int, symmetric: bool, group_len: int, estimator: int | None,
                 momentum: float, state):
        super().__init__(n_bits, symmetric, 0, estimator, momentum, state)
        self.plan = plan = GroupPlan(x, group_len, n_bits, "group quantization")
        self.group_len = group_len
        self._launch = bool(plan.q and plan.k)
        self._new = (tuple(x.shape), x.dtype, x.device)

        self._fq = [by_alignment(lambda _, m=m: plan.fake_quant(symmetric, m, False)) for m in (False, True)]
        self._fq_train = self._fq
        if symmetric:  # the training forward's fake quantization computes delta from the new range
            self._fq_train = [by_alignment(lambda _, m=m: plan.fake_quant(symmetric, m, True)) for m in (False, True)]
        if self.fused:
            rule = range_rule(estimator)
            self._up = by_alignment(lambda _: plan.range(symmetric, rule, self.momentum))
        self._grads = plan.range_grads(symmetric)
        self._ranges = None  # (range_min, range_max) while a training forward fake-quantizes

    def train(self, x):
        delta, zero_float, signed, range_min, range_max = self.tensors()
        work, key = self.state[5]
        if not self.plan.q:
            if self.symmetric:
                signed.fill_(False)
            return self.apply(x, delta, zero_float, signed)
        xk = self.plan.rows(x)
        self._up[xk.data_ptr() % 16 == 0](xk, range_min, range_max, delta, zero_float, signed, work[key])
        if not self.symmetric:
            return self.apply(x, delta, zero_float, signed)
        self._ranges = (range_min, range_max)
        try:
            return self.apply(x, delta, zero_float, signed)
        finally:
            self._ranges = None

    def forward(self, x, delta, zero_float, signed, with_mask):
        shape, dtype, device = self._new
        y = torch.empty(shape, dtype=dtype, device=device)
        mask = torch.empty(shape, dtype=torch.bool, device=device) if with_mask else None
        if self._launch:
            xk = self.plan.rows(x)
            ranges = self._ranges
            launchers = (self._fq if ranges is None else self._fq_train)[with_mask]
            launchers[xk.data_ptr() % 16 == 0](xk, y, y if mask is None else mask, delta, zero_float, signed,
                                               *(ranges or (delta, delta)))
        return y, mask

    def range_grads(self, grad, x, delta, zero_float, signed):
        shape = (self.plan.c, self.plan.ng)
        grad_delta = torch.empty(shape, dtype=torch.float32, device=x.device)
        grad_zf = torch.empty(shape, dtype=torch.float32, device=x.device)
        if self.plan.q:
            grad, x = grad.contiguous(), x.contiguous()
            if grad.data_ptr() % 16 or x.data_ptr() % 16:  # the bound variant assumes aligned rows
                grad, x = grad.clone(), x.clone()
            self._grads(grad, x, delta, zero_float, signed, grad_delta, grad_zf)
        return grad_delta, grad_zf


# --------------------------------------------------------------------------------------------
# the same launches as torch.library.triton_op: what traced code calls on GPU tensors (_triton_ops.py)
# --------------------------------------------------------------------------------------------


@triton_op("tquant::group_fake_quant_triton", mutates_args=())
def group_fake_quant_op(x: torch.Tensor, delta: torch.Tensor, zero_float: torch.Tensor, signed: torch.Tensor,
                        n_bits: int, symmetric: bool, group_len: int,
                        with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``tquant::group_fake_quant`` as a ``triton_op``; autograd in ``group_quant.py``."""
    return group_fake_quant_triton(x, delta, zero_float, signed, n_bits, symmetric, group_len, with_mask,
                                   wrap=wrap_triton)


@triton_op("tquant::group_fake_quant_range_grads_triton", mutates_args=())
def group_range_grads_op(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, zero_float: torch.Tensor,
                         signed: torch.Tensor, n_bits: int, symmetric: bool,
                         group_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return group_range_grads_triton(grad, x, delta, zero_float, signed, n_bits, symmetric, group_len,
                                    wrap=wrap_triton)


@triton_op("tquant::group_update_range_triton",
           mutates_args=("workspace", "range_min", "range_max", "delta", "zero_float", "signed"))
def group_update_range_op(x: torch.Tensor, workspace: torch.Tensor, range_min: torch.Tensor,
                          range_max: torch.Tensor, delta: torch.Tensor, zero_float: torch.Tensor,
                          signed: torch.Tensor, n_bits: int, symmetric: bool, group_len: int, estimator: int,
                          momentum: float) -> None:
    """``tquant::group_update_range`` with the quantizer's workspace (int32 ``[2]``), as a ``triton_op``."""
    group_update_range_triton(x, range_min, range_max, delta, zero_float, signed, n_bits, symmetric, group_len,
                              estimator, momentum, False, workspace=workspace, wrap=wrap_triton)


masked_autograd("group_fake_quant_triton", group_fake_quant_op, group_range_grads_op, 2)
