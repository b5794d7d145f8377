"""Activation folding: move a following ReLU/ReLU6/Hardtanh into the quantized layer before it.

Without folding, a quantized layer quantizes its output and the activation after it runs on that
quantized value; the next quantizer (another layer's input or output quantizer) quantizes again, so
a deployed graph has a float ``DequantizeLinear → Relu → QuantizeLinear`` chain at every boundary.
With :attr:`tquant.QuantizationMap.fold_activations` on, :func:`fold_sequential_activations` gives
the activation to the layer (``QuantizationHijacker.activation_function``, which runs *before* the
output quantizer) and puts an ``nn.Identity()`` in its place, so each tensor is quantized once.

Which patterns are folded: a converted layer (a :class:`~tquant.base_modules.QuantizationHijacker`,
possibly wrapped in a :class:`~tquant.QuantizedInputModule`) directly followed, inside an
``nn.Sequential``, by one of :data:`FOLDABLE_ACTIVATIONS`. Activations called from a custom
``forward`` (``self.relu(self.conv(x))``) are not folded: the converter cannot see the data flow.

Which activations: those onnxruntime removes in front of a ``QuantizeLinear`` whose range already
clips them (ReluQuantFusion, ClipQuantFusion), so ``DequantizeLinear → Conv → Relu →
QuantizeLinear`` still becomes one QLinearConv. Other activations (GELU, SiLU, Sigmoid, Tanh,
LeakyReLU, PReLU) have no fused integer kernel after a Conv/Gemm; folding them would make the
layer itself run in float, so they are left where they are and the layer records them in
``unfolded_activation`` (the export report lists them).
"""

from __future__ import annotations

import copy

from torch import nn

from .base_modules import ACTIVATIONS, QuantizationHijacker

__all__ = ["FOLDABLE_ACTIVATIONS", "fold_sequential_activations"]

FOLDABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
"""Activations folded into the layer before them (ReLU6 is a Hardtanh; both export as ``Clip``)."""


def _hijacker(module: nn.Module) -> QuantizationHijacker | None:
    inner = getattr(module, "module", None) if not isinstance(module, QuantizationHijacker) else module
    if isinstance(inner, QuantizationHijacker):
        return inner
    return None


def fold_sequential_activations(seq: nn.Sequential, excluded: set[str] = frozenset(), prefix: str = "") -> int:
    """Fold each foldable activation that directly follows a quantized layer in ``seq``; returns how many.

    The activation (a deep copy) becomes the layer's ``activation_function`` and its slot in
    ``seq`` becomes ``nn.Identity()`` (state-dict names of the other children do not change).
    A layer that already has an activation, and activations named in ``excluded`` (state-dict
    paths), are left alone. A non-foldable activation (see :data:`ACTIVATIONS`) sets the layer's
    ``unfolded_activation`` note instead.
    """
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"fold_sequential_activations: expected an nn.Sequential, got {type(seq).__name__}")
    names = list(seq._modules)
    folded = 0
    for name, next_name in zip(names, names[1:]):
        layer = _hijacker(seq._modules[name])
        act = seq._modules[next_name]
        path = f"{prefix}.{next_name}" if prefix else next_name
        if layer is None or act is None or path in excluded or layer.activation_function is not None:
            continue
        if isinstance(act, FOLDABLE_ACTIVATIONS):
            layer.activation_function = copy.deepcopy(act)
            seq._modules[next_name] = nn.Identity()
            folded += 1
        elif isinstance(act, ACTIVATIONS) or isinstance(act, (nn.Softplus, nn.Mish, nn.Hardswish, nn.ELU)):
            layer.unfolded_activation = (
                f"{type(act).__name__} ('{path}') after this layer is not folded: onnxruntime has no fused "
                f"integer kernel for {type(layer).__name__.removeprefix('Quant')} + {type(act).__name__}, so it "
                "runs in float between DequantizeLinear and QuantizeLinear"
            )
    return folded
