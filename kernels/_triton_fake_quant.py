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

Memory layout: every input is described as a 2-D ``[ROWS, COLS]`` view with strides
(``ROWS`` is the channel dim for per-channel parameters, 1 for a per-tensor contiguous
tensor). Dims are merged without a copy whenever the strides allow it, so transposed and
sliced views run in place, and dims are taken in memory order first (channels-last needs no
copy); only inputs that still cannot be described that way are made contiguous. Outputs have
the layout of ``torch.empty_like(x)``, as the op's fake implementation promises.

This module is imported lazily by ``fake_quant.py`` (Triton is optional for tquant); the
shared helpers here (:func:`_round_half_even`, :func:`_qparams`, :func:`_as_2d`, ...) are
also used by ``_triton_range.py``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ._triton import tl, triton
from .reference import EPS

__all__ = ["fake_quant_forward_triton", "fake_quant_range_grads_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The kernels spell EPS as the literal 1e-8 (a module global is not a constexpr in every Triton).
assert EPS == 1e-8

# Largest tile (elements) one program touches per step; tests shrink it to exercise the
# multi-program, multi-step and partial-reduction paths on tiny tensors.
_MAX_TILE = 2048
# Programs per SM for the split reductions (range, range gradients).
_PROGRAMS_PER_SM = 4
# Programs a split reduction aims for without a GPU (interpreter: programs run one by one).
_CPU_PROGRAMS = 4
# Partials-finalize kernels: elements per step (channels x partials) and at most this many partials.
_FINALIZE_TILE = 4096
_FINALIZE_BLOCK_P = 64


# --------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
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
        inside = (v >= qmin) & (v <= qmax)
        tl.store(p_mask + offs, inside.to(tl.uint8), mask=m)


@triton.jit
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


@triton.jit
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
# Host helpers (shared with _triton_range.py)
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _collapse(shape, strides_list, keep_dim0: bool):
    """``(ROWS, COLS, [(s_row, s_col), ...])`` describing same-shaped tensors as one 2-D view.

    Merges adjacent dims whose strides allow it in every tensor (size-1 dims are dropped), so
    ``x[i, j]`` over the row-major flattening of ``shape`` sits at ``i * s_row + j * s_col``.
    ``keep_dim0`` keeps dim 0 as the rows (per-channel). Returns ``None`` when no such view exists.
    """
    if keep_dim0:
        head = [(shape[0], [s[0] for s in strides_list])]
        dims = [(shape[d], [s[d] for s in strides_list]) for d in range(1, len(shape)) if shape[d] != 1]
    else:
        head = []
        dims = [(shape[d], [s[d] for s in strides_list]) for d in range(len(shape)) if shape[d] != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, strides in dims:
        if merged:
            psize, pstrides = merged[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                merged[-1] = (psize * size, strides)
                continue
        merged.append((size, strides))
    n_tensors = len(strides_list)
    if keep_dim0:
        if len(merged) > 1:
            return None
        cols, col_strides = merged[0] if merged else (1, [1] * n_tensors)
        rows, row_strides = head[0]
    else:
        if len(merged) > 2:
            return None
        while len(merged) < 2:
            merged.insert(0, (1, [0] * n_tensors))
        (rows, row_strides), (cols, col_strides) = merged
    return rows, cols, list(zip(row_strides, col_strides))


def _as_2d(inputs: list[torch.Tensor], per_channel: bool, outputs: list[torch.Tensor] = ()):
    """One 2-D view (see :func:`_collapse`) of same-shaped ``inputs`` and ``outputs``.

    Dims are first put in the memory order of the first output (or input) — dim 0 stays first
    per channel — so dense layouts such as channels-last or permuted views need no copy. Inputs
    that still do not fit are made contiguous (in that order). Returns
    ``(inputs, outputs, rows, cols, strides)`` (strides: inputs then outputs), or ``None`` when
    the outputs themselves cannot be described (the caller then uses contiguous temporaries).
    """
    tensors = list(inputs) + list(outputs)
    ref = tensors[len(inputs)] if outputs else tensors[0]
    if ref.numel() == 0:
        rows = ref.shape[0] if per_channel else 1
        return list(inputs), list(outputs), rows, 0, [(0, 0)] * len(tensors)
    start = 1 if per_channel else 0
    order = list(range(start)) + sorted(range(start, ref.dim()), key=lambda d: -ref.stride(d))
    tensors = [t.permute(order) for t in tensors]
    shape = tuple(tensors[0].shape)
    desc = _collapse(shape, [t.stride() for t in tensors], per_channel)
    if desc is None:
        tensors = [t.contiguous() for t in tensors[: len(inputs)]] + tensors[len(inputs):]
        desc = _collapse(shape, [t.stride() for t in tensors], per_channel)
        if desc is None:
            return None
    rows, cols, strides = desc
    return tensors[: len(inputs)], tensors[len(inputs):], rows, cols, strides


def _tile(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_R, num_warps)`` for a [rows, cols] problem: wide along the columns."""
    block_r = min(_next_pow2(max(cols, 1)), _MAX_TILE)
    block_c = min(_next_pow2(max(rows, 1)), max(1, _MAX_TILE // block_r))
    tile = block_c * block_r
    num_warps = 8 if tile >= 2048 else (4 if tile >= 256 else 1)
    return block_c, block_r, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_splits(x: torch.Tensor, n_row_blocks: int, n_col_blocks: int) -> int:
    """Programs per row block of a split reduction: enough to fill the device, at most one per tile."""
    if x.is_cuda:
        target = _PROGRAMS_PER_SM * _sm_count(x.device.index if x.device.index is not None else 0)
    else:
        target = _CPU_PROGRAMS
    return max(1, min(n_col_blocks, target // max(n_row_blocks, 1)))


def _split_plan(x: torch.Tensor, rows: int, cols: int, per_channel: bool):
    """Grid of a split reduction over a ``[rows, cols]`` view: ``(block_c, block_r, num_warps, n_split,
    n_programs, n_channels, n_partials)``; partials are laid out ``[n_channels, n_partials]``."""
    block_c, block_r, num_warps = _tile(rows, cols)
    n_rb, n_cb = triton.cdiv(rows, block_c), triton.cdiv(cols, block_r)
    n_split = _n_splits(x, n_rb, n_cb)
    n_programs = n_rb * n_split
    n_channels = rows if per_channel else 1
    n_partials = n_split if per_channel else n_programs
    return block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials


def _finalize_blocks(n_channels: int, n_partials: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` of a finalize step over ``[n_channels, n_partials]`` partials."""
    block_p = min(_FINALIZE_BLOCK_P, _next_pow2(max(n_partials, 1)))
    block_c = min(_next_pow2(max(n_channels, 1)), max(1, _FINALIZE_TILE // block_p))
    return block_c, block_p


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_opts() -> dict:
    # No FMA contraction: the eager reference rounds every product before adding.
    return {"enable_fp_fusion": False}


def _grid_consts(n_bits: int) -> tuple[float, float]:
    """``(2^b - 1, 2^(b-1))`` as Python floats (exact in fp32 for b <= 16)."""
    return float(2**n_bits - 1), float(2 ** (n_bits - 1))


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


def _signed_u8(signed: torch.Tensor) -> torch.Tensor:
    """The 0-dim bool ``signed`` as a uint8 view (Triton has no bool pointers)."""
    if signed.dtype != torch.bool or signed.dim() != 0:
        raise ValueError(
            f"signed must be a 0-dim bool tensor, got {signed.dtype} of shape {tuple(signed.shape)}"
        )
    return signed.view(torch.uint8)


# --------------------------------------------------------------------------------------
# Launchers
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
    from ._triton_plan import plan_for

    y, mask = launch_fake_quant(plan_for(x, axis), x, delta.contiguous(), zero_float.contiguous(),
                                _signed_u8(signed), n_bits, symmetric, with_mask)
    return y, (mask if with_mask else x.new_empty(0, dtype=torch.bool))


def launch_fake_quant(plan, x, delta, zero_float, signed_u8, n_bits: int, symmetric: bool, with_mask: bool):
    """One launch of :func:`_fake_quant_fwd_kernel` on a checked input: ``(y, mask or None)``.

    ``plan`` is the :class:`~tquant.kernels._triton_plan.TritonPlan` of ``x``; ``y`` and ``mask``
    get the plan's output strides (those of ``torch.empty_like(x)``).
    """
    if plan.contiguous:
        x = x.contiguous()
    stride = x.stride() if plan.staged else plan.y_stride
    y = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)
    mask = torch.empty_strided(x.shape, stride, dtype=torch.bool, device=x.device) if with_mask else None
    if plan.grid[0] == 0:
        return y, mask
    with _device_ctx(x):
        _fake_quant_fwd_kernel[plan.grid](
            x, y, mask.view(torch.uint8) if with_mask else y, delta, zero_float, signed_u8,
            plan.rows, plan.cols, plan.sx[0], plan.sx[1], plan.sy[0], plan.sy[1],
            float(2**n_bits - 1), float(2 ** (n_bits - 1)),
            SYMMETRIC=bool(symmetric), PER_CHANNEL=plan.per_channel, HAS_MASK=bool(with_mask),
            BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps, **_launch_opts(),
        )
    if plan.staged:
        y = torch.empty_strided(x.shape, plan.y_stride, dtype=x.dtype, device=x.device).copy_(y)
        if with_mask:
            mask = torch.empty_strided(x.shape, plan.y_stride, dtype=torch.bool, device=x.device).copy_(mask)
    return y, mask


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
    signed_u8 = _signed_u8(signed)
    delta_c, zf_c = delta.contiguous(), zero_float.contiguous()
    (gv, xv), _, rows, cols, ((sg_row, sg_col), (sx_row, sx_col)) = _as_2d([grad, x], per_channel)
    block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials = _split_plan(
        x, rows, cols, per_channel
    )
    part_s = torch.empty(n_channels * n_partials, dtype=torch.float32, device=x.device)
    part_z = part_s if symmetric else torch.empty_like(part_s)
    grad_delta = torch.empty(delta.shape, dtype=torch.float32, device=x.device)
    grad_zf = torch.empty(zero_float.shape, dtype=torch.float32, device=x.device)
    full, half = _grid_consts(n_bits)
    with _device_ctx(x):
        if n_programs > 0:
            _range_grads_partials_kernel[(n_programs,)](
                gv, xv, delta_c, zf_c, signed_u8, part_s, part_z,
                rows, cols, sg_row, sg_col, sx_row, sx_col, n_split, full, half,
                SYMMETRIC=bool(symmetric), PER_CHANNEL=per_channel,
                BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps, **_launch_opts(),
            )
        if n_channels > 0:
            fin_c, fin_p = _finalize_blocks(n_channels, n_partials)
            _range_grads_finalize_kernel[(triton.cdiv(n_channels, fin_c),)](
                part_s, part_z, delta_c, zf_c, grad_delta, grad_zf, n_channels, n_partials, full,
                SYMMETRIC=bool(symmetric), BLOCK_C=fin_c, BLOCK_P=fin_p, **_launch_opts(),
            )
    return grad_delta.to(delta.dtype), grad_zf.to(zero_float.dtype)
