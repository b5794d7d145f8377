"""The model (:class:`DigitsCNN`) and the demo's :class:`~tquant.QuantizationMap`."""

from __future__ import annotations

import copy

import torch
from torch import nn

import tquant


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: three 3x3 convolutions with ReLU and max pooling, two linear layers.

    :attr:`LAYERS` are the state-dict names of its convolutions and linear layers, in order
    (``features.0`` takes the image); 62k parameters.
    """

    LAYERS = ("features.0", "features.2", "features.5", "classifier.1", "classifier.3")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def quantization_map(weight_bits: int, act_bits: int = 8, fold_activations: bool = True,
                     quantize_bias: bool | None = None) -> tquant.QuantizationMap:
    """The demo's :class:`~tquant.QuantizationMap` for :class:`DigitsCNN`.

    - every conv/linear layer: ``weight_bits`` symmetric per-channel weights and an ``act_bits``
      output quantizer (``default_qconfig`` + ``append_default_conversions``);
    - ``fold_activations`` (default): each ReLU is folded into the layer before it, so the output
      quantizer sits after the ReLU and each tensor is quantized once; only the image (the input
      of ``features.0``) gets an input quantizer. In ONNX every conv runs as one QLinearConv and
      every hidden linear as a QGemm, with no float ``DequantizeLinear → Relu → QuantizeLinear``
      between them (max-pool and flatten run on the uint8 tensor);
    - ``quantize_bias`` (default: as ``fold_activations``): conv/linear biases on the int32 grid of
      input scale x weight scale, as onnxruntime's integer kernels add them (the first linear
      after ``Flatten`` keeps a float bias: its input quantizer is in another Sequential);
    - without folding (aihwkit's default conversion): the input of every layer is quantized too
      (``input_activation_qconfig_map``), so each tensor is quantized twice (before and after
      the ReLU);
    - the last layer's output (the logits) stays float (``instance_qconfig_map``): an argmax over
      8-bit logits has ties, which a one-LSB difference between runtimes would break either way.
    """
    qmap = tquant.QuantizationMap(fold_activations=fold_activations,
                                  quantize_bias=fold_activations if quantize_bias is None else quantize_bias)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(weight_bits, symmetric=True,
                                                                 per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(act_bits)
    for name in DigitsCNN.LAYERS[:1] if fold_activations else DigitsCNN.LAYERS:
        qmap.input_activation_qconfig_map[name] = tquant.ActivationQuantConfig(act_bits)
    float_logits = tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(0), copy.deepcopy(qmap.default_qconfig.weight_quant)
    )
    qmap.instance_qconfig_map[DigitsCNN.LAYERS[-1]] = tquant.QuantizedModuleConfig(tquant.QuantLinear,
                                                                                   float_logits)
    tquant.append_default_conversions(qmap)
    return qmap
