"""The Triton lane as ``torch.library.triton_op`` ops: what traced code calls on GPU tensors.

Eager calls launch through the quantizer's plan (``quantizer_call``). Under ``torch.compile`` an opaque
custom op would run its Python at every call and could not be captured in a CUDA graph; a ``triton_op``
instead shows its implementation to the compiler: AOTAutograd decomposes it into its ``wrap_triton``
kernel calls, and inductor launches those kernels itself (no Python per call, capturable), fusing the
elementwise ops around them as usual. The kernels and their numerics are the eager lane's, bit for bit
(their products cannot be contracted into FMAs even where inductor enables FP fusion: see ``_ema``).

- ``tquant::update_range_triton`` — the one-launch range update (mutates the state and the workspace);
- ``tquant::fake_quant_triton`` — ``(y, mask)``; autograd: ``grad * mask`` for ``x`` and, with learned
  ranges, the LSQ gradients of ``delta`` / ``zero_float`` from ``tquant::fake_quant_range_grads_triton``.

Layouts are planned at trace time from the (static) shapes and strides: a new shape retraces.
``torch.export`` keeps the registered ``tquant::update_range`` / ``tquant::fake_quant`` ops instead,
which the ONNX exporter translates (see :func:`traced_triton`).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from . import backend
from ._triton import triton
from ._triton_fake_quant import _fake_quant_fwd_kernel, _range_grads_finalize_kernel, _range_grads_partials_kernel
from ._triton_plan import LAUNCH_OPTS, TritonPlan, _as_2d, _finalize_blocks, _split_plan, grid_consts, plans_for_gpu
from ._triton_range import _update_range_kernel, range_rule

__all__ = ["fake_quant_triton", "traced_triton", "update_range_triton"]

_MUTATED = ("workspace", "arrivals", "range_min", "range_max", "delta", "zero_float", "signed")
# inductor launches user kernels with its own options; it takes num_warps, not enable_fp_fusion
_OPTS = {k: v for k, v in LAUNCH_OPTS.items() if k != "enable_fp_fusion"}


def traced_triton(x: torch.Tensor) -> bool:
    """Whether traced code (compiling, not exporting) should call these ops for ``x``."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and plans_for_gpu(x)
            and backend.resolve(x) == "triton")


@triton_op("tquant::update_range_triton", mutates_args=_MUTATED)
def update_range_triton(
    x: torch.Tensor,
    workspace: torch.Tensor,
    arrivals: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
    estimator: int,
    momentum: float,
    first: bool,
    fp8_max: float = 0.0,
) -> None:
    """``update_range`` (see ``_triton_range.update_range_triton``) with the caller's workspace and counter
    (``range_update.range_workspace``). ``fp8_max > 0``: an FP8 quantizer's range (``delta = max(|x_min|,
    x_max) / fp8_max``; ``zero_float`` 0, ``signed`` written but unused)."""
    plan = TritonPlan(x, axis)
    if plan.contiguous:
        x = x.contiguous()
    full, half = (fp8_max, fp8_max + 1.0) if fp8_max > 0 else grid_consts(n_bits)
    n_programs = max(plan.n_programs, 1)
    wrap_triton(_update_range_kernel)[(n_programs,)](
        x, workspace, arrivals, range_min, range_max, delta, zero_float, signed,
        plan.rows, plan.cols, plan.sx[0], plan.sx[1], plan.n_split, n_programs, plan.n_channels,
        1.0 - momentum, momentum, full, half,
        PER_CHANNEL=plan.per_channel, SYMMETRIC=bool(symmetric), RULE=range_rule(estimator, first),
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, FIN_C=plan.fin_c, num_warps=plan.num_warps, **_OPTS,
    )


@triton_op("tquant::fake_quant_triton", mutates_args=())
def fake_quant_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    axis: int,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)`` as ``tquant::fake_quant``: ``y`` like ``torch.empty_like(x)``; ``mask`` bool like ``x``
    (empty when not ``with_mask``)."""
    plan = TritonPlan(x, axis)
    y = plan.empty_output(x)
    mask = plan.empty_output(x, torch.bool) if with_mask else x.new_empty(0, dtype=torch.bool)
    xk = x.contiguous() if plan.contiguous else x
    if plan.grid[0]:
        full, half = grid_consts(n_bits)
        wrap_triton(_fake_quant_fwd_kernel)[plan.grid](
            xk, y, mask if with_mask else y, delta, zero_float, signed,
            plan.rows, plan.cols, plan.sx[0], plan.sx[1], plan.sy[0], plan.sy[1], full, half,
            SYMMETRIC=bool(symmetric), PER_CHANNEL=plan.per_channel, HAS_MASK=bool(with_mask),
            BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps, **_OPTS,
        )
    if plan.staged:
        return plan.unstage(y), (plan.unstage(mask) if with_mask else mask)
    return y, mask


@triton_op("tquant::fake_quant_range_grads_triton", mutates_args=())
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
    """The LSQ gradients ``(grad_delta, grad_zero_float)`` (``_triton_fake_quant.fake_quant_range_grads_triton``)."""
    per_channel = axis == 0
    (gv, xv), _, rows, cols, ((sg_row, sg_col), (sx_row, sx_col)), _ = _as_2d([grad, x], per_channel)
    block_c, block_r, num_warps, n_split, n_programs, n_channels, n_partials = _split_plan(
        x, rows, cols, per_channel
    )
    part_s = torch.empty(n_channels * n_partials, dtype=torch.float32, device=x.device)
    part_z = torch.empty_like(part_s)
    grad_delta = torch.empty(delta.shape, dtype=torch.float32, device=x.device)
    grad_zf = torch.empty(zero_float.shape, dtype=torch.float32, device=x.device)
    full, half = grid_consts(n_bits)
    if n_programs > 0:
        wrap_triton(_range_grads_partials_kernel)[(n_programs,)](
            gv, xv, delta, zero_float, signed, part_s, part_z,
            rows, cols, sg_row, sg_col, sx_row, sx_col, n_split, full, half,
            SYMMETRIC=bool(symmetric), PER_CHANNEL=per_channel, BLOCK_C=block_c, BLOCK_R=block_r,
            num_warps=num_warps, **_OPTS,
        )
    if n_channels > 0:
        fin_c, fin_p = _finalize_blocks(n_channels, n_partials)
        wrap_triton(_range_grads_finalize_kernel)[(triton.cdiv(n_channels, fin_c),)](
            part_s, part_z, delta, zero_float, grad_delta, grad_zf, n_channels, n_partials, full,
            SYMMETRIC=bool(symmetric), BLOCK_C=fin_c, BLOCK_P=fin_p, **_OPTS,
        )
    return grad_delta, grad_zf


def _setup_context(ctx, inputs, output):
    x, delta, zero_float, signed, n_bits, symmetric, axis, _ = inputs
    ctx.learn = delta.requires_grad or zero_float.requires_grad
    ctx.args = (n_bits, symmetric, axis)
    ctx.save_for_backward(output[1], *((x, delta, zero_float, signed) if ctx.learn else ()))


def _backward(ctx, grad_y, _grad_mask):
    mask = ctx.saved_tensors[0]
    grad_x = torch.where(mask, grad_y, 0.0) if ctx.needs_input_grad[0] else None
    grad_delta = grad_zf = None
    if ctx.learn:
        x, delta, zero_float, signed = ctx.saved_tensors[1:]
        grad_delta, grad_zf = fake_quant_range_grads_triton(grad_y, x, delta, zero_float, signed, *ctx.args)
    return grad_x, grad_delta, grad_zf, None, None, None, None, None


fake_quant_triton.register_autograd(_backward, setup_context=_setup_context)
