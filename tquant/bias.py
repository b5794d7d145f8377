"""int32 biases: link each Linear/Conv layer to the quantizer of its input (``QuantizationMap.quantize_bias``).

onnxruntime's integer Conv/Gemm kernels add an int32 bias quantized at ``s_x * s_w`` (input scale
times weight scale, zero point 0) to their accumulators. With ``quantize_bias`` on, the converted
layer fake-quantizes its bias the same way in QAT and eval
(:meth:`~tquant.QuantizationHijacker.quantize_bias`), and the exporter stores the int32 codes, so
PyTorch and onnxruntime add the same bias.

The rule for ``s_x`` (:func:`link_bias_input_quantizers`), first match wins:

1. the layer is wrapped in a :class:`~tquant.QuantizedInputModule`: its input quantizer;
2. in an ``nn.Sequential``, the nearest earlier sibling, skipping modules that do not change
   values on the grid (``Identity`` — e.g. a folded activation's slot —, ``Flatten``,
   ``Unflatten``, max-pool, ``Dropout``), is a quantized layer with an active output quantizer:
   that output quantizer;
3. otherwise the bias stays float and the layer's ``float_bias_note`` says why (the export
   report lists it): the converter cannot see where a custom ``forward`` takes the input from.

Per-channel input quantizers have no single ``s_x``: their layer's bias stays float too.
"""

from __future__ import annotations

from torch import nn

from .base_modules import QuantizationHijacker
from .layers import QuantizedInputModule
from .quantization_manager import QuantizationManager

__all__ = ["GRID_PRESERVING", "link_bias_input_quantizers"]

GRID_PRESERVING = (nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout)
"""Modules whose output is on their input's quantization grid (skipped when looking for ``s_x``)."""


def _layer(module: nn.Module) -> QuantizationHijacker | None:
    if isinstance(module, QuantizationHijacker):
        return module
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, QuantizationHijacker) else None


def _has_bias(layer: QuantizationHijacker) -> bool:
    return isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and (
        getattr(layer, "bias", None) is not None or hasattr(layer, "bn")
    )


def _output_quantizer(module: nn.Module) -> QuantizationManager | None:
    layer = _layer(module)
    if layer is None or layer.n_bits_act <= 0 or not layer._quant_a:
        return None
    q = layer.activation_quantizer
    return q if isinstance(q, QuantizationManager) and _per_tensor_int(q) else None


def _per_tensor_int(manager: QuantizationManager) -> bool:
    return not manager.quantizer.per_channel and manager.quantizer.fmt == "int"


def _int_weights(layer: QuantizationHijacker) -> bool:
    """Weights on an integer grid per tensor or per channel (group-wise and FP8 scales have no int32 bias)."""
    q = layer.weight_quantizer.quantizer
    return q.fmt == "int" and q.group_len is None


def link_bias_input_quantizers(model: nn.Module) -> int:
    """Link each Linear/Conv layer with a bias to its input quantizer by the rule above; returns how many.

    Call after the quantization states are enabled (the output quantizers' switches are read).
    """
    linked: dict[int, QuantizationManager] = {}
    for module in model.modules():
        if isinstance(module, QuantizedInputModule):
            layer = _layer(module.module)
            source = module.input_quantizer.activation_quantizer
            if layer is not None and _has_bias(layer) and _per_tensor_int(source) and _int_weights(layer):
                linked[id(layer)] = source
        if isinstance(module, nn.Sequential):
            children = list(module._modules.values())
            for i, child in enumerate(children):
                layer = _layer(child)
                if layer is None or not _has_bias(layer) or id(layer) in linked or not _int_weights(layer):
                    continue
                j = i - 1
                while j >= 0 and isinstance(children[j], GRID_PRESERVING):
                    j -= 1
                source = _output_quantizer(children[j]) if j >= 0 else None
                if source is not None:
                    linked[id(layer)] = source
    for module in model.modules():
        if not isinstance(module, QuantizationHijacker) or not _has_bias(module):
            continue
        module.set_bias_input_quantizer(linked.get(id(module)))
        if id(module) in linked:
            module.float_bias_note = None
        elif not _int_weights(module):
            module.float_bias_note = "bias kept float: int32 biases need integer weights per tensor or per channel"
        else:
            module.float_bias_note = (
                "bias kept float: its input quantizer is unknown (not wrapped in a QuantizedInputModule and not "
                "after a quantized layer in an nn.Sequential); add it to input_activation_qconfig_map for an int32 "
                "bias"
            )
    return len(linked)
