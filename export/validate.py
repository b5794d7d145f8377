"""``validate_onnx``: run an exported file in onnxruntime and compare it with the PyTorch model.

The comparison speaks in codes and LSBs: an output produced by a ``DequantizeLinear`` lies on its
quantizer's grid, so two runs either agree exactly or differ by whole steps of its scale (the
LSB). Different but legitimate summation orders (onnxruntime's Gemm, integer kernels after
fusion) can move a pre-quantization value across a rounding boundary and flip one code; the
report counts those. For an output that is not quantized, the LSB is unknown: the report gives
its largest absolute and relative error instead.

Float ops that sit between quantizers (a ``DequantizeLinear`` feeding float arithmetic that is
re-quantized later, e.g. an ``nn.MultiheadAttention`` left float) round differently in each
runtime and can move the next codes by several LSBs; :func:`float_ops_between_quantizers` finds
them and the report lists them, so a low agreement comes with its reason.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .prepare import check_eval, flatten_outputs, warn_estimating

__all__ = [
    "FUSED_OP_TYPES",
    "LEVELS",
    "MATMULNBITS_ACCURACY",
    "OutputComparison",
    "ValidationReport",
    "WeightComparison",
    "float_ops_between_quantizers",
    "output_lsb",
    "validate_onnx",
    "weight_comparisons",
]

MATMULNBITS_ACCURACY = "session.qdq_matmulnbits_accuracy_level"
"""onnxruntime session option: the accuracy level of the ``MatMulNBits`` nodes its QDQ optimiser makes from a
group-wise weight's ``DequantizeLinear`` → ``MatMul`` (default 4: activations quantized to int8 per block
inside the kernel, the fastest; ``"1"``: fp32 arithmetic, PyTorch's values up to summation order)."""

LEVELS = ("disabled", "basic", "extended", "all")
"""onnxruntime graph optimisation levels, by name."""

FUSED_OP_TYPES = (
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearReduceMean",
    "QLinearWhere",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "DynamicQuantizeLinear",
)
"""Node types that show onnxruntime fused a QDQ pattern into an integer kernel."""

FLOAT_RTOL = 1e-5
"""Values agree to float precision when ``|a - b| <= FLOAT_RTOL * (|b| + FLOAT_ATOL_REL * max|b|)``."""
FLOAT_ATOL_REL = 1e-3

_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"}

_VALUE_PRESERVING = _SHAPE_OPS | {
    "Relu", "MaxPool", "Concat", "Split", "Slice", "Gather", "Expand", "Pad", "Tile", "Cast", "Dropout",
}
"""Ops whose outputs are values of their inputs: a code on the grid stays on it."""
_NOT_DATA = {"Shape", "Size", "Constant", "ConstantOfShape", "Range"}
"""Ops whose outputs are shapes or constants, not data derived from a quantized tensor."""
_EPILOGUE = {"Add", "Sub", "Mul", "Div", "Clip", "Relu"}
"""Elementwise ops that finish a quantized layer (bias, scale, activation) when their other inputs
are constants."""
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
_FLOAT8_TYPES = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
MAX_NODE_NAMES = 6
"""Node names quoted by ``str(report)`` for the float ops between quantizers."""


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("validate_onnx needs onnxruntime: pip install 'tquant[onnx]'") from e
    return onnxruntime


def output_lsb(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int] | None]:
    """For each graph output, ``(scale, axis)`` of the ``DequantizeLinear`` that produces it, or None.

    Follows shape-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity; Transpose only for
    per-tensor scales) back to the ``DequantizeLinear``. ``axis`` is -1 for a per-tensor scale. An FP8
    ``DequantizeLinear`` gives None (its values are not a grid of one step).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    result: dict[str, tuple[np.ndarray, int] | None] = {}
    for out in model.graph.output:
        name, found, reshaped = out.name, None, False
        while name in producers:
            node = producers[name]
            if node.op_type == "DequantizeLinear":
                zp = consts.get(node.input[2]) if len(node.input) > 2 else None
                if zp is not None and zp.data_type in _FLOAT8_TYPES:
                    break  # FP8 values are not evenly spaced: compared as a float output
                if len(node.input) > 1 and node.input[1] in consts:
                    scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                    if scale.ndim == 0 or scale.size == 1:
                        found = (scale.reshape(()), -1)
                    elif not reshaped:
                        found = (scale, axis)
                break
            if node.op_type not in _SHAPE_OPS:
                break
            reshaped = True
            name = node.input[0]
        result[out.name] = found
    return result


def _consts(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    return consts


def float_ops_between_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that compute in float between a ``DequantizeLinear`` and a later ``QuantizeLinear``.

    A node on such a path is *not* listed when it is part of a quantized layer: value-preserving
    ops (reshapes, ``Relu``, ``MaxPool``, ``Concat``, ...) and, for each ``QuantizeLinear``, the
    one op that produces its input (through value-preserving ops and an epilogue of ``Add``/``Mul``/
    ``Clip``/... with constants, e.g. a bias) when every non-constant input of that op comes
    straight from a ``DequantizeLinear`` and none of its constants is a float tensor of rank >= 2
    (an unquantized weight). That op (``Conv``, ``Gemm``, ``MatMul``, ``LayerNormalization``, an
    ``Add`` of two quantized tensors) rounds once before the quantizer: at most one LSB apart between
    runtimes. Everything else on the path, e.g. the ``MatMul``/``Softmax`` of a float attention or a
    layer whose input is not quantized, is listed, in graph order.
    """
    graph = model.graph
    consts = _consts(model)
    producers = {out: node for node in graph.node for out in node.output}

    from_dq: set[str] = set()
    for node in graph.node:  # graph order is topological
        if node.op_type == "DequantizeLinear" or (
            node.op_type not in _NOT_DATA | {"QuantizeLinear"} and any(i in from_dq for i in node.input)
        ):
            from_dq.update(node.output)
    to_q: set[int] = set()
    stack = [producers[n.input[0]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producers]
    while stack:
        node = stack.pop()
        if id(node) in to_q or node.op_type == "DequantizeLinear":
            continue
        to_q.add(id(node))
        stack += [producers[i] for i in node.input if i in producers]

    def source(name: str):
        node = producers.get(name)
        while node is not None and node.op_type in _VALUE_PRESERVING and node.op_type != "Concat":
            node = producers.get(node.input[0])
        return node

    def is_weight(name: str) -> bool:
        t = consts.get(name)
        return t is not None and len(t.dims) >= 2 and t.data_type in _FLOAT_TYPES

    def is_quantized(name: str) -> bool:
        if name in consts:
            return not is_weight(name)
        return getattr(source(name), "op_type", "") == "DequantizeLinear"

    layer_ops: set[int] = set()
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        chain, node = [], producers.get(q.input[0])
        while node is not None and (
            node.op_type in _VALUE_PRESERVING
            or (node.op_type in _EPILOGUE and sum(i not in consts for i in node.input if i) == 1)
        ):
            chain.append(node)
            node = next((producers.get(i) for i in node.input if i and i not in consts), None)
        if node is None or node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        if all(is_quantized(i) for i in node.input if i):
            layer_ops.update(id(n) for n in chain + [node])
    return [
        n
        for n in graph.node
        if id(n) in to_q
        and any(i in from_dq for i in n.input)
        and n.op_type not in _VALUE_PRESERVING | _NOT_DATA | {"QuantizeLinear", "DequantizeLinear"}
        and id(n) not in layer_ops
    ]


def _upstream(model: onnx.ModelProto, output: str) -> set[int]:
    """Ids of every node the graph output ``output`` depends on."""
    producers = {out: node for node in model.graph.node for out in node.output}
    seen: set[int] = set()
    stack = [producers[output]] if output in producers else []
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack += [producers[i] for i in node.input if i in producers]
    return seen


@dataclass
class OutputComparison:
    """One output at one optimisation level, over every input batch.

    ``match_share``: elements equal to float precision; ``code_share``: elements whose integer
    code (``round(y / lsb)``) agrees (None without an output quantizer); ``max_lsb``: the largest
    error in LSBs (None without one); ``max_abs``: the largest absolute error; ``max_rel``: the
    largest absolute error over the largest magnitude of PyTorch's output (the relative error of
    a float output); ``float_ops``: op type -> count of the float ops between quantizers this output
    depends on (:func:`float_ops_between_quantizers`).
    """

    level: str
    output: str
    numel: int
    match_share: float
    code_share: float | None
    max_lsb: float | None
    max_abs: float
    lsb: float | None
    max_rel: float = 0.0
    float_ops: dict[str, int] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """True when a ``DequantizeLinear`` produces this output (it is compared in codes and LSBs)."""
        return self.lsb is not None


DEFAULT_MAX_LSB = 1.0
"""``ok()``: no code of a quantized output may be further than this from PyTorch's. onnxruntime's
reordered sums and integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat) may land a value on
the other side of a rounding boundary: one LSB, never more, where no float op sits between
quantizers."""
DEFAULT_MIN_CODE_AGREEMENT = 0.5
"""``ok()``: at least this share of a quantized output's codes must equal PyTorch's. Rounding
differences move a minority of codes (seen: 1-11 % with onnxruntime's full optimisations); a
systematic error (a zero point or rounding mode off by one) moves most of them by one LSB, which
``max_lsb`` alone would accept."""
DEFAULT_MAX_REL_ERROR = 1e-2
"""``ok()``: for a float output, the largest ``|onnxruntime - PyTorch|`` over the largest
``|PyTorch|``. A float-only graph agrees to ~1e-6; a float output computed from quantized values
moves by a few LSBs of the quantizers before it when one of their codes flips."""


@dataclass
class WeightComparison:
    """A weight stored in the file (integer or float8 initializer → ``DequantizeLinear``) against the
    PyTorch model's quantized weight: ``name`` the weight quantizer's path, ``stored`` the ONNX type,
    ``equal_share`` the share of values that ``DequantizeLinear`` gives exactly, ``max_abs`` the largest
    difference."""

    name: str
    stored: str
    numel: int
    equal_share: float
    max_abs: float


@dataclass
class ValidationReport:
    """The result of :func:`validate_onnx`; ``print(report)`` shows it as a table.

    ``comparisons``: one :class:`OutputComparison` per (level, output); ``node_counts``: ONNX node
    types per level (for optimised levels, of the graph onnxruntime actually runs);
    ``fused``: the integer node types onnxruntime made at the highest level validated;
    ``float_ops``: op type -> count of the float ops between quantizers in the exported graph and
    ``float_op_nodes`` their node names (:func:`float_ops_between_quantizers`).
    """

    path: str
    n_batches: int
    comparisons: list[OutputComparison] = field(default_factory=list)
    node_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    float_op_nodes: list[str] = field(default_factory=list)
    weights: list[WeightComparison] = field(default_factory=list)
    session_config: dict[str, str] = field(default_factory=dict)

    def level(self, level: str) -> list[OutputComparison]:
        return [c for c in self.comparisons if c.level == level]

    def min_match_share(self, level: str | None = None) -> float:
        rows = self.comparisons if level is None else self.level(level)
        return min(c.match_share for c in rows)

    def max_lsb(self, level: str | None = None) -> float | None:
        """Largest error in LSBs (None when no output is quantized)."""
        rows = [
            c.max_lsb
            for c in (self.comparisons if level is None else self.level(level))
            if c.max_lsb is not None
        ]
        return max(rows) if rows else None

    def failures(
        self,
        max_lsb: float = DEFAULT_MAX_LSB,
        min_code_agreement: float = DEFAULT_MIN_CODE_AGREEMENT,
        max_rel_error: float = DEFAULT_MAX_REL_ERROR,
        level: str | None = None,
        min_match: float | None = None,
    ) -> list[str]:
        """One line per (level, output) that misses a threshold of :meth:`ok`; empty when it passes."""
        problems = []
        for c in self.comparisons if level is None else self.level(level):
            missed = []
            if c.quantized:
                if c.max_lsb > max_lsb + 1e-3:
                    missed.append(f"a code is {c.max_lsb:.2f} LSB from PyTorch's (max_lsb={max_lsb})")
                if c.code_share < min_code_agreement:
                    missed.append(
                        f"{100 * c.code_share:.1f}% of the codes agree (min_code_agreement={min_code_agreement})"
                    )
            elif c.max_rel > max_rel_error:
                missed.append(f"relative error {c.max_rel:.3g} (max_rel_error={max_rel_error})")
            if min_match is not None and c.match_share < min_match:
                missed.append(f"{100 * c.match_share:.2f}% equal to float precision (min_match={min_match})")
            if missed and c.float_ops:
                missed.append(f"float ops between quantizers before it: {_op_counts(c.float_ops)}")
            if missed:
                problems.append(f"output {c.output!r} at level {c.level!r}: " + "; ".join(missed))
        for w in self.weights:
            if w.equal_share < 1.0:
                problems.append(
                    f"weight {w.name!r}: {round((1 - w.equal_share) * w.numel)} of {w.numel} stored values differ "
                    f"from PyTorch's quantized weight (max |diff| {w.max_abs:.3g})"
                )
        return problems

    def ok(
        self,
        max_lsb: float = DEFAULT_MAX_LSB,
        min_code_agreement: float = DEFAULT_MIN_CODE_AGREEMENT,
        max_rel_error: float = DEFAULT_MAX_REL_ERROR,
        level: str | None = None,
        min_match: float | None = None,
    ) -> bool:
        """True when onnxruntime agrees with PyTorch up to its documented rounding differences.

        Every stored weight must decode to PyTorch's quantized weight exactly (:attr:`weights`), and for
        every output at every validated level (or only at ``level``):

        - a quantized output: no code more than ``max_lsb`` LSBs away (default
          :data:`DEFAULT_MAX_LSB` = 1) and at least ``min_code_agreement`` of the codes equal
          (default :data:`DEFAULT_MIN_CODE_AGREEMENT` = 0.5);
        - a float output: ``max |ort - torch| / max |torch| <= max_rel_error`` (default
          :data:`DEFAULT_MAX_REL_ERROR` = 1e-2);
        - with ``min_match``: at least that share of the elements equal to float precision.

        :meth:`failures` says which output missed which threshold.

        Example:
            >>> report = validate_onnx(qmodel, x, "qmodel.onnx")
            >>> assert report.ok(), report.failures()
        """
        return not self.failures(max_lsb, min_code_agreement, max_rel_error, level, min_match)

    def __str__(self) -> str:
        head = ("level", "output", "elements", "match", "codes agree", "max LSB", "max |err|", "max rel", "LSB")
        rows = [head]
        for c in self.comparisons:
            rows.append(
                (
                    c.level,
                    c.output,
                    str(c.numel),
                    f"{100 * c.match_share:.3f}%",
                    "-" if c.code_share is None else f"{100 * c.code_share:.3f}%",
                    "-" if c.max_lsb is None else f"{c.max_lsb:.2f}",
                    f"{c.max_abs:.3g}",
                    "-" if c.quantized else f"{c.max_rel:.3g}",
                    "-" if c.lsb is None else f"{c.lsb:.4g}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"onnxruntime vs PyTorch: {self.path} ({self.n_batches} input batches)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for level, counts in self.node_counts.items():
            nodes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"nodes ({level}): {nodes}")
        fused = ", ".join(f"{k} {v}" for k, v in sorted(self.fused.items())) or "none"
        lines.append(f"fused integer nodes: {fused}")
        if self.session_config:
            lines.append("session options: " + ", ".join(f"{k}={v}" for k, v in self.session_config.items()))
        if self.weights:
            differ = [w for w in self.weights if w.equal_share < 1.0]
            types = ", ".join(f"{k} {v}" for k, v in sorted(Counter(w.stored for w in self.weights).items()))
            verdict = "all equal to" if not differ else f"{len(differ)} differ from"
            lines.append(f"stored weights: {len(self.weights)} ({types}), {verdict} PyTorch's quantized weights")
        if self.float_ops:
            names = ", ".join(self.float_op_nodes[:MAX_NODE_NAMES])
            more = len(self.float_op_nodes) - MAX_NODE_NAMES
            names += f" and {more} more" if more > 0 else ""
            lines.append(
                f"float ops between quantizers: {_op_counts(self.float_ops)} ({names}); they round differently "
                "in each runtime, so the codes after them may differ by more than 1 LSB"
            )
        else:
            lines.append("float ops between quantizers: none")
        return "\n".join(lines)


def _op_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _random_like(x, batch: int, generator: torch.Generator):
    """A random input like ``x`` with dim 0 = ``batch``: same dtype, the example's value range."""
    if not isinstance(x, torch.Tensor):
        return x
    shape = (batch, *x.shape[1:]) if x.dim() >= 1 else x.shape
    if x.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if not x.is_floating_point():
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, shape, generator=generator, dtype=x.dtype)
    xf = x.float()
    mean, std = xf.mean().item(), (xf.std().item() if x.numel() > 1 else 1.0)
    return (torch.randn(shape, generator=generator) * std + mean).to(x.dtype)


def _session(path: str, level: str, optimized_path: str | None, config: dict[str, str] | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _compare(
    level: str, name: str, ort_out: list[np.ndarray], ref_out: list[np.ndarray], lsb
) -> OutputComparison:
    a = np.concatenate([o.reshape(-1) for o in ort_out]).astype(np.float64)
    b = np.concatenate([r.reshape(-1) for r in ref_out]).astype(np.float64)
    diff = np.abs(a - b)
    scale_b = np.abs(b).max() if b.size else 0.0
    match = diff <= FLOAT_RTOL * (np.abs(b) + FLOAT_ATOL_REL * scale_b)
    code_share = max_lsb = lsb_value = None
    if lsb is not None:
        scale, axis = lsb
        parts = []
        for o in ort_out:
            if axis < 0:
                parts.append(np.broadcast_to(scale, o.shape).reshape(-1))
            else:
                shape = [1] * o.ndim
                shape[axis] = -1
                parts.append(np.broadcast_to(scale.reshape(shape), o.shape).reshape(-1))
        s = np.concatenate(parts).astype(np.float64)
        in_lsb = diff / s
        code_share = float(np.mean(np.rint(a / s) == np.rint(b / s))) if a.size else 1.0
        max_lsb = float(in_lsb.max()) if a.size else 0.0
        lsb_value = float(scale.reshape(-1)[0]) if axis < 0 else float(scale.min())
    max_abs = float(diff.max()) if a.size else 0.0
    max_rel = max_abs / float(scale_b) if scale_b > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputComparison(
        level,
        name,
        int(a.size),
        float(match.mean()) if a.size else 1.0,
        code_share,
        max_lsb,
        max_abs,
        lsb_value,
        max_rel,
    )


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _dequantize(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> np.ndarray:
    """ONNX ``DequantizeLinear`` of constant inputs in numpy (per tensor, per axis or blocked), fp32."""
    codes = numpy_helper.to_array(consts[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
    has_zp = len(node.input) > 2 and node.input[2]
    zp = numpy_helper.to_array(consts[node.input[2]]).astype(np.float32) if has_zp else np.zeros_like(scale)
    axis, block = _attr(node, "axis", 1), _attr(node, "block_size", 0)
    axis = axis + codes.ndim if axis < 0 else axis
    if block:
        n = codes.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(range(n), axis=axis)
        zp = np.repeat(zp, block, axis=axis).take(range(n), axis=axis)
    elif scale.ndim == 1 and codes.ndim > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((codes - zp) * scale).astype(np.float32)


def weight_comparisons(model: nn.Module, onnx_model: onnx.ModelProto) -> list[WeightComparison]:
    """Each weight stored in the file (a constant integer or float8 tensor → ``DequantizeLinear`` whose scale is
    ``<weight quantizer>.scale``, as :func:`~tquant.export.export_onnx` names it) decoded in numpy and
    compared with what the PyTorch model's weight quantizer makes of its layer's weight (eval, fixed range).
    The stored layout is the weight's, its ``[C, K]`` view (blocked along axis 1), or (blocked along axis 0: a
    group-wise Linear's ``MatMul`` input) its transpose."""
    import tquant

    consts = _consts(onnx_model)
    modules = dict(model.named_modules())
    found = []
    for node in onnx_model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2 or node.input[0] not in consts:
            continue
        manager_path = node.input[1][: -len(".scale")] if node.input[1].endswith(".scale") else None
        manager = modules.get(manager_path)
        owner = modules.get(manager_path.rpartition(".")[0]) if manager_path else None
        stored = consts[node.input[0]].data_type
        if not isinstance(manager, tquant.QuantizationManager) or owner is None or stored in _FLOAT_TYPES:
            continue
        weight = owner.get_weight_bias()[0] if hasattr(owner, "get_weight_bias") else getattr(owner, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        with torch.no_grad():
            expected = manager(weight.detach())
        got = torch.from_numpy(_dequantize(node, consts))
        if _attr(node, "block_size", 0) and _attr(node, "axis", 1) == 0:  # a group-wise Linear's [K, N] codes
            got = got.t()
        if got.numel() != expected.numel():
            continue
        got = got.reshape(expected.shape)
        got, want = got.to(expected.dtype).float().cpu(), expected.float().cpu()
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        diff = (got - want).abs().nan_to_num(0.0)
        found.append(WeightComparison(manager_path, onnx.TensorProto.DataType.Name(stored), int(want.numel()),
                                      float(same.float().mean()) if want.numel() else 1.0,
                                      float(diff.max()) if want.numel() else 0.0))
    return found


def validate_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    inputs: Sequence | None = None,
    n_random: int = 2,
    levels: Sequence[str] = ("disabled", "all"),
    seed: int = 0,
    session_config: dict[str, str] | None = None,
) -> ValidationReport:
    """Run ``path`` in onnxruntime (CPU provider) and compare it with ``model`` in eval mode.

    Args:
        model: the PyTorch model the file was exported from (eval mode; left unchanged).
        example_inputs: a tensor or a tuple of positional inputs (always validated).
        path: the ``.onnx`` file.
        inputs: extra input batches (each a tensor or a tuple); default: ``n_random`` random
            batches like ``example_inputs`` (same dtype and value range) with one more row, which
            also exercises the dynamic batch dimension.
        n_random: how many random batches when ``inputs`` is None.
        levels: onnxruntime graph optimisation levels to run (``"disabled"``, ``"basic"``,
            ``"extended"``, ``"all"``).
        seed: for the random batches.
        session_config: onnxruntime session config entries for every session, e.g.
            ``{MATMULNBITS_ACCURACY: "1"}`` to run the ``MatMulNBits`` of group-wise weights in fp32
            (onnxruntime's default, 4, quantizes their activations to int8: float outputs then move by
            up to about 1 %).

    Returns:
        a :class:`ValidationReport`: per level and output, the share of elements equal to float
        precision; for a quantized output the share of integer codes that agree and the max error
        in LSBs of the output quantizer; for a float output the max absolute and relative error;
        node counts per level (the optimised graph is saved by onnxruntime and counted); the
        integer node types onnxruntime fused; the float ops between quantizers; each stored weight decoded
        and compared with the model's quantized weight (:func:`weight_comparisons`).
        ``report.ok()`` checks it against thresholds with documented defaults
        (:meth:`ValidationReport.ok`): within 1 LSB, >= 50 % of the codes equal, float outputs
        within 1 % of their range.

    Example:
        >>> report = validate_onnx(qmodel, x, "model.onnx")
        >>> print(report); assert report.ok(), report.failures()
    """
    path = os.fspath(path)
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"validate_onnx: unknown level {level!r}; expected one of {LEVELS}")
    check_eval(model)
    warn_estimating(model, "validate_onnx")
    example = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    batches = [tuple(example)]
    if inputs is not None:
        batches += [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in inputs]
    else:
        g = torch.Generator().manual_seed(seed)
        first = next((x for x in example if isinstance(x, torch.Tensor) and x.dim() >= 1), None)
        batch = (first.shape[0] + 1) if first is not None else 1
        batches += [tuple(_random_like(x, batch, g) for x in example) for _ in range(n_random)]

    refs = []
    with torch.no_grad():
        for b in batches:
            refs.append([t.detach().float().cpu().numpy() for t in flatten_outputs(model(*b))])

    onnx_model = onnx.load(path)
    lsbs = output_lsb(onnx_model)
    out_names = [o.name for o in onnx_model.graph.output]
    float_nodes = float_ops_between_quantizers(onnx_model)
    report = ValidationReport(
        path,
        len(batches),
        float_ops=dict(Counter(n.op_type for n in float_nodes)),
        float_op_nodes=[n.name or n.op_type for n in float_nodes],
        weights=weight_comparisons(model, onnx_model),
        session_config={k: str(v) for k, v in (session_config or {}).items()},
    )
    upstream_ops = {}
    for name in out_names:
        upstream = _upstream(onnx_model, name)
        upstream_ops[name] = dict(Counter(n.op_type for n in float_nodes if id(n) in upstream))
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            optimized = os.path.join(tmp, f"{level}.onnx") if level != "disabled" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = _session(path, level, optimized, session_config)
            feeds_names = [i.name for i in session.get_inputs()]
            results = []
            for b in batches:
                tensors = [x for x in b if isinstance(x, torch.Tensor)]
                feed = {n: t.detach().cpu().numpy() for n, t in zip(feeds_names, tensors)}
                results.append(session.run(None, feed))
            for k, name in enumerate(out_names):
                comparison = _compare(level, name, [r[k] for r in results], [r[k] for r in refs], lsbs.get(name))
                comparison.float_ops = upstream_ops[name]
                report.comparisons.append(comparison)
            graph = onnx_model if optimized is None else onnx.load(optimized)
            report.node_counts[level] = dict(Counter(n.op_type for n in graph.graph.node))
        top = report.node_counts[levels[-1]]
        report.fused = {k: v for k, v in top.items() if k in FUSED_OP_TYPES}
    return report
