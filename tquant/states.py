"""Quantization-state helpers: each takes a model and walks it (aihwkit's ``quantization_states``).

``quantized`` / ``full_precision`` (and their ``_weights`` / ``_acts`` halves) switch fake
quantization on or off in every :class:`~tquant.QuantizedModule`; the range helpers move
every :class:`~tquant.QuantizationManager` between ``estimate_ranges``,
``estimate_ranges_train``, ``fix_ranges`` and ``learn_ranges`` (fixing or learning skips
quantizers that have no range yet, as in aihwkit).
"""

from __future__ import annotations

from torch import nn

from .base_modules import (
    QuantizedModule,
    _set_layer_estimate_ranges,
    _set_layer_estimate_ranges_train,
    _set_layer_fix_ranges,
    _set_layer_learn_ranges,
)


def _each_quantized_module(model: nn.Module, method: str, *args) -> None:
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            getattr(module, method)(*args)


def _each_quantizer_of(model: nn.Module, attribute: str, setter) -> None:
    for module in model.modules():
        if isinstance(module, QuantizedModule) and hasattr(module, attribute):
            setter(getattr(module, attribute))
            module.clear_cache()


def _clear_caches(model: nn.Module) -> None:
    _each_quantized_module(model, "clear_cache")


def quantized_weights(model: nn.Module) -> None:
    """Enable weight quantization in every quantized module of ``model``."""
    _each_quantized_module(model, "quantized_weights")


def full_precision_weights(model: nn.Module) -> None:
    """Run every quantized module of ``model`` with full-precision weights."""
    _each_quantized_module(model, "full_precision_weights")


def quantized_acts(model: nn.Module) -> None:
    """Enable activation quantization in every quantized module of ``model``."""
    _each_quantized_module(model, "quantized_acts")


def full_precision_acts(model: nn.Module) -> None:
    """Run every quantized module of ``model`` with full-precision activations."""
    _each_quantized_module(model, "full_precision_acts")


def quantized(model: nn.Module) -> None:
    """Enable weight and activation quantization everywhere in ``model``."""
    _each_quantized_module(model, "quantized")


def full_precision(model: nn.Module) -> None:
    """Disable weight and activation quantization everywhere in ``model``."""
    _each_quantized_module(model, "full_precision")


def learn_ranges(model: nn.Module) -> None:
    """Make the ranges of every initialised quantizer trainable (``delta``, ``zero_float``)."""
    model.apply(_set_layer_learn_ranges)
    _clear_caches(model)


def fix_ranges(model: nn.Module) -> None:
    """Freeze the range of every initialised quantizer."""
    model.apply(_set_layer_fix_ranges)
    _clear_caches(model)


def fix_act_ranges(model: nn.Module) -> None:
    """Freeze the ranges of the (initialised) activation quantizers."""
    _each_quantizer_of(model, "activation_quantizer", _set_layer_fix_ranges)


def fix_weight_ranges(model: nn.Module) -> None:
    """Freeze the ranges of the (initialised) weight quantizers."""
    _each_quantizer_of(model, "weight_quantizer", _set_layer_fix_ranges)


def estimate_ranges(model: nn.Module) -> None:
    """Update ranges on every forward, in train and in eval mode (calibration)."""
    model.apply(_set_layer_estimate_ranges)
    _clear_caches(model)


def estimate_act_ranges(model: nn.Module) -> None:
    """Update the activation ranges on every forward, in train and in eval mode."""
    _each_quantizer_of(model, "activation_quantizer", _set_layer_estimate_ranges)


def estimate_ranges_train(model: nn.Module) -> None:
    """Update ranges on training forwards only (the default state)."""
    model.apply(_set_layer_estimate_ranges_train)
    _clear_caches(model)


def reset_act_ranges(model: nn.Module) -> None:
    """Forget the activation ranges (back to uninitialised, ``estimate_ranges_train``)."""
    _each_quantizer_of(model, "activation_quantizer", lambda q: q.reset_ranges())


def set_quant_state(model: nn.Module, weight_quant: bool, act_quant: bool) -> None:
    """Switch weight and activation quantization on or off for the whole model."""
    (quantized_acts if act_quant else full_precision_acts)(model)
    (quantized_weights if weight_quant else full_precision_weights)(model)


def enable_quant_states(model: nn.Module) -> None:
    """Turn quantization on where the module's bit width is > 0 and off elsewhere."""
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            (module.quantized_weights if module.n_bits > 0 else module.full_precision_weights)()
            (module.quantized_acts if module.n_bits_act > 0 else module.full_precision_acts)()


_MODEL_METHODS = (
    quantized_weights, full_precision_weights, quantized_acts, full_precision_acts, quantized, full_precision,
    learn_ranges, fix_ranges, fix_act_ranges, fix_weight_ranges, estimate_ranges, estimate_act_ranges,
    estimate_ranges_train, reset_act_ranges, set_quant_state,
)


class QuantizedModel(nn.Module):
    """Optional parent of a quantized model: every state helper as a method (aihwkit's ``QuantizedModel``),
    and ``caching``, which reads and sets the eval weight cache of every quantized module inside."""

    @property
    def caching(self) -> bool:
        return all(m.caching for m in self.modules() if isinstance(m, QuantizedModule))

    @caching.setter
    def caching(self, value: bool) -> None:
        for module in self.modules():
            if isinstance(module, QuantizedModule):
                module.caching = value


def _as_method(helper):
    def method(self, *args):
        return helper(self, *args)

    method.__name__ = helper.__name__
    method.__doc__ = helper.__doc__
    return method


for _helper in _MODEL_METHODS:
    setattr(QuantizedModel, _helper.__name__, _as_method(_helper))
