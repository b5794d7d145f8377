"""Launch plans for the Triton quantizer kernels: decided once per input layout, reused per call.

A :class:`TritonPlan` describes how the kernels see a tensor of one (shape, strides, dtype,
device) with per-tensor or per-channel parameters: the 2-D ``[ROWS, COLS]`` view and its strides
(see ``_as_2d`` in ``_triton_fake_quant.py``), whether the input must be made contiguous first,
the output's strides (those of ``torch.empty_like(x)``; ``staged`` when the kernels cannot write
that layout directly and go through contiguous temporaries), the elementwise grid, the split-reduction
grid and its workspace (the batch min/max and the arrival counter of the one-launch range
update). Building one costs tens of microseconds of Python; using one costs a launch.

Workspaces belong to the plan and are reused by every call in stream order: the range update
leaves its batch min/max at +inf/-inf and its counter at 0. Plans are cached in a small
module-level table (:func:`plan_for`), so two quantizers of the same shape share one; calls from
concurrent CUDA streams on the same plan are not supported.
"""

from __future__ import annotations

import collections

import torch

from ._triton import triton
from ._triton_fake_quant import _as_2d, _finalize_blocks, _split_plan, _tile

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_PLANS = 256


class TritonPlan:
    """How the kernels run on inputs like ``x`` (same shape, strides, dtype, device) with ``axis``."""

    __slots__ = (
        "per_channel", "contiguous", "staged", "rows", "cols", "sx", "sy", "y_stride", "grid", "block_c", "block_r",
        "num_warps", "n_split", "n_programs", "n_channels", "n_partials", "fin_c", "device",
        "_bmin", "_bmax", "_count",
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
        (xv,), _, rows, cols, (self.sx, self.sy) = desc
        self.contiguous = self.staged or (x.numel() > 0 and xv.data_ptr() != x.data_ptr())
        self.rows, self.cols = rows, cols
        self.block_c, self.block_r, self.num_warps = _tile(rows, cols)
        self.grid = (triton.cdiv(rows, self.block_c) * triton.cdiv(cols, self.block_r),)
        (_, _, _, self.n_split, self.n_programs, self.n_channels, self.n_partials) = _split_plan(
            x, rows, cols, self.per_channel
        )
        self.fin_c, _ = _finalize_blocks(self.n_channels, 1)
        self._bmin = self._bmax = self._count = None

    def workspace(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bmin, bmax, count)`` of the one-launch range update: ``[C]`` fp32 at +inf / -inf and an
        int32 arrival counter at 0, the state every launch leaves them in."""
        if self._count is None:
            size = max(self.n_channels, 1)
            self._bmin = torch.full((size,), float("inf"), dtype=torch.float32, device=self.device)
            self._bmax = torch.full((size,), float("-inf"), dtype=torch.float32, device=self.device)
            self._count = torch.zeros(1, dtype=torch.int32, device=self.device)
        return self._bmin, self._bmax, self._count

    def empty_output(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(x.shape, self.y_stride, dtype=x.dtype, device=x.device)


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
