"""``validate_onnx``: run an exported file in onnxruntime and compare it with the PyTorch model.

The comparison speaks in codes and LSBs: an output produced by a ``DequantizeLinear`` lies on its
quantizer's grid, so two runs either agree exactly or differ by whole steps of its scale (the
LSB). Different but legitimate summation orders (onnxruntime's Gemm, integer kernels after
fusion) can move a pre-quantization value across a rounding boundary and flip one code; the
report counts those. For an output that is not quantized, the LSB is unknown and only the
float agreement and absolute error are reported.
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

__all__ = ["FUSED_OP_TYPES", "LEVELS", "OutputComparison", "ValidationReport", "output_lsb", "validate_onnx"]

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


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("validate_onnx needs onnxruntime: pip install 'tquant[onnx]'") from e
    return onnxruntime


def output_lsb(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int] | None]:
    """For each graph output, ``(scale, axis)`` of the ``DequantizeLinear`` that produces it, or None.

    Follows shape-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity; Transpose only for
    per-tensor scales) back to the ``DequantizeLinear``. ``axis`` is -1 for a per-tensor scale.
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


@dataclass
class OutputComparison:
    """One output at one optimisation level, over every input batch.

    ``match_share``: elements equal to float precision; ``code_share``: elements whose integer
    code (``round(y / lsb)``) agrees (None without an output quantizer); ``max_lsb``: the largest
    error in LSBs (None without one); ``max_abs``: the largest absolute error.
    """

    level: str
    output: str
    numel: int
    match_share: float
    code_share: float | None
    max_lsb: float | None
    max_abs: float
    lsb: float | None


@dataclass
class ValidationReport:
    """The result of :func:`validate_onnx`; ``print(report)`` shows it as a table.

    ``comparisons``: one :class:`OutputComparison` per (level, output); ``node_counts``: ONNX node
    types per level (for optimised levels, of the graph onnxruntime actually runs);
    ``fused``: the integer node types onnxruntime made at the highest level validated.
    """

    path: str
    n_batches: int
    comparisons: list[OutputComparison] = field(default_factory=list)
    node_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)

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

    def ok(self, min_match: float = 0.999, max_lsb: float = 1.0, level: str | None = None) -> bool:
        """``>= min_match`` of the elements agree to float precision and none is off by more than
        ``max_lsb`` LSBs (for outputs without a quantizer: every element agrees to float precision)."""
        for c in self.comparisons if level is None else self.level(level):
            if c.match_share < min_match:
                return False
            if c.max_lsb is None:
                if c.match_share < 1.0:
                    return False
            elif c.max_lsb > max_lsb + 1e-3:
                return False
        return True

    def __str__(self) -> str:
        head = ("level", "output", "elements", "match", "codes agree", "max LSB", "max |err|", "LSB")
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
        return "\n".join(lines)


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


def _session(path: str, level: str, optimized_path: str | None):
    ort = _ort()
    so = ort.SessionOptions()
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
    return OutputComparison(
        level,
        name,
        int(a.size),
        float(match.mean()) if a.size else 1.0,
        code_share,
        max_lsb,
        float(diff.max()) if a.size else 0.0,
        lsb_value,
    )


def validate_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    inputs: Sequence | None = None,
    n_random: int = 2,
    levels: Sequence[str] = ("disabled", "all"),
    seed: int = 0,
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

    Returns:
        a :class:`ValidationReport`: per level and output, the share of elements equal to float
        precision, the share of integer codes that agree, the max error in LSBs of the output
        quantizer and the max absolute error; node counts per level (the optimised graph is
        saved by onnxruntime and counted); the integer node types onnxruntime fused.

    Example:
        >>> report = validate_onnx(qmodel, x, "model.onnx")
        >>> print(report); assert report.ok()
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
    report = ValidationReport(path, len(batches))
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            optimized = os.path.join(tmp, f"{level}.onnx") if level != "disabled" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = _session(path, level, optimized)
            feeds_names = [i.name for i in session.get_inputs()]
            results = []
            for b in batches:
                tensors = [x for x in b if isinstance(x, torch.Tensor)]
                feed = {n: t.detach().cpu().numpy() for n, t in zip(feeds_names, tensors)}
                results.append(session.run(None, feed))
            for k, name in enumerate(out_names):
                report.comparisons.append(
                    _compare(level, name, [r[k] for r in results], [r[k] for r in refs], lsbs.get(name))
                )
            graph = onnx_model if optimized is None else onnx.load(optimized)
            report.node_counts[level] = dict(Counter(n.op_type for n in graph.graph.node))
        top = report.node_counts[levels[-1]]
        report.fused = {k: v for k, v in top.items() if k in FUSED_OP_TYPES}
    return report
