"""``convert_to_quantized``: swap a model's layers for quantized ones as a QuantizationMap says.

After a conversion, :func:`convert_to_quantized` and :func:`quantize_model` check what happened
(:class:`ConversionSummary`): a module with weights of its own that the map did not reach stays
float, which is easy to miss (``nn.MultiheadAttention``, a ``Conv1d`` without a map entry), and a
map that converts nothing is a silent no-op. Both raise a :class:`ConversionWarning` (one line,
naming the modules), or a :class:`ConversionError` with ``strict=True``. Modules the map keeps
float on purpose (``excluded_modules``, a matched config with both bit widths <= 0) are listed
as "kept float on request" and never warned about, unless nothing at all was converted.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
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


class ConversionWarning(UserWarning):
    """The converter left modules with weights in float, or converted nothing (see :class:`ConversionSummary`)."""


class ConversionError(QuantizationConfigError):
    """Raised instead of a :class:`ConversionWarning` when the conversion is ``strict``."""


MAX_NAMES = 4
"""Module names quoted per kind in a conversion message (the rest are counted)."""


@dataclass
class ConversionSummary:
    """What one conversion did, by module path (paths of the original model).

    ``converted``: layers replaced by their quantized class; ``input_quantizers``: layers wrapped
    in :class:`~tquant.QuantizedInputModule`; ``kept``: matched by the map with both bit widths
    <= 0, kept as is; ``excluded``: in ``excluded_modules``; ``left_float``: modules with
    parameters of their own that no rule reached (the outermost such module: an
    ``nn.MultiheadAttention`` counts once, with its ``out_proj``). Each maps a path to a type name.
    """

    model_type: str
    converted: dict[str, str] = field(default_factory=dict)
    input_quantizers: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    left_float: dict[str, str] = field(default_factory=dict)
    map_is_empty: bool = False

    @property
    def nothing_converted(self) -> bool:
        return not self.converted and not self.input_quantizers

    def problem(self) -> str | None:
        """The one-line message to warn (or raise) with, or None when the conversion looks complete."""
        if self.nothing_converted:
            return f"converted 0 layers of {self.model_type}: {self._why_nothing()}"
        if self.left_float:
            return (
                f"{self._counts()}; left float: {_by_type(self.left_float)} not in the "
                f"map ({_names(self.left_float)}){self._kept_clause()}; map their types or names, or list "
                "them in QuantizationMap.excluded_modules to keep them float on purpose"
            )
        return None

    def __str__(self) -> str:
        text = self._counts()
        if self.left_float:
            text += f"; left float: {_by_type(self.left_float)} not in the map"
        return text + self._kept_clause()

    def _counts(self) -> str:
        text = f"converted {_plural(len(self.converted), 'layer')}"
        if self.input_quantizers:
            text += f" and {_plural(len(self.input_quantizers), 'input quantizer')}"
        return text

    def _kept_clause(self) -> str:
        parts = []
        if self.excluded:
            parts.append(f"excluded: {_by_type(self.excluded)}")
        if self.kept:
            parts.append(f"n_bits <= 0: {_by_type(self.kept)}")
        return f"; kept float on request ({', '.join(parts)})" if parts else ""

    def _why_nothing(self) -> str:
        if self.map_is_empty:
            return (
                "the QuantizationMap has no module_qconfig_map or instance_qconfig_map entries "
                "(call tquant.append_default_conversions(qmap) first?)"
            )
        reasons = []
        if self.kept:
            reasons.append(
                f"{_by_type(self.kept)} matched with n_bits <= 0 for weights and activations "
                "(set qmap.default_qconfig.weight_quant.n_bits / activation_quant.n_bits before "
                "append_default_conversions?)"
            )
        if self.excluded:
            reasons.append(f"{_by_type(self.excluded)} in excluded_modules")
        if self.left_float:
            reasons.append(f"{_by_type(self.left_float)} not in the map ({_names(self.left_float)})")
        return "; ".join(reasons) or "no module of a mapped type or name"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _by_type(modules: dict[str, str]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(Counter(modules.values()).items(), key=lambda kv: (-kv[1], kv[0])))


def _names(modules: dict[str, str]) -> str:
    names = [repr(n or "<root>") for n in modules]
    more = len(names) - MAX_NAMES
    return ", ".join(names[:MAX_NAMES]) + (f" and {more} more" if more > 0 else "")


def _has_own_weights(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _float_leftovers(module: nn.Module, name: str, done: set[int], summary: ConversionSummary) -> None:
    """Record the outermost modules with parameters of their own that the conversion did not reach."""
    if id(module) in done or isinstance(module, LEAF_MODULES):
        return
    if isinstance(module, QuantizedInputModule):
        _float_leftovers(module.module, name, done, summary)
        return
    if _has_own_weights(module):
        summary.left_float[name] = type(module).__name__
        return
    for child_name, child in module.named_children():
        _float_leftovers(child, f"{name}.{child_name}" if name else child_name, done, summary)


def _quantize(model: nn.Module, quantization_map: QuantizationMap, model_name: str,
              summary: ConversionSummary, done: set[int]) -> nn.Module | None:
    """:func:`quantize_model`'s recursion; records every decision in ``summary`` (``done``: ids of
    the modules a rule decided, whose subtrees the leftover search skips)."""
    if model_name in quantization_map.excluded_modules:
        summary.excluded[model_name] = type(model).__name__
        done.add(id(model))
        return None
    if isinstance(model, LEAF_MODULES):
        return None
    qmodule_config = quantization_map.instance_qconfig_map.get(model_name)
    if qmodule_config is None:
        qmodule_config = quantization_map.module_qconfig_map.get(type(model))
    if qmodule_config is not None:
        q_config = qmodule_config.module_qconfig
        if q_config.activation_quant.n_bits <= 0 and q_config.weight_quant.n_bits <= 0:
            summary.kept[model_name] = type(model).__name__
            done.add(id(model))
            return model
        quant_model = _build(model, qmodule_config, quantization_map, model_name)
        summary.converted[model_name] = type(model).__name__
        done.add(id(quant_model))
        return quant_model
    for name, child in list(model.named_children()):
        full_name = f"{model_name}.{name}" if model_name else name
        new_child = _quantize(child, quantization_map, full_name, summary, done)
        if new_child is None:
            continue
        if full_name in quantization_map.input_activation_qconfig_map:
            new_child = QuantizedInputModule(new_child, quantization_map.input_activation_qconfig_map[full_name])
            summary.input_quantizers[full_name] = type(child).__name__
        setattr(model, name, new_child)
    if quantization_map.fold_batch_norm and isinstance(model, nn.Sequential):
        fold_batch_norm(model, sequential_conv_bn_pairs(model), quantization_map.bn_freeze_step)
    if quantization_map.fold_activations and isinstance(model, nn.Sequential):
        fold_sequential_activations(model, set(quantization_map.excluded_modules), model_name)
    return model


def _new_summary(model: nn.Module, quantization_map: QuantizationMap) -> ConversionSummary:
    empty = not quantization_map.module_qconfig_map and not quantization_map.instance_qconfig_map
    return ConversionSummary(type(model).__name__, map_is_empty=empty)


def _report(summary: ConversionSummary, caller: str, strict: bool) -> None:
    """Warn with the summary's problem, or raise it when ``strict``."""
    problem = summary.problem()
    if problem is None:
        return
    if strict:
        raise ConversionError(f"{caller}(strict=True): {problem}")
    warnings.warn(f"{caller}: {problem}", ConversionWarning, stacklevel=3)


def quantize_model(model: nn.Module, quantization_map: QuantizationMap, model_name: str = "",
                   strict: bool = False) -> nn.Module | None:
    """Recursively replace ``model``'s layers in place as ``quantization_map`` says.

    Priority: ``excluded_modules`` > ``instance_qconfig_map`` > ``module_qconfig_map`` (exact
    type) > recurse into children. A matched module whose config has both bit widths <= 0 is
    kept as is. Returns the (possibly new) module, or None for an excluded or leaf module.

    Afterwards, a module with weights of its own that no rule reached, or a conversion that
    converted nothing, gives a :class:`ConversionWarning` (a :class:`ConversionError` with
    ``strict=True``); see :class:`ConversionSummary`.
    """
    summary = _new_summary(model, quantization_map)
    done: set[int] = set()
    result = _quantize(model, quantization_map, model_name, summary, done)
    _float_leftovers(model if result is None else result, model_name, done, summary)
    _report(summary, "quantize_model", strict)
    if result is not None:
        disable_fused_transformer_fast_path(result)
    return result


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


def disable_fused_transformer_fast_path(model: nn.Module) -> int:
    """Keep every ``nn.TransformerEncoderLayer`` that contains quantized layers off PyTorch's fused path.

    In eval mode under ``torch.no_grad()``, ``nn.TransformerEncoderLayer`` (and
    ``nn.TransformerEncoder``) run ``torch._transformer_encoder_layer_fwd``, a fused kernel that
    reads ``linear1``/``linear2``/``norm1``/``norm2``'s float weights directly and never calls
    those modules: their quantizers are skipped and the layer silently evaluates in float (aihwkit
    has the same quirk). The fused path is only taken when ``activation_relu_or_gelu`` is truthy, an
    attribute used for nothing else, so setting it to 0 sends such layers through their modules.
    Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and getattr(module, "activation_relu_or_gelu", 0):
            if any(isinstance(m, (QuantizedModule, QuantizedInputModule)) for m in module.modules()):
                module.activation_relu_or_gelu = 0
                changed += 1
    return changed


def convert_to_quantized(model: nn.Module, quantization_map: QuantizationMap, example_inputs=None,
                         strict: bool = False) -> nn.Module:
    """A quantized deep copy of ``model``, with quantization enabled where bit widths are > 0.

    With ``example_inputs`` (a tensor or a tuple of positional inputs) the model is traced and the
    result is an ``fx.GraphModule`` that also quantizes what an integer chain needs between the
    layers (functional ops, input quantizers, conv/BN pairs, folded activations: :mod:`tquant.graph`);
    a model that cannot be traced is converted module by module, with a
    :class:`~tquant.graph.TracingFallbackWarning` saying why.

    A module with weights of its own that the map does not reach stays float and gives a one-line
    :class:`ConversionWarning` (``converted 14 layers; left float: 2 MultiheadAttention, 1 Conv1d
    not in the map (...)``), as does a map that converts nothing. ``strict=True`` raises
    :class:`ConversionError` instead. Modules in ``excluded_modules`` or matched with both bit
    widths <= 0 are kept float on request: no warning for them (unless nothing was converted).
    Every ``nn.TransformerEncoderLayer`` with quantized layers inside is kept off PyTorch's fused
    eval path, which would skip their quantizers (:func:`disable_fused_transformer_fast_path`).

    Example:
        >>> qmap = QuantizationMap()
        >>> qmap.default_qconfig.weight_quant.n_bits = 8
        >>> qmap.default_qconfig.activation_quant.n_bits = 8
        >>> append_default_conversions(qmap)
        >>> qmodel = convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), qmap, strict=True)
    """
    if not isinstance(quantization_map, QuantizationMap):
        raise QuantizationConfigError(
            f"convert_to_quantized: quantization_map must be a QuantizationMap, got {type(quantization_map).__name__}"
        )
    quantization_map.validate()
    _warn_unknown_names(model, quantization_map)
    if example_inputs is not None:
        from .graph import convert_graph  # the graph path builds on this module

        quant_model = convert_graph(model, quantization_map, example_inputs, strict)
        if quant_model is not None:
            return quant_model
    summary = _new_summary(model, quantization_map)
    done: set[int] = set()
    quant_model = _quantize(copy.deepcopy(model), quantization_map, "", summary, done)
    if quant_model is None:
        quant_model = copy.deepcopy(model)
    if quantization_map.batch_norm_pairs:
        try:
            fold_batch_norm(quant_model, quantization_map.batch_norm_pairs, quantization_map.bn_freeze_step)
        except ValueError as e:
            raise QuantizationConfigError(f"QuantizationMap.batch_norm_pairs: {e}") from e
    if isinstance(quant_model, nn.Module) and "" in quantization_map.input_activation_qconfig_map:
        quant_model = QuantizedInputModule(quant_model, quantization_map.input_activation_qconfig_map[""])
        summary.input_quantizers[""] = type(model).__name__
    _float_leftovers(quant_model, "", done, summary)
    _report(summary, "convert_to_quantized", strict)
    disable_fused_transformer_fast_path(quant_model)
    enable_quant_states(quant_model)
    if quantization_map.quantize_bias:
        link_bias_input_quantizers(quant_model)
    name_quantizers(quant_model)
    return quant_model


__all__ = [
    "DEFAULT_CONVERSIONS",
    "LEAF_MODULES",
    "ConversionError",
    "ConversionSummary",
    "ConversionWarning",
    "QuantizedModule",
    "append_default_conversions",
    "convert_to_quantized",
    "disable_fused_transformer_fast_path",
    "get_module_args",
    "name_quantizers",
    "quantize_model",
]
