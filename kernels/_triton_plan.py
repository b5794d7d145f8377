"""Launch plans for the Triton quantizer kernels: how a tensor layout maps onto the kernels' 2-D view.

Memory layout: every input is described as a 2-D ``[ROWS, COLS]`` view with strides (``ROWS`` is
the channel dim for per-channel parameters, 1 for a per-tensor contiguous tensor). Dims are merged
without a copy whenever the strides allow it, so transposed and sliced views run in place, and dims
are taken in memory order first (channels-last needs no copy); only inputs that still cannot be
described that way are made contiguous. Outputs have the layout of ``torch.empty_like(x)``, as the
ops' fake implementations promise.

A :class:`TritonPlan` is that description for one (shape, strides, dtype, device) and axis: the 2-D
view and its strides, whether the input must be made contiguous first, whether the output goes
through contiguous temporaries (``staged``), the elementwise grid and tile, the split-reduction grid.
It also caches the plan's bound kernel variants (:class:`~tquant.kernels._triton_launch.Launcher`),
so a call of a planned quantizer costs a launch, not a ``JITFunction.run``. Building a plan costs
tens of microseconds of Python; the first launch of each variant compiles it.

Device-sized decisions (programs per split reduction) ask :func:`target_programs`; the offline
checks (``triton_offline``) plan CPU tensors as for a GPU with :data:`OFFLINE_SM_COUNT` SMs.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch

from ._triton import triton
from ._triton_launch import Launcher

__all__ = ["TritonPlan", "plan_for", "target_programs"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_PLANS = 256

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

OFFLINE_SM_COUNT: int | None = None
"""SMs of the GPU that CPU tensors are planned for (set by ``triton_offline``; None: plan for the CPU)."""


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plans_for_gpu(x: torch.Tensor) -> bool:
    """Whether launches on ``x`` are planned for a GPU (a CUDA tensor, or the offline checks)."""
    return x.is_cuda or OFFLINE_SM_COUNT is not None


def target_programs(x: torch.Tensor, per_sm: int, cpu: int) -> int:
    """Programs a grid-strided launch on ``x``'s device aims for: ``per_sm`` per SM on a GPU, else ``cpu``."""
    if x.is_cuda:
        return per_sm * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if OFFLINE_SM_COUNT is not None:
        return per_sm * OFFLINE_SM_COUNT
    return cpu


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
    ``(inputs, outputs, rows, cols, strides, copied)`` (strides: inputs then outputs; ``copied``: the
    inputs had to be made contiguous), or ``None`` when the outputs themselves cannot be described (the
    caller then uses contiguous temporaries). Reads no data pointer: works on fake tensors too.
    """
    tensors = list(inputs) + list(outputs)
    ref = tensors[len(inputs)] if outputs else tensors[0]
    if ref.numel() == 0:
        rows = ref.shape[0] if per_channel else 1
        return list(inputs), list(outputs), rows, 0, [(0, 0)] * len(tensors), False
    start = 1 if per_channel else 0
    order = list(range(start)) + sorted(range(start, ref.dim()), key=lambda d: -ref.stride(d))
    tensors = [t.permute(order) for t in tensors]
    shape = tuple(tensors[0].shape)
    desc = _collapse(shape, [t.stride() for t in tensors], per_channel)
    copied = desc is None
    if copied:
        tensors = [t.contiguous() for t in tensors[: len(inputs)]] + tensors[len(inputs):]
        desc = _collapse(shape, [t.stride() for t in tensors], per_channel)
        if desc is None:
            return None
    rows, cols, strides = desc
    return tensors[: len(inputs)], tensors[len(inputs):], rows, cols, strides, copied


def _tile(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_R, num_warps)`` for a [rows, cols] problem: wide along the columns."""
    block_r = min(_next_pow2(max(cols, 1)), _MAX_TILE)
    block_c = min(_next_pow2(max(rows, 1)), max(1, _MAX_TILE // block_r))
    tile = block_c * block_r
    num_warps = 8 if tile >= 2048 else (4 if tile >= 256 else 1)
    return block_c, block_r, num_warps


def _split_plan(x: torch.Tensor, rows: int, cols: int, per_channel: bool):
    """Grid of a split reduction over a ``[rows, cols]`` view: ``(block_c, block_r, num_warps, n_split,
    n_programs, n_channels, n_partials)``; partials are laid out ``[n_channels, n_partials]``.
    Each row block gets enough programs to fill the device, at most one per column tile."""
    block_c, block_r, num_warps = _tile(rows, cols)
    n_rb, n_cb = triton.cdiv(rows, block_c), triton.cdiv(cols, block_r)
    target = target_programs(x, _PROGRAMS_PER_SM, _CPU_PROGRAMS)
    n_split = max(1, min(n_cb, target // max(n_rb, 1)))
    n_programs = n_rb * n_split
    n_channels = rows if per_channel else 1
    n_partials = n_split if per_channel else n_programs
    return block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials


def _finalize_blocks(n_channels: int, n_partials: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` of a finalize step over ``[n_channels, n_partials]`` partials."""
    block_p = min(_FINALIZE_BLOCK_P, _next_pow2(max(n_partials, 1)))
    block_c = min(_next_pow2(max(n_channels, 1)), max(1, _FINALIZE_TILE // block_p))
    return block_c, block_p


def device_ctx(x: torch.Tensor):
    """The CUDA device context of ``x`` (Triton launches on the current device), or a no-op."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


LAUNCH_OPTS = {"enable_fp_fusion": False}
"""Launch options of every quantizer kernel: no FMA contraction (the eager reference rounds every
product before adding)."""


def grid_consts(n_bits: int) -> tuple[float, float]:
    """``(2^b - 1, 2^(b-1))`` as Python floats (exact in fp32 for b <= 16)."""
    return float(2**n_bits - 1), float(2 ** (n_bits - 1))


class TritonPlan:
    """How the kernels run on inputs like ``x`` (same shape, strides, dtype, device) with ``axis``."""

    __slots__ = (
        "per_channel", "contiguous", "staged", "rows", "cols", "sx", "sy", "y_stride", "grid", "block_c", "block_r",
        "num_warps", "n_split", "n_programs", "n_channels", "n_partials", "fin_c", "device", "launchers",
    )

    def __init__(self, x: torch.Tensor, axis: int):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"tquant kernels: x must be float32, float16 or bfloat16, got {x.dtype}")
        if axis not in (-1, 0):
            raise ValueError(f"tquant kernels: axis must be -1 (per tensor) or 0 (per channel, dim 0), got {axis}")
        if axis == 0 and x.dim() == 0:
            raise ValueError("tquant kernels: per-channel quantization (axis=0) needs x.dim() >= 1")
        self.per_channel = axis == 0
        self.device = x.device
        y = torch.empty_like(x, device="meta")
        self.y_stride = y.stride()
        desc = _as_2d([x], self.per_channel, [y])
        self.staged = desc is None
        if self.staged:  # no [C, rest] view of y's layout (dim 0 inside the memory order): go through
            y = torch.empty(x.shape, device="meta")  # contiguous temporaries, then copy into y's layout
            desc = _as_2d([x.contiguous()], self.per_channel, [y])
        _, _, rows, cols, (self.sx, self.sy), copied = desc
        self.contiguous = self.staged or copied
        self.rows, self.cols = rows, cols
        self.block_c, self.block_r, self.num_warps = _tile(rows, cols)
        self.grid = (triton.cdiv(rows, self.block_c) * triton.cdiv(cols, self.block_r),)
        (_, _, _, self.n_split, self.n_programs, self.n_channels, self.n_partials) = _split_plan(
            x, rows, cols, self.per_channel
        )
        self.fin_c, _ = _finalize_blocks(self.n_channels, 1)
        self.launchers: dict = {}

    def launcher(self, key, make) -> Launcher:
        """The plan's launcher for ``key``, made by ``make()`` the first time."""
        launcher = self.launchers.get(key)
        if launcher is None:
            launcher = self.launchers[key] = make()
        return launcher

    def empty_output(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        """An output for the kernels' view of ``x``: ``empty_like(x)``'s layout, or contiguous when staged."""
        if self.staged:
            return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
        return torch.empty_like(x, dtype=dtype)

    def unstage(self, t: torch.Tensor) -> torch.Tensor:
        """A staged (contiguous) output copied into ``empty_like``'s layout; other outputs as they are."""
        if not self.staged:
            return t
        return torch.empty_strided(t.shape, self.y_stride, dtype=t.dtype, device=t.device).copy_(t)


_plans: collections.OrderedDict = collections.OrderedDict()


def plan_for(x: torch.Tensor, axis: int) -> TritonPlan:
    """The cached plan for ``x``'s (shape, strides, dtype, device) and ``axis``."""
    key = (x.shape, x.stride(), x.dtype, x.device, axis)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = TritonPlan(x, axis)
        if len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    return plan
