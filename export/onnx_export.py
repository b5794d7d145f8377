"""``export_onnx``: a trained tquant model → an ONNX QDQ graph with integer weights, written atomically."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir
import torch
from torch import nn

import tquant

from .float_report import FloatOpsWarning, float_op_notes, node_scopes
from .integer_passes import mean_to_global_pool
from .prepare import INT4_OPSET, ExportError, QuantizerExport, export_mode, flatten_outputs, warn_estimating
from .qdq_passes import collapse_dq_q
from .translations import fold_int4_casts, translation_table

__all__ = ["DEFAULT_OPSET", "ExportResult", "export_onnx"]

DEFAULT_OPSET = INT4_OPSET
"""Opset 21: QuantizeLinear/DequantizeLinear with int4/uint4 and int16/uint16."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    ``quantizers``: every quantization manager of the model (see
    :class:`~tquant.export.prepare.QuantizerExport`); ``node_counts``: ONNX node types in the
    file; ``file_bytes``: its size; ``double_qdq``: quantizers that directly re-quantize another
    quantizer's output with a different grid (see the warning in :func:`export_onnx`).
    """

    path: str
    opset: int
    weight_storage: str
    file_bytes: int
    quantizers: list[QuantizerExport] = field(default_factory=list)
    node_counts: dict[str, int] = field(default_factory=dict)
    double_qdq: list[str] = field(default_factory=list)
    collapsed: int = 0
    notes: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        n_w = sum(q.kind == "weight" for q in self.quantizers)
        n_a = sum(q.kind == "activation" and q.error is None for q in self.quantizers)
        nodes = ", ".join(f"{k} {v}" for k, v in sorted(self.node_counts.items()))
        text = (
            f"{self.path}: {self.file_bytes / 1024:.1f} KiB, opset {self.opset}, {n_w} integer weights, "
            f"{n_a} activation quantizers; nodes: {nodes}"
        )
        return "\n".join([text, *(f"note: {n}" for n in self.notes), *(f"float: {f}" for f in self.float_ops)])


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"export_onnx: example_inputs must be a tensor or a tuple of inputs, got "
        f"{type(example_inputs).__name__}"
    )


def _dynamic_batch(args: tuple) -> tuple[tuple, tuple | None]:
    """(tracing args, dynamic_shapes): dim 0 of every tensor input that shares the first input's batch.

    torch.export specialises sizes 0 and 1, so a batch of 1 is traced as two copies of the sample.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1]
    if not tensors:
        return args, None
    batch = tensors[0].shape[0]
    dim = torch.export.Dim("batch", min=1)
    shapes, traced = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch:
            shapes.append({0: dim})
            traced.append(torch.cat([a, a]) if batch == 1 else a)
        else:
            shapes.append(None)
            traced.append(a)
    return tuple(traced), tuple(shapes)


def _new_file_mode(path: str) -> int:
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    opset: int | None = None,
    dynamic_batch: bool = True,
    weight_storage: str = "auto",
    *,
    signed_storage: bool = False,
    signed_weights: bool = True,
    bias_add: str = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    check: bool = True,
    keep_debug_info: bool = False,
    quiet: bool = True,
    report_float_ops: bool = True,
) -> ExportResult:
    """Export a trained, converted tquant model to an ONNX QuantizeLinear/DequantizeLinear graph.

    Every active quantizer becomes ``QuantizeLinear`` → (``Clip`` when its grid is narrower than
    the storage type) → ``DequantizeLinear`` with its trained scale and zero point; every
    quantized weight becomes an integer initializer (int8/uint8, int4/uint4 for <= 4-bit weights
    at opset 21, int16/uint16 above 8 bits) feeding ``DequantizeLinear`` (per-channel weights
    with ``axis=0``). The float ops between quantizers (residual adds, attention, pooling,
    batch norm) export as they are. The model is left exactly as it was.

    Args:
        model: a model converted with :func:`tquant.convert_to_quantized`, calibrated or trained,
            in eval mode (the export runs one forward on ``example_inputs`` first).
        example_inputs: a tensor or a tuple of positional inputs.
        path: the ``.onnx`` file to write. Written to a temporary file in the same directory,
            checked, then renamed over ``path``: a failed export leaves an existing file untouched.
        opset: ONNX opset (default 21; >= 18; int4 and 16-bit storage need 21).
        dynamic_batch: make dim 0 of the inputs that share the first input's batch size dynamic.
        weight_storage: ``"auto"``, ``"int8"`` or ``"int4"`` (see :func:`~tquant.export.prepare.export_mode`).
        signed_storage: keep signed grids in signed types (TensorRT's convention) instead of the
            equivalent unsigned types onnxruntime's x86 kernels run exactly (see ``export_mode``).
        signed_weights: keep signed weight grids in int8/int4 with uint8 activations (default:
            onnxruntime's own U8S8 layout and its fastest kernels; see ``export_mode``).
        bias_add: ``"auto"``, ``"fused"`` or ``"separate"`` (see ``export_mode``).
        input_names, output_names: names of the graph's inputs/outputs (default: the exporter's).
        check: run ``onnx.checker.check_model(full_check=True)`` on the file before renaming it.
        keep_debug_info: keep the exporter's per-node metadata (source stack traces, module
            scopes); off by default, as it is most of the file for small models.
        quiet: silence the exporter's progress messages.
        report_float_ops: for a quantized model, open the file in onnxruntime (all optimisations) and
            warn (:class:`~tquant.export.float_report.FloatOpsWarning`) about every compute node it
            still runs in float, by module path, with what would make it integer
            (``ExportResult.float_ops``).

    Returns:
        an :class:`ExportResult` (path, sizes, the quantizers and how they were stored).

    Raises:
        ExportError: a layer in training mode or an option the opset cannot express.
        tquant.QuantizerNotInitializedError: a quantizer the model uses has no range (names it).

    Example:
        >>> qmodel.eval()
        >>> export_onnx(qmodel, torch.randn(8, 3, 32, 32), "model.onnx")
    """
    path = os.fspath(path)
    args = _as_tuple(example_inputs)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export_onnx: directory {directory!r} does not exist")
    warn_estimating(model, "export_onnx")
    with export_mode(
        model, weight_storage=weight_storage, opset=opset, signed_storage=signed_storage,
        signed_weights=signed_weights, bias_add=bias_add,
    ) as plan:
        with torch.no_grad():
            outputs = flatten_outputs(model(*args))  # surfaces uninitialised quantizers before the slow trace
        if output_names is None:
            output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        traced, dynamic_shapes = _dynamic_batch(args) if dynamic_batch else (args, None)
        sink = io.StringIO()
        quiet_ctx = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)) if quiet else ()
        with contextlib.ExitStack() as stack:
            for ctx in quiet_ctx:
                stack.enter_context(ctx)
            if quiet:
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.onnx.export(
                model,
                traced,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=translation_table(opset),
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    onnx_model = program.model
    fold_int4_casts(onnx_model)
    tidy_qdq_attributes(onnx_model)
    collapsed = collapse_dq_q(onnx_model)
    mean_to_global_pool(onnx_model)
    scopes = node_scopes(onnx_model)
    if not keep_debug_info:
        strip_debug_info(onnx_model)
    doubles = double_qdq_pairs(onnx_model)
    if doubles:
        warnings.warn(
            f"export_onnx: {len(doubles)} quantizer(s) directly re-quantize the output of another one with a "
            f"different grid (first: {doubles[0]}); onnxruntime's DoubleQDQPairsRemover merges such pairs "
            "approximately, so optimised sessions may differ by a code there. Drop the redundant input "
            "quantizer "
            "(input_activation_qconfig_map) of a layer whose input is already quantized.",
            stacklevel=2,
        )
    onnx_model.metadata_props["tquant.version"] = tquant.__version__
    onnx_model.metadata_props["tquant.weight_storage"] = weight_storage
    counts = Counter(node.op_type for node in onnx_model.graph.all_nodes())

    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        if check:
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except onnx.checker.ValidationError as e:
                raise ExportError(f"export_onnx: the exported graph fails onnx.checker: {e}") from e
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    float_ops = float_op_notes(path, scopes) if report_float_ops and plan.quantizers else []
    if float_ops:
        warnings.warn(
            f"export_onnx: {len(float_ops)} op(s) stay float after onnxruntime's optimisations: "
            + "; ".join(float_ops), FloatOpsWarning, stacklevel=2,
        )
    return ExportResult(
        path, opset, weight_storage, os.path.getsize(path), plan.quantizers, dict(counts), doubles,
        collapsed, unfolded_activation_notes(model), float_ops,
    )


def unfolded_activation_notes(model: nn.Module) -> list[str]:
    """``"layer '<name>': <why>"`` for each layer whose following activation was left unfolded or whose
    bias stays float although int32 biases were asked for (``QuantizationMap.quantize_bias``)."""
    notes = []
    for name, m in model.named_modules():
        for attr in ("unfolded_activation", "float_bias_note"):
            text = getattr(m, attr, None)
            if isinstance(text, str):
                notes.append(f"layer '{name}': {text}")
    return notes


def strip_debug_info(model: ir.Model) -> None:
    """Drop per-node and per-value metadata and doc strings (the exporter's stack traces and scopes)."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()
    model.graph.metadata_props.clear()


_QDQ_DEFAULTS = {"output_dtype": 0, "block_size": 0, "saturate": 1}


def tidy_qdq_attributes(model: ir.Model) -> None:
    """Drop attributes that restate defaults on Q/DQ nodes, and ``axis`` where the scale is per-tensor."""
    for node in model.graph.all_nodes():
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        for name, default in _QDQ_DEFAULTS.items():
            attr = node.attributes.get(name)
            if attr is not None and attr.value == default:
                del node.attributes[name]
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        if (
            "axis" in node.attributes
            and scale is not None
            and scale.shape is not None
            and len(scale.shape) == 0
        ):
            del node.attributes["axis"]


def double_qdq_pairs(model: ir.Model) -> list[str]:
    """``"<dq scale> -> <q scale>"`` for each ``DequantizeLinear`` that feeds a ``QuantizeLinear`` with
    other constants (two quantizers in a row: a double rounding)."""
    pairs = []
    for node in model.graph.all_nodes():
        if node.op_type != "DequantizeLinear":
            continue
        for use in node.outputs[0].uses():
            q = use.node
            if q.op_type != "QuantizeLinear":
                continue
            same = all(a is b for a, b in zip(node.inputs[1:], q.inputs[1:])) and len(node.inputs) == len(
                q.inputs
            )
            if not same:
                pairs.append(f"{node.inputs[1].name} -> {q.inputs[1].name}")
    return pairs
