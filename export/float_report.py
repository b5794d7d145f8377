"""What stays float after onnxruntime's optimisations, by module path, and what would make it integer.

:func:`node_scopes` reads, before the exporter's metadata is stripped, the module path each ONNX node
came from (``layer1.conv1``, ``blocks.0.ln2``; the exporter records ``pkg.torch.onnx.name_scopes``).
:func:`float_op_notes` then opens the written file in onnxruntime (all optimisations), takes the
compute nodes it still runs in float, and says for each one where it comes from and why it is float:

- onnxruntime has no integer kernel for the op (LayerNorm, GELU, ...): nothing to do;
- a Conv/Gemm/MatMul whose input or output is not quantized, an integer-capable op (Add, Mul,
  Softmax, pooling, ...) outside a DequantizeLinear/QuantizeLinear pair: the fix is an input or output
  quantizer there, which ``convert_to_quantized(..., example_inputs=...)`` places by itself;
- 4-bit weights: onnxruntime has no int4 kernel for that op.
"""

from __future__ import annotations

import ast
from collections import Counter

import onnx_ir as ir

__all__ = ["NO_INTEGER_KERNEL", "FloatOpsWarning", "float_op_notes", "node_scopes"]


class FloatOpsWarning(UserWarning):
    """:func:`~tquant.export.export_onnx`: compute nodes of a quantized model that onnxruntime runs in float."""

NO_INTEGER_KERNEL = frozenset({
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Gelu", "BiasGelu",
    "FastGelu", "Erf", "Tanh", "Pow", "Sqrt", "Div", "Sub",
})
"""Float ops onnxruntime's CPU provider has no QDQ integer fusion for."""
_MATMULS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(model: ir.Model) -> dict[str, str]:
    """``{node name: module path}`` from the exporter's scope metadata (call before stripping it)."""
    scopes = {}
    for node in model.graph.all_nodes():
        text = node.metadata_props.get(_SCOPE_KEY)
        if not text or not node.name:
            continue
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(names, list) and names:
            scopes[node.name] = (str(names[-2]) if len(names) > 1 else "") or "<model>"
    return scopes


def _producer_op(graph, value_name: str) -> str | None:
    for node in graph.node:
        if value_name in node.output:
            return node.op_type
    return None


def _consumer_ops(graph, value_name: str) -> list[str]:
    return [node.op_type for node in graph.node if value_name in node.input]


def _why(node, graph, four_bit: set[str]) -> str:
    """Why the exported ``node`` runs in float, and the fix."""
    op = node.op_type
    graph_path = "convert_to_quantized(model, qmap, example_inputs=...) does this"
    if op in NO_INTEGER_KERNEL:
        return "onnxruntime has no integer kernel for it"
    if op == "BatchNormalization":
        return f"a batch norm not folded into the conv before it (QuantizationMap.fold_batch_norm; {graph_path})"
    if op in ("Relu", "Clip", "LeakyRelu"):
        return f"an activation not folded into the layer before it (QuantizationMap.fold_activations; {graph_path})"
    if any(name in four_bit for name in node.input):
        return "its weights are stored in 4 bits, for which onnxruntime has no integer kernel (8-bit weights would be)"
    data = [name for name in node.input[:2 if op in ("MatMul", "Add", "Mul") else 1] if name]
    float_in = [name for name in data if _producer_op(graph, name) != "DequantizeLinear"]
    outs = _consumer_ops(graph, node.output[0]) if node.output else []
    parts = []
    if float_in:
        parts.append("an input is not quantized (an input quantizer would make it integer)")
    if op in _MATMULS - {"MatMul", "Gemm", "FusedGemm", "FusedMatMul"} and outs and "QuantizeLinear" not in outs:
        parts.append(f"its output is not quantized (it feeds {', '.join(sorted(set(outs)))})")
    if not parts and "QuantizeLinear" not in outs and op not in _MATMULS:
        parts.append("its output is not quantized")
    return f"{'; '.join(parts)} ({graph_path})" if parts else "onnxruntime did not fuse it"


def float_op_notes(path: str, scopes: dict[str, str]) -> list[str]:
    """One line per float compute node onnxruntime keeps in ``path``, grouped by module path."""
    import onnx

    from .ort_graph import optimized_graph

    optimized = optimized_graph(path)
    if not optimized.float_nodes:
        return []
    graph = onnx.load(path, load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    four_bit = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    four_bit |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in four_bit}
    producer = {out: n for n in graph.node for out in n.output}
    grouped: Counter = Counter()
    for op, name in optimized.float_nodes:
        node = by_name.get(name) or by_name.get(name.split("/")[0])  # "node_MatMul_76/MatMulScaleFusion/"
        if node is None:  # a node onnxruntime made from several: the file's node that wrote its output
            node = next((producer[v] for v in optimized.float_node_outputs.get(name, ()) if v in producer), None)
        where = scopes.get(node.name if node is not None else name, f"node '{name}'")
        why = _why(node, graph, four_bit) if node is not None and node.op_type == op else (
            f"{_why(node, graph, four_bit)} (onnxruntime fused it from several nodes)" if node is not None
            else "onnxruntime made it from several nodes")
        grouped[(op, where, why)] += 1
    return [
        f"{op}{f' x{n}' if n > 1 else ''} at '{where}' stays float: {why}" for (op, where, why), n in grouped.items()
    ]
