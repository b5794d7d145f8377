"""Float outputs written by a quantized layer, judged in LSBs of that layer's input.

A Linear that writes the model's output in float (onnxruntime's ``QGemm`` with a float output) has no
output grid, but its input has one. Where onnxruntime rounds a float op (a LayerNorm, a GELU) or an
integer requantization differently from PyTorch, a code of that input flips by one LSB and moves output
``n`` by ``s * |W[k, n]|`` (``s`` the input's scale, ``k`` the flipped position): a documented rounding
difference, yet on small outputs (the logits of a random head) a large *relative* error. A wrong export
(a scale, a transposed or negated weight, a dropped bias, a wrong zero point) moves the outputs by far
more than their flipped input codes can.

- :func:`float_output_producers` finds, for each float graph output, the quantized ``Gemm``/``MatMul``
  that writes it (through reshapes and a constant bias ``Add``): its input codes, scale and zero point,
  and ``|W|``;
- :func:`with_exposed_codes` adds those input codes to the graph outputs, so onnxruntime reports the
  codes it really fed the layer (it fuses the same kernels: the integer tensor exists either way;
  :func:`~tquant.export.validate_onnx` checks that the file's outputs stay bit for bit the same);
- :func:`capture_layer_inputs` records what PyTorch fed the same layer (a forward pre-hook);
- :func:`explain` compares the two inputs in codes (LSBs of the layer's input) and bounds each output
  element's error by what the input differences of its row can move it: with ``d = x_ort - x_torch``,
  ``|y_ort - y_torch| <= |d| @ |W| + SUM_RTOL * (|x_torch| @ |W| + |y_torch|)`` (float rounding beside it).

The verdict (:meth:`~tquant.export.ValidationReport.ok`) then asks of the input codes what it asks of a
quantized output (within 1 LSB, most of them equal) and of the output that every element is explained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from .onnx_values import attr, constants, dequantize

__all__ = [
    "SUM_RTOL",
    "FloatProducer",
    "InputExplanation",
    "capture_layer_inputs",
    "explain",
    "float_output_producers",
    "with_exposed_codes",
]

SUM_RTOL = 1e-5
"""Float rounding allowed beside the flipped codes, relative to the sum of the products' magnitudes: PyTorch
sums K fp32 products (error about ``sqrt(K) * 2**-24`` of that sum, 1e-5 covers K up to ~10^5), onnxruntime's
integer kernels sum exactly and round once."""
ON_GRID = 1e-3
"""PyTorch's input to the layer must lie within this many LSBs of the file's input grid: otherwise the hooked
tensor is not the one the file quantizes, and the output is judged by its relative error."""

_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
"""Ops that keep the row-major order of the elements (a ``Transpose`` does not)."""
_FLOAT8_TYPES = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)


@dataclass
class FloatProducer:
    """The quantized layer that writes float graph output ``output``.

    ``node``/``op_type``: its ONNX node; ``codes``: the integer tensor its data input dequantizes (of ONNX
    type ``codes_type``) with ``scale`` and ``zero_point`` (per tensor); ``grid``: the scale the codes were
    quantized with (the ``QuantizeLinear``'s; equal to ``scale`` in a sound file); ``weight``: ``|W|`` as ``[K, N]``
    (input features by outputs, ``|alpha|`` of a ``Gemm`` folded in), float64; ``layer``: the PyTorch
    module path of the layer (the owner of the weight quantizer the file names the weight's scale after),
    or None when the weight is not a tquant quantized weight.
    """

    output: str
    node: str
    op_type: str
    codes: str
    codes_type: int
    scale: float
    zero_point: int
    grid: float
    weight: np.ndarray
    layer: str | None

    def __str__(self) -> str:
        where = f" (module '{self.layer}')" if self.layer else ""
        return f"{self.op_type} '{self.node}'{where}"


@dataclass
class InputExplanation:
    """:func:`explain`'s verdict on one float output at one optimisation level.

    ``code_share``/``max_lsb``: the layer's input codes, onnxruntime against PyTorch (share equal, largest
    distance in LSBs); ``error_lsb``: the largest output error in *input LSBs* (``|ort - torch|`` over
    ``s * max_k |W[k, n]|``, what one flipped input code moves output ``n`` at most); ``unexplained_lsb``:
    the largest error beyond what the row's flipped input codes explain, same unit (0 when all are explained).
    """

    code_share: float
    max_lsb: float
    error_lsb: float
    unexplained_lsb: float


def _walk(name: str, producers: dict, consts: dict, through: set[str], bias: bool) -> tuple[str, onnx.NodeProto | None]:
    """Follow ``name`` back through ``through`` ops (and ``Add``s of a constant when ``bias``)."""
    while name in producers:
        node = producers[name]
        data = [i for i in node.input if i and i not in consts]
        if node.op_type in through:
            name = node.input[0]
        elif bias and node.op_type == "Add" and len(data) == 1 and len(node.input) == 2:
            name = data[0]
        else:
            return name, node
    return name, None


def _scalar(name: str, consts: dict) -> float | None:
    value = numpy_helper.to_array(consts[name]) if name in consts else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _data_quantizer(name: str, producers: dict, consts: dict) -> tuple[str, int, float, int, float] | None:
    """``(codes, codes type, scale, zero point, grid scale)`` of the per-tensor ``DequantizeLinear`` behind
    ``name``; the grid scale is that of the ``QuantizeLinear`` that wrote the codes (through a ``Clip``), else
    the ``DequantizeLinear``'s."""
    _, dq = _walk(name, producers, consts, _RESHAPES, bias=False)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in consts:
        return None
    scale = _scalar(dq.input[1], consts)
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    if scale is None or (zp_name and zp_name not in consts):
        return None
    zp = consts.get(zp_name)
    codes_type = zp.data_type if zp is not None else onnx.TensorProto.UINT8
    if codes_type in _FLOAT8_TYPES:  # FP8 codes are not evenly spaced: no LSB
        return None
    zero_point = int(numpy_helper.to_array(zp).reshape(-1)[0]) if zp is not None else 0
    _, q = _walk(dq.input[0], producers, consts, {"Clip"}, bias=False)
    grid = _scalar(q.input[1], consts) if q is not None and q.op_type == "QuantizeLinear" else None
    return dq.input[0], codes_type, scale, zero_point, grid or scale


def _weight(name: str, producers: dict, consts: dict) -> tuple[np.ndarray, str | None] | None:
    """The constant weight ``name`` (a float initializer or a ``DequantizeLinear`` of one) and its layer."""
    if name in consts:
        return numpy_helper.to_array(consts[name]).astype(np.float64), None
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts or dq.input[1] not in consts:
        return None
    scale_name = dq.input[1]
    manager = scale_name[: -len(".scale")] if scale_name.endswith(".scale") else ""
    return dequantize(dq, consts).astype(np.float64), manager.rpartition(".")[0] or None


def float_output_producers(model: onnx.ModelProto) -> dict[str, FloatProducer]:
    """``{graph output: FloatProducer}`` for each output written by a quantized ``Gemm``/``MatMul``.

    The output may pass through order-keeping reshapes and one constant ``Add`` (a bias) after the layer;
    the layer's data input must be a per-tensor integer ``DequantizeLinear`` (through reshapes) and its weight
    a constant (a ``DequantizeLinear`` of stored codes, or float). Outputs written otherwise (a
    ``DequantizeLinear``, a float op, a ``Conv``, two activations multiplied) are left out.
    """
    consts = constants(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for out in model.graph.output:
        _, node = _walk(out.name, producers, consts, _RESHAPES, bias=True)
        if node is None or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        data = _data_quantizer(node.input[0], producers, consts)
        weight = _weight(node.input[1], producers, consts)
        if data is None or weight is None or weight[0].ndim != 2:
            continue
        w, layer = weight
        if node.op_type == "Gemm":
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            w = (w.T if attr(node, "transB", 0) else w) * abs(alpha)
        found[out.name] = FloatProducer(out.name, node.name or node.op_type, node.op_type, *data, np.abs(w), layer)
    return found


def with_exposed_codes(model: onnx.ModelProto, producers: dict[str, FloatProducer]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include each producer's input codes (after the originals)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    outputs = {o.name for o in exposed.graph.output}
    for p in producers.values():
        if p.codes not in outputs:
            exposed.graph.output.append(helper.make_tensor_value_info(p.codes, p.codes_type, None))
            outputs.add(p.codes)
    return exposed


@contextlib.contextmanager
def capture_layer_inputs(model: nn.Module, producers: dict[str, FloatProducer]) -> Iterator[dict[str, list]]:
    """While active, record the first input of each producer's PyTorch layer on every call.

    Yields ``{output: [numpy array per call]}`` for the producers whose layer the model has; the caller
    checks that each layer ran once per forward.
    """
    modules = dict(model.named_modules())
    captured: dict[str, list] = {}
    handles = []

    def hook(output: str):
        def record(module, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            captured[output].append(first.detach().float().cpu().numpy())

        return record

    for out, p in producers.items():
        if p.layer in modules:
            captured[out] = []
            handles.append(modules[p.layer].register_forward_pre_hook(hook(out), with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def explain(
    producer: FloatProducer,
    ort_out: list[np.ndarray],
    torch_out: list[np.ndarray],
    ort_codes: list[np.ndarray],
    torch_inputs: list[np.ndarray],
) -> InputExplanation | str:
    """Judge float output ``producer.output`` over every batch by its layer's input codes.

    ``ort_out``/``torch_out``: the output per batch; ``ort_codes``: the integer input codes onnxruntime fed
    the layer (decoded with the file's ``DequantizeLinear``: a wrong input scale or zero point shows as
    input codes far from PyTorch's); ``torch_inputs``: the (dequantized) input PyTorch fed it. Returns an
    :class:`InputExplanation`, or a sentence saying why the two inputs cannot be matched (shapes differ, or
    PyTorch's input is off the grid the codes were quantized on: the hooked tensor is not the quantized one).
    """
    k, n = producer.weight.shape
    s, zp = producer.scale, producer.zero_point
    if any(c.size != t.size for c, t in zip(ort_codes, torch_inputs)) or any(
        c.size % k or o.size % n or c.size // k != o.size // n for c, o in zip(ort_codes, ort_out)
    ):
        return "the shapes of its input in the file and in the PyTorch model differ"
    torch_in = np.concatenate([t.reshape(-1, k) for t in torch_inputs]).astype(np.float64)
    on_grid = torch_in / producer.grid
    if on_grid.size and np.abs(on_grid - np.rint(on_grid)).max() > ON_GRID:
        return "the PyTorch layer's input is not on the grid of the file's input quantizer"
    got = np.concatenate([c.reshape(-1, k) for c in ort_codes]).astype(np.float64) - zp  # in LSBs
    want = torch_in / s
    w = producer.weight
    reference = np.concatenate([t.reshape(-1, n) for t in torch_out]).astype(np.float64)
    got_out = np.concatenate([o.reshape(-1, n) for o in ort_out]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(got_out == reference, 0.0, np.abs(got_out - reference))
    err[~np.isfinite(err)] = np.inf  # a NaN or an infinity where PyTorch has none is never explained
    # |sum_k d_k W[k, n]| <= sum_k |d_k| |W[k, n]| for any input difference d, flipped codes or not
    bound = s * np.abs(got - want) @ w + SUM_RTOL * (s * np.abs(want) @ w + np.abs(reference))
    unit = s * w.max(axis=0)  # what one flipped code moves output n at most
    with np.errstate(divide="ignore", invalid="ignore"):
        error_lsb = np.where(err > 0, err / unit, 0.0)
        unexplained = np.where(err > bound, (err - bound) / unit, 0.0)
    return InputExplanation(
        code_share=float(np.mean(got == np.rint(want))) if got.size else 1.0,
        max_lsb=float(np.abs(got - want).max()) if got.size else 0.0,
        error_lsb=float(error_lsb.max()) if err.size else 0.0,
        unexplained_lsb=float(unexplained.max()) if err.size else 0.0,
    )
