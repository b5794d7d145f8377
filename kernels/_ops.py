"""Registration of the ``tquant::`` ops that quantizers call on the traced hot path.

``torch.library.custom_op`` dispatches through Python kernels at the autograd and
ADInplaceOrView keys: about 55 us per call of an op that mutates its arguments, which a compiled
QAT step pays once per quantizer. :func:`define_op` registers the same function with one
``CompositeExplicitAutograd`` kernel behind ``Library.define``, so the dispatcher (C++) bumps
the version counters itself: about 4 us. Fake kernels and autograd formulas are added with
``torch.library.register_fake`` / ``register_autograd`` as for any op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["ANY_LAYOUT", "define_op"]

ANY_LAYOUT = (torch.Tag.flexible_layout,)
"""Tag of ops that take inputs of any strides and lay their outputs out like their input.

Without it inductor converts a channels-last activation to contiguous before each such op and
back after it (four extra passes per quantizer in a CNN)."""

_LIB = torch.library.Library("tquant", "FRAGMENT")


def define_op(name: str, fn: Callable, *, mutates_args: Sequence[str] = (),
              tags: Sequence[torch.Tag] = ()) -> torch._ops.OpOverload:
    """Register ``fn`` (fully annotated) as ``tquant::<name>`` and return its ``.default`` overload.

    The schema is inferred from ``fn``'s annotations; ``mutates_args`` names the arguments it
    writes in place (marked ``Tensor(a!)``). The overload is called like ``fn``.
    """
    schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag, *tags))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.tquant, name).default
