"""Graph passes that rewrite a quantized op into the form onnxruntime has an integer kernel for.

:func:`mean_to_global_pool`: onnxruntime's CPU provider has no QDQ fusion for ``ReduceMean``, but
it runs ``DequantizeLinear → GlobalAveragePool → QuantizeLinear`` as ``QLinearGlobalAveragePool``.
A quantized mean over every axis but the batch and one other (``x.mean((2, 3))`` of a CNN,
``x.mean(1)`` over a transformer's tokens, ``adaptive_avg_pool2d(x, 1)``, which the exporter writes
as ``ReduceMean``) becomes ``Transpose`` (when the kept axis is not 1) → ``GlobalAveragePool`` →
``Reshape`` (when the output shape differs): the same values up to float summation order, and
onnxruntime moves the quantization through the Transpose/Reshape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["mean_to_global_pool"]


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
"""Data movement onnxruntime carries a DequantizeLinear through (QDQ propagation, drop-QDQ rules)."""


def _from_dq(value: ir.Value) -> bool:
    """``value`` is a DequantizeLinear output, possibly reshaped or transposed on the way."""
    producer = value.producer()
    while producer is not None and producer.op_type in _MOVES and producer.domain in ("", "ai.onnx"):
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx")


def _to_q_only(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and not value.is_graph_output() and all(
        u.node.op_type == "QuantizeLinear" and u.node.domain in ("", "ai.onnx") for u in uses
    )


def _pool_plan(node: ir.Node) -> tuple[list[int] | None, list[int] | None] | None:
    """``(transpose perm or None, reshape shape or None)`` for a ReduceMean the rewrite covers, else None."""
    x = node.inputs[0]
    if x is None or x.shape is None or not _from_dq(x) or not _to_q_only(node.outputs[0]):
        return None
    rank = len(x.shape)
    axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None or not axes:
        return None
    axes = sorted({a % rank for a in axes})
    kept = [d for d in range(rank) if d not in axes]
    if len(kept) != 2 or kept[0] != 0 or not isinstance(x.shape[kept[1]], int):
        return None
    keepdims = node.attributes.get("keepdims")
    keepdims = 1 if keepdims is None else keepdims.as_int()
    perm = None if kept == [0, 1] else kept + axes
    channels = x.shape[kept[1]]
    if keepdims:
        shape = [0 if d == 0 else 1 if d in axes else channels for d in range(rank)]
    else:
        shape = [0, channels]
    pooled = [0, channels] + [1] * (rank - 2)
    return perm, None if shape == pooled else shape


def mean_to_global_pool(model: ir.Model) -> int:
    """Rewrite each quantized ``ReduceMean`` that :func:`_pool_plan` covers; returns how many."""
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        plan = _pool_plan(node)
        if plan is None:
            continue
        perm, shape = plan
        name = node.name or "mean"
        new_nodes = []
        x = node.inputs[0]
        if perm is not None:
            transpose = ir.Node("", "Transpose", [x], [ir.AttrInt64s("perm", perm)], name=f"{name}_transpose")
            new_nodes.append(transpose)
            x = transpose.outputs[0]
        pool = ir.Node("", "GlobalAveragePool", [x], name=f"{name}_pool")
        new_nodes.append(pool)
        out = pool.outputs[0]
        if shape is not None:
            target = ir.Value(name=f"{name}_shape", shape=ir.Shape([len(shape)]), type=ir.TensorType(ir.DataType.INT64),
                              const_value=ir.tensor(np.array(shape, dtype=np.int64), name=f"{name}_shape"))
            graph.register_initializer(target)
            reshape = ir.Node("", "Reshape", [out, target], name=f"{name}_reshape")
            new_nodes.append(reshape)
            out = reshape.outputs[0]
        out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
        graph.insert_before(node, new_nodes)
        node.outputs[0].replace_all_uses_with(out)
        graph.remove(node, safe=True)
        rewritten += 1
    return rewritten
