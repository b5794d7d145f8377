"""Quantized layers: weight and output-activation fake quantization around torch layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base_modules import FP32Acts, QuantizationHijacker, QuantizedActivation
from .config import ActivationQuantConfig, convert_act_config_to_kwargs_dict
from .states import QuantizedModel


class QuantLinear(QuantizationHijacker, nn.Linear):
    """``nn.Linear`` with weight and output quantization."""

    def run_forward(self, x, weight, bias, offsets=None):
        return F.linear(x, weight, bias)


class _QuantConv:
    def run_forward(self, x, weight, bias, offsets=None):
        return self._conv_forward(x, weight, bias)


class QuantConv1d(_QuantConv, QuantizationHijacker, nn.Conv1d):
    """``nn.Conv1d`` with weight (per output channel if configured) and output quantization."""


class QuantConv2d(_QuantConv, QuantizationHijacker, nn.Conv2d):
    """``nn.Conv2d`` with weight (per output channel if configured) and output quantization."""


class QuantConv3d(_QuantConv, QuantizationHijacker, nn.Conv3d):
    """``nn.Conv3d`` with weight (per output channel if configured) and output quantization."""


class QuantLayerNorm(QuantizationHijacker, nn.LayerNorm):
    """``nn.LayerNorm`` with (affine) weight and output quantization."""

    def run_forward(self, x, weight, bias, offsets=None):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class QuantEmbedding(QuantizationHijacker, nn.Embedding):
    """``nn.Embedding`` with weight quantization only: a lookup of quantized rows is already quantized."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, activation=activation, **kwargs)
        self.activation_quantizer = FP32Acts()

    def run_forward(self, x, weight, bias, offsets=None):
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class QuantBatchNorm2d(QuantizedModel):
    """``nn.BatchNorm2d`` followed by an output quantizer (``act_bn_quantizer``).

    Built by the converter as ``QuantBatchNorm2d(original_bn, quantization_map=..., **kwargs)``.
    """

    def __init__(self, org_model: nn.Module, **quant_params):
        super().__init__()
        if not isinstance(org_model, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"QuantBatchNorm2d.org_model must be a batch norm, got {type(org_model).__name__}")
        self.module = org_model
        self.act_bn_quantizer = QuantizedActivation(**quant_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_bn_quantizer(self.module(x))


class QuantizedInputModule(nn.Module):
    """Wraps ``module`` with a quantizer on its first input (``input_quantizer``).

    Used for layers that receive unquantized data: the first layer of a network, or a
    layer after a functional op. The wrapped module's own output quantization is unchanged.
    """

    def __init__(self, module: nn.Module, act_quant_config: ActivationQuantConfig):
        super().__init__()
        if not isinstance(act_quant_config, ActivationQuantConfig):
            raise TypeError(
                "QuantizedInputModule.act_quant_config must be an ActivationQuantConfig, "
                f"got {type(act_quant_config).__name__}"
            )
        self.module = module
        self.input_quantizer = QuantizedActivation(**convert_act_config_to_kwargs_dict(act_quant_config))

    def forward(self, inp: torch.Tensor, *args, **kwargs):
        return self.module(self.input_quantizer(inp), *args, **kwargs)
