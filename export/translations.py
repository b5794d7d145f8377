"""onnxscript translations of the export ops ``tquant::quantize_dequantize`` and ``tquant::dequantize_codes``.

``torch.onnx.export(dynamo=True, custom_translation_table=translation_table())`` turns

- ``quantize_dequantize(x, scale, zp, qmin, qmax, axis)`` into ``QuantizeLinear`` →
  (``Clip(qmin, qmax)`` when the grid is narrower than the storage type: the QCDQ form) →
  ``DequantizeLinear``; the storage type is the zero point's dtype (int8/uint8/int16/uint16);
- ``dequantize_bias(codes, scale, axis)`` into ``DequantizeLinear`` on an int32 bias (zero point 0);
- ``dequantize_codes(codes, scale, zp, axis, storage_bits)`` into ``DequantizeLinear`` on the
  integer initializer; with ``storage_bits=4`` the codes and zero point go through
  ``Cast(to=INT4|UINT4)``, which :func:`fold_int4_casts` folds into 4-bit initializers after export;
- ``dequantize_blocked(codes, scale, zp, axis, block_size, storage_bits)`` likewise, with ``block_size``
  (group-wise weights; opset 21);
- ``quantize_dequantize_fp8(x, scale, zp, axis)`` into ``QuantizeLinear`` → ``DequantizeLinear`` to float8
  (the float8 zero point picks the type; ``saturate`` left at its default 1), and ``dequantize_fp8`` into
  ``DequantizeLinear`` on a float8 initializer (opset 19).

``axis`` follows the kernels' convention (``< 0`` per tensor); per-channel nodes carry the ONNX
``axis`` attribute, per-tensor nodes none.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import onnx_opset

from tquant.kernels import bias_codes, qdq  # noqa: F401  (registers the tquant:: export ops)

__all__ = ["fold_int4_casts", "translation_table"]

_INT_TYPES = {
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
    ir.DataType.UINT16: np.uint16,
}
_INT4_OF = {ir.DataType.INT8: ir.DataType.INT4, ir.DataType.UINT8: ir.DataType.UINT4}


def _axis_kw(axis: int) -> dict:
    return {"axis": axis} if axis >= 0 else {}


def _opset(opset: int):
    """The onnxscript opset module for a target opset (nodes must not be newer than the model)."""
    return getattr(onnx_opset, f"opset{min(max(opset, 18), 21)}")


def quantize_dequantize_onnx(x, scale, zero_point, qmin: int, qmax: int, axis: int, *, op):
    """``QuantizeLinear`` → (``Clip``) → ``DequantizeLinear`` with the quantizer's trained constants.

    8-bit storage narrows the grid with an integer ``Clip`` between the two (the QCDQ form).
    onnxruntime has no integer ``Clip`` for 16-bit types, so a narrow grid in 16-bit storage clips
    the float input to ``[(qmin - zp) * scale, (qmax - zp) * scale]`` before ``QuantizeLinear``
    instead: the same codes, as rounding is monotonic and ``round(((q - zp) * scale) / scale) == q - zp``.
    """
    kw = _axis_kw(axis)
    np_type = _INT_TYPES[zero_point.dtype]
    info = np.iinfo(np_type)
    narrow = qmin > info.min or qmax < info.max
    if narrow and info.bits == 16:
        to_float = ir.DataType.FLOAT

        def bound(q: int):
            k = op.Constant(value=ir.tensor(np.array(q, dtype=np.float32)))
            return op.Mul(op.Sub(k, op.Cast(zero_point, to=to_float)), scale)

        x = op.Clip(x, bound(qmin), bound(qmax))
        narrow = False
    q = op.QuantizeLinear(x, scale, zero_point, **kw)
    if narrow:
        lo = op.Constant(value=ir.tensor(np.array(qmin, dtype=np_type)))
        hi = op.Constant(value=ir.tensor(np.array(qmax, dtype=np_type)))
        q = op.Clip(q, lo, hi)
    return op.DequantizeLinear(q, scale, zero_point, **kw)


def dequantize_codes_onnx(codes, scale, zero_point, axis: int, storage_bits: int, *, op):
    """``DequantizeLinear`` on integer codes (cast to int4/uint4 first when ``storage_bits == 4``)."""
    if storage_bits == 4:
        to = _INT4_OF[codes.dtype]
        codes = op.Cast(codes, to=to)
        zero_point = op.Cast(zero_point, to=to)
    return op.DequantizeLinear(codes, scale, zero_point, **_axis_kw(axis))


def dequantize_blocked_onnx(codes, scale, zero_point, axis: int, block_size: int, storage_bits: int, *, op):
    """``DequantizeLinear(axis, block_size)`` on group-wise integer codes (4-bit: cast to int4/uint4 first)."""
    if storage_bits == 4:
        to = _INT4_OF[codes.dtype]
        codes = op.Cast(codes, to=to)
        zero_point = op.Cast(zero_point, to=to)
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)


def translation_table(opset: int = 21) -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export(dynamo=True, opset_version=opset)``."""
    op = _opset(opset)

    def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis: int):
        return quantize_dequantize_onnx(x, scale, zero_point, qmin, qmax, axis, op=op)

    def dequantize_codes(codes, scale, zero_point, axis: int, storage_bits: int):
        return dequantize_codes_onnx(codes, scale, zero_point, axis, storage_bits, op=op)

    def dequantize_bias(codes, scale, axis: int):
        # int32 codes, zero point 0 (omitted): the bias form onnxruntime's Conv/Gemm selectors fuse
        return op.DequantizeLinear(codes, scale, **_axis_kw(axis))

    def dequantize_blocked(codes, scale, zero_point, axis: int, block_size: int, storage_bits: int):
        return dequantize_blocked_onnx(codes, scale, zero_point, axis, block_size, storage_bits, op=op)

    def quantize_dequantize_fp8(x, scale, zero_point, axis: int):
        # saturate=1 (the default): out-of-range values and infinities go to +-max, as tquant's FP8 does
        kw = _axis_kw(axis)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, **kw), scale, zero_point, **kw)

    def dequantize_fp8(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, **_axis_kw(axis))

    return {
        torch.ops.tquant.quantize_dequantize.default: quantize_dequantize,
        torch.ops.tquant.dequantize_codes.default: dequantize_codes,
        torch.ops.tquant.dequantize_bias.default: dequantize_bias,
        torch.ops.tquant.dequantize_blocked.default: dequantize_blocked,
        torch.ops.tquant.quantize_dequantize_fp8.default: quantize_dequantize_fp8,
        torch.ops.tquant.dequantize_fp8.default: dequantize_fp8,
    }


def fold_int4_casts(model: ir.Model) -> int:
    """Fold ``Cast(to=INT4|UINT4)`` of integer initializers into 4-bit initializers; returns how many.

    The exporter's constant folding skips large tensors, so the int4 weights would otherwise be
    stored as int8 plus a Cast. Each Cast output becomes a new initializer named after the Cast's
    input (``<name>_int4``), consumers are rewired, and initializers nobody uses any more are dropped.
    """
    graph = model.graph
    folded = 0
    sources: list[ir.Value] = []
    made: dict[tuple[str, ir.DataType], ir.Value] = {}
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to_attr = node.attributes.get("to")
        if to_attr is None or ir.DataType(to_attr.as_int()) not in (ir.DataType.INT4, ir.DataType.UINT4):
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None or not src.is_initializer():
            continue
        to = ir.DataType(to_attr.as_int())
        if node.outputs[0].is_graph_output():
            continue
        new = made.get((src.name, to))
        if new is None:
            new = made[(src.name, to)] = _int4_initializer(graph, src, to)
        node.outputs[0].replace_all_uses_with(new)
        graph.remove(node, safe=True)
        sources.append(src)
        folded += 1
    for value in sources:
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(value.name, None)
    return folded


def _int4_initializer(graph: ir.Graph, src: ir.Value, to: ir.DataType) -> ir.Value:
    """A new 4-bit initializer holding ``src``'s integer values (checked to fit)."""
    values = src.const_value.numpy().astype(np.int64)
    lo, hi = (-8, 7) if to == ir.DataType.INT4 else (0, 15)
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"fold_int4_casts: initializer {src.name!r} has codes outside [{lo}, {hi}]")
    name = f"{src.name}_int4" if to == ir.DataType.INT4 else f"{src.name}_uint4"
    np_type = np.int8 if to == ir.DataType.INT4 else np.uint8
    new = ir.Value(
        name=name,
        shape=ir.Shape(values.shape),
        type=ir.TensorType(to),
        const_value=ir.tensor(values.astype(np_type), dtype=to, name=name),
    )
    graph.register_initializer(new)
    return new
