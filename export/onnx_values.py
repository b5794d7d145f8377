"""Constant values of an ONNX graph, read in numpy: initializers, ``Constant`` nodes, ``DequantizeLinear``.

Shared by :mod:`~tquant.export.validate` (stored weights against PyTorch's) and
:mod:`~tquant.export.float_outputs` (the weights of the layer that writes a float output).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["attr", "constants", "dequantize"]


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """``{value name: tensor}`` for every initializer and every ``Constant`` node's ``value``."""
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    return consts


def attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of ``node``, or ``default`` when it is absent."""
    return next((a.i for a in node.attribute if a.name == name), default)


def dequantize(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> np.ndarray:
    """ONNX ``DequantizeLinear`` of constant inputs in numpy (per tensor, per axis or blocked), fp32."""
    codes = numpy_helper.to_array(consts[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
    has_zp = len(node.input) > 2 and node.input[2]
    zp = numpy_helper.to_array(consts[node.input[2]]).astype(np.float32) if has_zp else np.zeros_like(scale)
    axis, block = attr(node, "axis", 1), attr(node, "block_size", 0)
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
