"""What onnxruntime makes of a QDQ file: the node types of its optimised graph and what stays float.

:func:`optimized_graph` opens the file in onnxruntime (CPU provider, all graph optimisations,
one thread), has it write the optimised graph, and returns an :class:`OptimizedGraph`: node
counts by type, the ``QuantizeLinear``/``DequantizeLinear`` nodes left (each one a float
boundary at run time), the fused integer nodes (``QLinearConv``, ``QGemm``, ``QLinearMatMul``,
``MatMulIntegerToFloat``, ...) and the compute nodes that still run in float, with their names.
A fully integer graph has one ``QuantizeLinear`` at the input and, with float logits, no
``DequantizeLinear`` at all (the last ``QGemm`` outputs float).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import onnx

__all__ = ["FLOAT_COMPUTE_OPS", "INTEGER_OPS", "OptimizedGraph", "optimized_graph"]

INTEGER_OPS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QAttention",
    "QLinearReduceMean", "QLinearWhere", "MatMulNBits",
})
"""Node types that compute on integers (onnxruntime's contrib QLinear* family and friends)."""

FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "Add", "Sub", "Mul", "Div",
    "Softmax", "Relu", "Clip", "Sigmoid", "Tanh", "Gelu", "BiasGelu", "FastGelu", "Erf", "LeakyRelu",
    "BatchNormalization", "LayerNormalization", "SkipLayerNormalization", "AveragePool",
    "GlobalAveragePool", "ReduceMean", "Pow", "Sqrt", "Attention", "MultiHeadAttention",
})
"""Node types that do arithmetic in float when they appear in the optimised graph (data movement
such as Reshape, Transpose, MaxPool on integers is not listed: it runs on whatever type it gets)."""


@dataclass
class OptimizedGraph:
    """onnxruntime's optimised graph of one file (see :func:`optimized_graph`)."""

    path: str
    node_counts: dict[str, int] = field(default_factory=dict)
    float_nodes: list[tuple[str, str]] = field(default_factory=list)
    float_node_outputs: dict[str, list[str]] = field(default_factory=dict)
    """Output value names of each float node (names onnxruntime keeps from the file, even for nodes it made)."""

    @property
    def quantize(self) -> int:
        """``QuantizeLinear`` nodes left (onnxruntime's and its contrib domain's)."""
        return self.node_counts.get("QuantizeLinear", 0)

    @property
    def dequantize(self) -> int:
        return self.node_counts.get("DequantizeLinear", 0)

    @property
    def integer_nodes(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.node_counts.items()) if k in INTEGER_OPS}

    def summary(self) -> str:
        fused = ", ".join(f"{k} {v}" for k, v in self.integer_nodes.items()) or "none"
        floats = Counter(op for op, _ in self.float_nodes)
        left = ", ".join(f"{k} {v}" for k, v in sorted(floats.items())) or "none"
        return f"Q {self.quantize} / DQ {self.dequantize} left; integer nodes: {fused}; float compute nodes: {left}"


def _named_nodes(path: str, message: str) -> str:
    """``" (node 'n' is com.example:Op)"`` for the file's nodes whose op the message mentions
    (onnxruntime names the op it lacks, not the node)."""
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # the file itself is unreadable: onnxruntime's message says so
        return ""
    hits = [
        f"node '{n.name or n.output[0]}' is {n.domain + ':' if n.domain else ''}{n.op_type}"
        for n in graph.node
        if f"{n.domain}:{n.op_type}(" in message or f" {n.op_type}(" in message or f"'{n.op_type}'" in message
    ]
    return f" ({'; '.join(hits[:3])}{' ...' if len(hits) > 3 else ''})" if hits else ""


def optimized_graph(path: str | os.PathLike) -> OptimizedGraph:
    """Optimise ``path`` with onnxruntime (CPU, ``ORT_ENABLE_ALL``) and summarise the result.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: onnxruntime cannot load the file (its message names the node and the op,
            e.g. an op the runtime lacks); re-raised with the file name.
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"optimized_graph: no file {path!r}")
    with tempfile.TemporaryDirectory(prefix="tquant-ort-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = out
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        try:
            ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise RuntimeError(f"onnxruntime cannot load {path!r}{_named_nodes(path, str(e))}: {e}") from e
        graph = onnx.load(out, load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    floats = [(node.op_type, node.name) for node in graph.node if node.op_type in FLOAT_COMPUTE_OPS]
    outputs = {node.name: list(node.output) for node in graph.node if node.op_type in FLOAT_COMPUTE_OPS}
    return OptimizedGraph(path, dict(sorted(counts.items())), floats, outputs)
