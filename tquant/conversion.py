"""``convert_to_quantized``: swap a model's layers for quantized ones as a QuantizationMap says."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from .base_modules import QuantizedModule
from .bias import link_bias_input_quantizers
from .config import QuantizationConfig, QuantizationMap, QuantizedModuleConfig, convert_configs_to_kwargs_dict
from .errors import QuantizationConfigError
from .folding import fold_batch_norm, fold_sequential_activations, sequential_conv_bn_pairs
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantEmbedding,
    QuantizedInputModule,
    QuantLayerNorm,
    QuantLinear,
)
from .quantization_manager import QuantizationManager
from .quantizers import QuantizerBase
from .range_estimators import RangeEstimatorBase
from .states import enable_quant_states

DEFAULT_CONVERSIONS = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.LayerNorm: QuantLayerNorm,
    nn.Embedding: QuantEmbedding,
}
"""Layer types whose quantized class is built from the original's constructor arguments."""

LEAF_MODULES = (RangeEstimatorBase, QuantizerBase, QuantizationManager)
"""Never recursed into by the converter."""


def append_default_conversions(quantization_map: QuantizationMap) -> None:
    """Map every :data:`DEFAULT_CONVERSIONS` type not already in ``module_qconfig_map`` to its
    quantized class, with a deep copy of ``quantization_map.default_qconfig``."""
    for module_type, quant_type in DEFAULT_CONVERSIONS.items():
        if module_type not in quantization_map.module_qconfig_map:
            quantization_map.module_qconfig_map[module_type] = QuantizedModuleConfig(
                quantized_module=quant_type, module_qconfig=copy.deepcopy(quantization_map.default_qconfig)
            )


def get_module_args(module: nn.Module, activation: nn.Module | None = None) -> dict[str, Any]:
    """Constructor arguments of a :data:`DEFAULT_CONVERSIONS` layer (plus ``activation``)."""
    if isinstance(module, nn.Linear):
        args = {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        args = {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    elif isinstance(module, nn.LayerNorm):
        args = {"normalized_shape": module.normalized_shape, "eps": module.eps,
                "elementwise_affine": module.elementwise_affine, "bias": module.bias is not None}
    elif isinstance(module, nn.Embedding):
        args = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx, "max_norm": module.max_norm, "norm_type": module.norm_type,
                "scale_grad_by_freq": module.scale_grad_by_freq, "sparse": module.sparse}
    else:
        raise QuantizationConfigError(f"get_module_args: no default conversion for {type(module).__name__}")
    args["activation"] = activation
    return args


def _share_parameters(original: nn.Module, quantized: nn.Module) -> None:
    """The quantized layer uses the original's weight/bias data, device and trainability."""
    ref = next(iter(original.parameters()), None)
    if ref is not None:
        quantized.to(ref.device)
    for name in ("weight", "bias"):
        src, dst = getattr(original, name, None), getattr(quantized, name, None)
        if src is not None and dst is not None:
            dst.data = src.data
            dst.requires_grad_(src.requires_grad)
    quantized.train(original.training)


def _build(model: nn.Module, qmodule_config: QuantizedModuleConfig, quantization_map: QuantizationMap,
           name: str) -> nn.Module:
    q_config: QuantizationConfig = qmodule_config.module_qconfig
    q_class = qmodule_config.quantized_module
    label = f"'{name or '<root>'}' ({type(model).__name__} -> {q_class.__name__})"
    try:
        if type(model) in DEFAULT_CONVERSIONS:
            quant_model = q_class(**get_module_args(model), **convert_configs_to_kwargs_dict(q_config))
            _share_parameters(model, quant_model)
            return quant_model
        return q_class(model, quantization_map=quantization_map, **convert_configs_to_kwargs_dict(q_config))
    except (QuantizationConfigError, TypeError, ValueError) as err:
        raise type(err)(f"converting layer {label}: {err}") from err


def quantize_model(model: nn.Module, quantization_map: QuantizationMap, model_name: str = "") -> nn.Module | None:
    """Recursively replace ``model``'s layers in place as ``quantization_map`` says.

    Priority: ``excluded_modules`` > ``instance_qconfig_map`` > ``module_qconfig_map`` (exact
    type) > recurse into children. A matched module whose config has both bit widths <= 0 is
    kept as is. Returns the (possibly new) module, or None for an excluded or leaf module.
    """
    if model_name in quantization_map.excluded_modules:
        return None
    if isinstance(model, LEAF_MODULES):
        return None
    qmodule_config = quantization_map.instance_qconfig_map.get(model_name)
    if qmodule_config is None:
        qmodule_config = quantization_map.module_qconfig_map.get(type(model))
    if qmodule_config is not None:
        q_config = qmodule_config.module_qconfig
        if q_config.activation_quant.n_bits <= 0 and q_config.weight_quant.n_bits <= 0:
            return model
        return _build(model, qmodule_config, quantization_map, model_name)
    for name, child in list(model.named_children()):
        full_name = f"{model_name}.{name}" if model_name else name
        if full_name in quantization_map.excluded_modules:
            continue
        new_child = quantize_model(child, quantization_map, model_name=full_name)
        if new_child is None:
            continue
        if full_name in quantization_map.input_activation_qconfig_map:
            new_child = QuantizedInputModule(new_child, quantization_map.input_activation_qconfig_map[full_name])
        setattr(model, name, new_child)
    if quantization_map.fold_batch_norm and isinstance(model, nn.Sequential):
        fold_batch_norm(model, sequential_conv_bn_pairs(model), quantization_map.bn_freeze_step)
    if quantization_map.fold_activations and isinstance(model, nn.Sequential):
        fold_sequential_activations(model, set(quantization_map.excluded_modules), model_name)
    return model


def _warn_unknown_names(model: nn.Module, quantization_map: QuantizationMap) -> None:
    names = {name for name, _ in model.named_modules()}
    for field_name in ("instance_qconfig_map", "input_activation_qconfig_map", "excluded_modules"):
        for key in getattr(quantization_map, field_name):
            if key not in names:
                warnings.warn(
                    f"QuantizationMap.{field_name}: no module named {key!r} in {type(model).__name__} "
                    "(names are state-dict paths such as 'features.0')",
                    stacklevel=3,
                )


def name_quantizers(model: nn.Module) -> None:
    """Give every quantization manager its path in ``model`` (used in error messages)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizationManager):
            module.layer_name = name


def convert_to_quantized(model: nn.Module, quantization_map: QuantizationMap) -> nn.Module:
    """A quantized deep copy of ``model``, with quantization enabled where bit widths are > 0.

    Example:
        >>> qmap = QuantizationMap()
        >>> qmap.default_qconfig.weight_quant.n_bits = 8
        >>> qmap.default_qconfig.activation_quant.n_bits = 8
        >>> append_default_conversions(qmap)
        >>> qmodel = convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), qmap)
    """
    if not isinstance(quantization_map, QuantizationMap):
        raise QuantizationConfigError(
            f"convert_to_quantized: quantization_map must be a QuantizationMap, got {type(quantization_map).__name__}"
        )
    quantization_map.validate()
    _warn_unknown_names(model, quantization_map)
    quant_model = quantize_model(copy.deepcopy(model), quantization_map)
    if quant_model is None:
        quant_model = copy.deepcopy(model)
    if quantization_map.batch_norm_pairs:
        try:
            fold_batch_norm(quant_model, quantization_map.batch_norm_pairs, quantization_map.bn_freeze_step)
        except ValueError as e:
            raise QuantizationConfigError(f"QuantizationMap.batch_norm_pairs: {e}") from e
    if isinstance(quant_model, nn.Module) and "" in quantization_map.input_activation_qconfig_map:
        quant_model = QuantizedInputModule(quant_model, quantization_map.input_activation_qconfig_map[""])
    enable_quant_states(quant_model)
    if quantization_map.quantize_bias:
        link_bias_input_quantizers(quant_model)
    name_quantizers(quant_model)
    return quant_model


__all__ = [
    "DEFAULT_CONVERSIONS",
    "LEAF_MODULES",
    "QuantizedModule",
    "append_default_conversions",
    "convert_to_quantized",
    "get_module_args",
    "name_quantizers",
    "quantize_model",
]
