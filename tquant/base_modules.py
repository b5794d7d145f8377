"""Base classes of the quantized layers (aihwkit's ``QuantizedModule`` family).

A :class:`QuantizedModule` owns quantization managers and switches weight / activation
quantization on and off. :class:`QuantizationHijacker` is the mixin that turns a torch layer
into a quantized one: ``class QuantLinear(QuantizationHijacker, nn.Linear)`` quantizes the
weight before ``run_forward`` and the output after it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import QMethods, RangeEstimators
from .quantization_manager import QuantizationManager


def _set_layer_learn_ranges(layer: nn.Module) -> None:
    if isinstance(layer, QuantizationManager) and layer.quantizer.is_initialized:
        layer.learn_ranges()


def _set_layer_fix_ranges(layer: nn.Module) -> None:
    if isinstance(layer, QuantizationManager) and layer.quantizer.is_initialized:
        layer.fix_ranges()


def _set_layer_estimate_ranges(layer: nn.Module) -> None:
    if isinstance(layer, QuantizationManager):
        layer.estimate_ranges()


def _set_layer_estimate_ranges_train(layer: nn.Module) -> None:
    if isinstance(layer, QuantizationManager):
        layer.estimate_ranges_train()


class QuantizedModule(nn.Module):
    """Parent of every quantized layer: quantization switches, range states, eval weight cache.

    Keyword arguments (as built by the converter from a :class:`~tquant.QuantizationConfig`):
    ``method``, ``act_method``, ``n_bits``, ``n_bits_act``, ``per_channel_weights``,
    ``per_channel_acts``, ``percentile``, ``weight_range_method``, ``weight_range_options``,
    ``act_range_method``, ``act_range_options``, ``scale_domain`` (``"linear"`` only); tquant's additions
    ``weight_group_size`` (group-wise weights), ``weight_fmt`` and ``act_fmt`` (``"int"`` or an FP8 format).
    """

    def __init__(self, *args, method=QMethods.asymmetric_uniform, act_method=None, n_bits=8, n_bits_act=None,
                 per_channel_weights=False, per_channel_acts=False, percentile=None,
                 weight_range_method=RangeEstimators.current_minmax, weight_range_options=None,
                 act_range_method=RangeEstimators.running_minmax, act_range_options=None, scale_domain="linear",
                 weight_group_size=None, weight_fmt="int", act_fmt="int", **kwargs):
        kwargs.pop("quant_dict", None)
        kwargs.pop("module_map", None)
        kwargs.pop("quantization_map", None)
        super().__init__(*args, **kwargs)
        self.method = method
        self.act_method = act_method or method
        self.n_bits = n_bits
        self.n_bits_act = n_bits_act if n_bits_act is not None else n_bits
        self.per_channel_weights = per_channel_weights
        self.per_channel_acts = per_channel_acts
        self.percentile = percentile
        self.weight_range_method = weight_range_method
        self.weight_range_options = dict(weight_range_options) if weight_range_options else {}
        self.act_range_method = act_range_method
        self.act_range_options = dict(act_range_options) if act_range_options else {}
        self.scale_domain = scale_domain
        self.weight_group_size = weight_group_size
        self.weight_fmt = weight_fmt
        self.act_fmt = act_fmt
        self.cached_params = None
        self._cache_key = None
        self._caching = True
        self.quant_params = None
        self._quant_w = False
        self._quant_a = False

    def _qparams(self, n_bits: int, fmt: str = "int") -> dict:
        params = {"n_bits": n_bits, "scale_domain": self.scale_domain}
        if fmt != "int" and n_bits > 0:  # an FP8 quantizer; a disabled one (n_bits <= 0) stays a plain one
            params["fmt"] = fmt
        return params

    @property
    def caching(self) -> bool:
        """Eval forwards reuse the quantized weights until train()/.to()/a state or weight change."""
        return self._caching

    @caching.setter
    def caching(self, value: bool) -> None:
        self._caching = bool(value)
        if not value:
            self.clear_cache()

    def clear_cache(self) -> None:
        self.cached_params = None
        self._cache_key = None

    def quantized_weights(self) -> None:
        self.clear_cache()
        self._quant_w = True

    def full_precision_weights(self) -> None:
        self.clear_cache()
        self._quant_w = False

    def quantized_acts(self) -> None:
        self._quant_a = True

    def full_precision_acts(self) -> None:
        self._quant_a = False

    def quantized(self) -> None:
        self.quantized_weights()
        self.quantized_acts()

    def full_precision(self) -> None:
        self.full_precision_weights()
        self.full_precision_acts()

    def learn_ranges(self) -> None:
        self.clear_cache()
        self.apply(_set_layer_learn_ranges)

    def fix_ranges(self) -> None:
        self.clear_cache()
        self.apply(_set_layer_fix_ranges)

    def estimate_ranges(self) -> None:
        self.clear_cache()
        self.apply(_set_layer_estimate_ranges)

    def estimate_ranges_train(self) -> None:
        self.clear_cache()
        self.apply(_set_layer_estimate_ranges_train)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.clear_cache()
        return self

    def _apply(self, *args, **kwargs):
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        quant_state = f"weight_quant={self._quant_w}, act_quant={self._quant_a}"
        parent = super().extra_repr()
        return f"{parent},\n{quant_state}" if parent else quant_state


class QuantizedActivation(QuantizedModule):
    """Fake-quantizes its input (``activation_quantizer``) when activation quantization is on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_quantizer = QuantizationManager(
            qmethod=self.act_method,
            qparams=self._qparams(self.n_bits_act, self.act_fmt),
            init=self.act_range_method,
            per_channel=self.per_channel_acts,
            init_params=self.act_range_options,
        )

    def quantize_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_quantizer(x) if self._quant_a else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_activations(x)


class FP32Acts(nn.Module):
    """Identity stand-in for an activation quantizer (e.g. an embedding's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reset_ranges(self) -> None:
        pass


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.GELU, nn.SiLU, nn.LeakyReLU)


class QuantizationHijacker(QuantizedModule):
    """Mixin: quantize the weight before and the output after the wrapped layer's op.

    Put it first: ``class QuantLinear(QuantizationHijacker, nn.Linear)``; subclasses implement
    ``run_forward(x, weight, bias)``. An optional ``activation`` module runs before the output
    quantizer. In eval mode with ``caching`` on, the quantized weight is computed once and
    reused while the weight, the quantizer and the switches stay the same.
    """

    def __init__(self, *args, activation: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if activation is not None and not isinstance(activation, ACTIVATIONS):
            raise ValueError(
                f"{type(self).__name__}.activation: {type(activation).__name__} is not a supported activation"
            )
        self.activation_function = copy.deepcopy(activation) if activation is not None else None
        self.unfolded_activation: str | None = None  # set by tquant.folding: why a following one was not folded
        self.float_bias_note: str | None = None  # set by tquant.bias: why the bias is not quantized to int32
        self.activation_quantizer = QuantizationManager(
            qmethod=self.act_method,
            init=self.act_range_method,
            per_channel=self.per_channel_acts,
            qparams=self._qparams(self.n_bits_act, self.act_fmt),
            init_params=self.act_range_options,
        )
        if self.weight_range_method == RangeEstimators.current_minmax:
            weight_init_params = {"percentile": self.percentile}
        else:
            weight_init_params = self.weight_range_options
        weight = getattr(self, "weight", None)
        qparams = self._qparams(self.n_bits, self.weight_fmt)
        grouped = self.weight_group_size is not None and self.n_bits > 0 and weight is not None
        if grouped:
            qparams.update(group_size=self.weight_group_size, weight_shape=tuple(weight.shape))
        self.weight_quantizer = QuantizationManager(
            qmethod=self.method,
            init=self.weight_range_method,
            per_channel=self.per_channel_weights,
            qparams=qparams,
            init_params=weight_init_params,
            n_channels=weight.shape[0] if (self.per_channel_weights or grouped) and weight is not None else None,
        )

    def forward(self, x: torch.Tensor, offsets=None) -> torch.Tensor:
        weight, bias = self.get_params()
        res = self.run_forward(x, weight, bias, offsets=offsets)
        return self.quantize_activations(res)

    def get_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, getattr(self, "bias", None)

    def bias_input_quantizer(self) -> QuantizationManager | None:
        """The quantizer of this layer's input when its bias is quantized to int32 (see :mod:`tquant.bias`).

        Held outside the module tree (not a submodule, not in the state dict): it belongs to
        another layer or to the wrapping :class:`~tquant.QuantizedInputModule`. A method, not a
        property: torch.export reads every attribute of a module and would take it for a submodule.
        """
        link = self.__dict__.get("_bias_input_quantizer")
        return link[0] if link else None

    def set_bias_input_quantizer(self, manager: QuantizationManager | None) -> None:
        """Link (or with None unlink) the input quantizer whose scale the int32 bias uses."""
        if manager is not None and not isinstance(manager, QuantizationManager):
            raise TypeError(
                f"{type(self).__name__}.set_bias_input_quantizer: expected a QuantizationManager, "
                f"got {type(manager).__name__}"
            )
        self.clear_cache()
        # in a tuple: deepcopy maps it with the model; forward reads only the plain flag
        self.__dict__["_bias_input_quantizer"] = (manager,) if manager is not None else None
        self._int32_bias = manager is not None

    def quantize_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``bias`` onto the int32 grid of scale ``s_x * s_w`` (zero point 0), when linked.

        ``s_x``: :meth:`bias_input_quantizer`'s (per-tensor) scale, ``s_w``: the weight quantizer's
        (per tensor or per output channel). Straight-through gradient. The bias is returned as is
        when no input quantizer is linked or a range is not set yet. onnxruntime's integer
        Conv/Gemm kernels add exactly this bias to their int32 accumulators.
        """
        source = self.bias_input_quantizer()
        wq = self.weight_quantizer.quantizer
        if source is None or not source.quantizer.is_initialized or not wq.is_initialized:
            return bias
        s_x = source.quantizer.scale.detach().float()
        if s_x.numel() != 1:
            return bias
        scale = s_x.reshape(()) * wq.scale.detach().float()
        codes = torch.clamp(torch.round(bias.float() / scale), -(2.0**31), 2.0**31 - 1)
        return bias + ((codes * scale).to(bias.dtype) - bias).detach()

    def _weight_cache_key(self, weight: torch.Tensor) -> tuple:
        q = self.weight_quantizer.quantizer
        key = (weight.data_ptr(), weight._version, self.weight_quantizer.state, q._delta.data_ptr(),
               q._delta._version, q._zero_float._version, q._signed._version)
        if self.__dict__.get("_int32_bias", False):
            source = self.bias_input_quantizer().quantizer
            key += (source._delta.data_ptr(), source._delta._version)
        return key

    def get_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` to run the layer with: the weight fake-quantized when ``_quant_w``."""
        weight, bias = self.get_weight_bias()
        if not self._quant_w or weight is None:
            return weight, bias
        use_cache = self._caching and not self.training and not torch.compiler.is_compiling()
        if use_cache and self.cached_params is not None and self._cache_key == self._weight_cache_key(weight):
            return self.cached_params
        weight = self.weight_quantizer(weight)
        if bias is not None and self.__dict__.get("_int32_bias", False):
            bias = self.quantize_bias(bias)
        if use_cache:
            self.cached_params = (weight.detach(), bias.detach() if bias is not None else None)
            self._cache_key = self._weight_cache_key(self.weight)
        return weight, bias

    def run_forward(self, x, weight, bias, offsets=None):
        raise NotImplementedError(f"{type(self).__name__} must implement run_forward(x, weight, bias)")

    def quantize_activations(self, activations: torch.Tensor) -> torch.Tensor:
        if self.activation_function is not None:
            activations = self.activation_function(activations)
        if self._quant_a:
            activations = self.activation_quantizer(activations)
        return activations
