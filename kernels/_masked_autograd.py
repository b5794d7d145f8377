"""The autograd formula of a fake-quant op that returns ``(y, mask)``, and its eager twin.

Such an op is called ``op(x, *params, *rest, with_mask) -> (y, mask)``: ``params`` the range tensors that may
be learned (``delta``, ``zero_float``), ``rest`` the other arguments (tensors such as ``signed``, or
constants). Backward: ``grad * mask`` for ``x`` (the 1-byte mask the forward wrote: the input is not saved)
and, when a range tensor requires grad, ``range_grads(grad, x, *params, *rest)`` for them (then ``x`` and the
tensor arguments are saved too). The group-wise and FP8 op families use it; ``fake_quant.py`` spells the same
formula out for ``tquant::fake_quant``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["masked_autograd"]


def masked_autograd(op_name: str, impl: Callable, range_grads: Callable, n_params: int) -> type:
    """Register the autograd formula of ``tquant::<op_name>``; return its eager twin, an ``autograd.Function``
    whose forward calls ``impl`` directly (no custom-op dispatch: tens of microseconds less per call).

    ``range_grads`` returns the ``n_params`` gradients (one tensor when ``n_params == 1``).
    """

    def setup_context(ctx, inputs, output):
        rest = inputs[1:-1]
        ctx.n_inputs = len(inputs)
        ctx.learn = any(isinstance(p, torch.Tensor) and p.requires_grad for p in rest[:n_params])
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in rest]
        ctx.consts = [None if t else a for a, t in zip(rest, ctx.is_tensor)]
        if ctx.learn:
            ctx.save_for_backward(output[1], inputs[0], *[a for a in rest if isinstance(a, torch.Tensor)])
        else:
            ctx.save_for_backward(output[1])

    def masked_backward(ctx, grad_y, grad_mask):
        mask = ctx.saved_tensors[0]
        grad_x = grad_y * mask if ctx.needs_input_grad[0] else None
        grads = [None] * n_params
        if ctx.learn:
            x, *tensors = ctx.saved_tensors[1:]
            saved = iter(tensors)
            rest = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.consts)]
            out = range_grads(grad_y, x, *rest)
            grads = list(out) if isinstance(out, (tuple, list)) else [out]
        return (grad_x, *grads, *([None] * (ctx.n_inputs - 1 - n_params)))

    torch.library.register_autograd(f"tquant::{op_name}", masked_backward, setup_context=setup_context)

    class EagerTwin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, grad_y, grad_mask):
            return masked_backward(ctx, grad_y, grad_mask)

    EagerTwin.__name__ = EagerTwin.__qualname__ = f"{op_name}_eager"
    return EagerTwin
