"""Graph passes on an exported QDQ graph that keep one quantization per tensor.

:func:`collapse_dq_q` removes ``DequantizeLinear → QuantizeLinear`` pairs whose scale, zero point
and axis are equal (re-quantizing a tensor onto the grid it is already on is the identity), so
the consumers read the integer tensor directly. Pairs with different constants are a real
requantization (two rounding steps) and stay; :func:`~tquant.export.onnx_export.double_qdq_pairs`
lists them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["collapse_dq_q"]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _axis(node: ir.Node) -> int:
    attr = node.attributes.get("axis")
    return 1 if attr is None else attr.as_int()


def _same_grid(dq: ir.Node, q: ir.Node) -> bool:
    """Equal constant scale and zero point (values and dtype) and the same axis where per-channel."""
    if len(dq.inputs) != len(q.inputs) or len(dq.inputs) < 3:
        return False
    for a, b in zip(dq.inputs[1:], q.inputs[1:]):
        if a is b:
            continue
        va, vb = _const(a), _const(b)
        if va is None or vb is None or va.dtype != vb.dtype or not np.array_equal(va, vb):
            return False
    scale = _const(dq.inputs[1])
    return scale is None or scale.size <= 1 or _axis(dq) == _axis(q)


def collapse_dq_q(model: ir.Model) -> int:
    """Rewire ``Q(DQ(x))`` with equal constants to ``x``; returns how many QuantizeLinear were removed.

    The ``DequantizeLinear`` is removed too once nothing else reads it. ``QuantizeLinear`` nodes
    whose output is a graph output are kept (the graph's interface does not change).
    """
    graph = model.graph
    removed = 0
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            continue
        for use in list(dq.outputs[0].uses()):
            q = use.node
            if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or use.idx != 0:
                continue
            if q.outputs[0].is_graph_output() or not _same_grid(dq, q):
                continue
            q.outputs[0].replace_all_uses_with(dq.inputs[0])
            graph.remove(q, safe=True)
            removed += 1
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            graph.remove(dq, safe=True)
    return removed
