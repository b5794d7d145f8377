"""Configuration dataclasses of the aihwkit ``QuantizationMap`` API.

Names, fields, positional order and defaults follow aihwkit 1.2.0, so existing user code
runs unchanged. Values are validated when they are set (also after construction, since
aihwkit's users write ``qmap.default_qconfig.weight_quant.n_bits = 4``); a bad value raises
:class:`~tquant.errors.QuantizationConfigError` (or ``TypeError`` for an estimator-params
object of the wrong class) naming the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import QuantizationConfigError
from .registry import implementation

MAX_BITS = 16

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
"""Number formats of ``fmt``: the integer grid of ``n_bits`` bits, or OCP FP8 (E4M3, E5M2; 8 bits)."""


class RangeEstimators(enum.Enum):
    """How a quantizer's range is estimated (``RangeEstimators["MSE"]`` works too)."""

    current_minmax = 0
    allminmax = 1
    running_minmax = 2
    MSE = 3
    cross_entropy = 4

    @classmethod
    def list(cls) -> list[str]:
        return [m.name for m in cls]

    @property
    def cls(self) -> type:
        """The range estimator module class of this member (see :mod:`tquant.registry`)."""
        return implementation(self)


class OptMethod(enum.Enum):
    """Search method of the MSE / cross-entropy estimators."""

    grid = 1
    golden_section = 2

    @classmethod
    def list(cls) -> list[str]:
        return [m.name for m in cls]


class QMethods(enum.Enum):
    """Quantizer kinds (aihwkit's ``QMethods``)."""

    symmetric_uniform = 0
    asymmetric_uniform = 1

    @property
    def cls(self) -> type:
        """The quantizer module class of this member (see :mod:`tquant.registry`)."""
        return implementation(self)

    @classmethod
    def list(cls) -> list[str]:
        return [m.name for m in cls]


def check_bits(value: Any, where: str) -> int:
    """``n_bits`` must be an int: ``<= 0`` disables quantization, else 2..16."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantizationConfigError(f"{where}: n_bits must be an int, got {value!r} ({type(value).__name__})")
    if value > MAX_BITS or value == 1:
        raise QuantizationConfigError(
            f"{where}: n_bits={value} is not supported; use 2..{MAX_BITS} bits, or <= 0 to disable quantization"
        )
    return value


def _check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise QuantizationConfigError(f"{where} must be a bool, got {value!r}")
    return value


def _check_fmt(value: Any, where: str) -> str:
    if value not in FORMATS:
        raise QuantizationConfigError(f"{where}: unknown format {value!r}; expected one of {', '.join(FORMATS)}")
    return value


def _check_group_size(value: Any, where: str) -> int | None:
    """``None`` (no groups) or an int >= 1; whether it fits a layer is checked at conversion."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise QuantizationConfigError(
            f"{where} must be None or an int >= 1 (a power of two >= 16, or a divisor of the layer's input "
            f"features), got {value!r}"
        )
    return value


def _to_enum(enum_cls: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str) and value in enum_cls.__members__:
        return enum_cls[value]
    raise QuantizationConfigError(
        f"{where}: unknown value {value!r}; expected one of {', '.join(enum_cls.__members__)}"
    )


@dataclass
class CurrentMinMaxEstimatorParams:
    """Parameters of ``RangeEstimators.current_minmax``.

    ``percentile`` p (0 <= p < 50) clips the lower p% and the upper p% of the values
    (exact percentiles, linear interpolation, on the device); None uses the plain min/max.
    """

    percentile: float | None = None

    def __post_init__(self):
        p = self.percentile
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 50):
            raise QuantizationConfigError(
                f"CurrentMinMaxEstimatorParams.percentile must be None or a number in [0, 50), got {p!r}"
            )


@dataclass
class RunningMinMaxEstimatorParams:
    """Parameters of ``RangeEstimators.running_minmax``: ``new = (1 - m) * batch + m * old``."""

    momentum: float = 0.9

    def __post_init__(self):
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise QuantizationConfigError(
                f"RunningMinMaxEstimatorParams.momentum must be a number in [0, 1), got {m!r}"
            )


@dataclass
class MSEEstimatorParams:
    """Parameters of ``RangeEstimators.MSE``: search method, grid size, search margin."""

    range_opt_method: OptMethod = OptMethod.golden_section
    num_candidates: int = 100
    range_margin: float = 0.5

    def __post_init__(self):
        name = type(self).__name__
        self.range_opt_method = _to_enum(OptMethod, self.range_opt_method, f"{name}.range_opt_method")
        n = self.num_candidates
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise QuantizationConfigError(f"{name}.num_candidates must be an int >= 2, got {n!r}")
        m = self.range_margin
        # The margin bounds the search of all-zero data: a non-positive bound has no candidate.
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m > 0 and m != float("inf")):
            raise QuantizationConfigError(f"{name}.range_margin must be a finite number > 0, got {m!r}")


@dataclass
class CrossEntropyEstimatorParams(MSEEstimatorParams):
    """Parameters of ``RangeEstimators.cross_entropy`` (same fields as :class:`MSEEstimatorParams`)."""


ESTIMATOR_PARAMS: dict[RangeEstimators, type | None] = {
    RangeEstimators.current_minmax: CurrentMinMaxEstimatorParams,
    RangeEstimators.allminmax: None,
    RangeEstimators.running_minmax: RunningMinMaxEstimatorParams,
    RangeEstimators.MSE: MSEEstimatorParams,
    RangeEstimators.cross_entropy: CrossEntropyEstimatorParams,
}


class BaseQuantConfig:
    """Bits, symmetry and range estimator of one quantizer.

    ``n_bits <= 0`` means no quantization. Setting ``range_estimator`` resets
    ``range_estimator_params`` to that estimator's default params (``None`` for ``allminmax``);
    assigning params of another class raises ``TypeError``. ``fmt`` (tquant's addition, keyword only):
    ``"int"`` (default) or an FP8 format, ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (``n_bits=8``, symmetric; see
    :func:`check_format`).
    """

    _default_estimator = RangeEstimators.current_minmax

    def __init__(self, n_bits: int = 0, symmetric: bool = True, range_estimator=None, range_estimator_params=None,
                 *, fmt: str = "int"):
        self.n_bits = n_bits
        self.symmetric = symmetric
        self.fmt = fmt
        self.range_estimator = self._default_estimator if range_estimator is None else range_estimator
        if range_estimator_params is not None:
            self.range_estimator_params = range_estimator_params

    def __setattr__(self, name: str, value: Any) -> None:
        where = f"{type(self).__name__}.{name}"
        if name == "n_bits":
            value = check_bits(value, type(self).__name__)
        elif name in ("symmetric", "per_channel"):
            value = _check_bool(value, where)
        elif name == "fmt":
            value = _check_fmt(value, where)
        elif name == "group_size":
            value = _check_group_size(value, where)
        super().__setattr__(name, value)

    @property
    def range_estimator(self) -> RangeEstimators:
        return self._range_estimator

    @range_estimator.setter
    def range_estimator(self, value) -> None:
        value = _to_enum(RangeEstimators, value, f"{type(self).__name__}.range_estimator")
        self._range_estimator = value
        params_cls = ESTIMATOR_PARAMS[value]
        self._range_estimator_params = params_cls() if params_cls is not None else None

    @property
    def range_estimator_params(self) -> Any:
        return self._range_estimator_params

    @range_estimator_params.setter
    def range_estimator_params(self, params: Any) -> None:
        expected = ESTIMATOR_PARAMS[self._range_estimator]
        owner = f"{type(self).__name__}.range_estimator_params"
        if expected is None:
            if params is not None:
                raise TypeError(f"{owner}: range estimator 'allminmax' does not accept a params object")
        elif not isinstance(params, expected):
            raise TypeError(
                f"{owner}: range estimator '{self._range_estimator.name}' expects parameters of type "
                f"{expected.__name__}, got {type(params).__name__}"
            )
        self._range_estimator_params = params

    def _fields(self) -> dict[str, Any]:
        return {
            "n_bits": self.n_bits,
            "symmetric": self.symmetric,
            "range_estimator": self.range_estimator,
            "range_estimator_params": self.range_estimator_params,
            "fmt": self.fmt,
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._fields() == self._fields()


class ActivationQuantConfig(BaseQuantConfig):
    """Quantization of a layer's OUTPUT activations (default estimator: ``running_minmax``).

    ``ActivationQuantConfig(n_bits=0, symmetric=True, range_estimator=RangeEstimators.running_minmax,
    range_estimator_params=None, fmt="int")``; FP8 activations have one scale per tensor.
    """

    _default_estimator = RangeEstimators.running_minmax

    def __init__(
        self,
        n_bits: int = 0,
        symmetric: bool = True,
        range_estimator: RangeEstimators = RangeEstimators.running_minmax,
        range_estimator_params: Any = None,
        fmt: str = "int",
    ):
        super().__init__(n_bits, symmetric, range_estimator, range_estimator_params, fmt=fmt)


class WeightQuantConfig(BaseQuantConfig):
    """Quantization of a layer's weights (default estimator: ``current_minmax``).

    ``WeightQuantConfig(n_bits=0, symmetric=True, per_channel=False,
    range_estimator=RangeEstimators.current_minmax, range_estimator_params=None, group_size=None, fmt="int")``;
    per-channel ranges are along dim 0 (output channels).

    ``group_size`` (tquant's addition): one range (delta and zero point) per output channel and group of
    ``group_size`` consecutive input features (``per_channel`` is then implied). It must be a power of two
    >= 16 (the last group of a row may be shorter) or divide the layer's input features (checked when the
    layer is converted); conv weights group ``group_size`` input channels, each with its whole kernel
    (see :mod:`tquant.kernels.group_reference`). Estimators: ``current_minmax`` (without percentile),
    ``allminmax``, ``running_minmax``, ``MSE``, and learned ranges.
    """

    def __init__(
        self,
        n_bits: int = 0,
        symmetric: bool = True,
        per_channel: bool = False,
        range_estimator: RangeEstimators = RangeEstimators.current_minmax,
        range_estimator_params: Any = None,
        group_size: int | None = None,
        fmt: str = "int",
    ):
        super().__init__(n_bits, symmetric, range_estimator, range_estimator_params, fmt=fmt)
        self.per_channel = per_channel
        self.group_size = group_size

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "per_channel": self.per_channel, "group_size": self.group_size}


def _check_type(value: Any, cls: type, where: str) -> None:
    if not isinstance(value, cls):
        raise QuantizationConfigError(f"{where} must be a {cls.__name__}, got {type(value).__name__}")


@dataclass
class QuantizationConfig:
    """The output-activation and weight quantization of one layer."""

    activation_quant: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    weight_quant: WeightQuantConfig = field(default_factory=WeightQuantConfig)

    def __post_init__(self):
        _check_type(self.activation_quant, ActivationQuantConfig, "QuantizationConfig.activation_quant")
        _check_type(self.weight_quant, WeightQuantConfig, "QuantizationConfig.weight_quant")


@dataclass
class QuantizedModuleConfig:
    """A quantized module class paired with the :class:`QuantizationConfig` to build it with."""

    quantized_module: Any
    module_qconfig: QuantizationConfig

    def __post_init__(self):
        if not (isinstance(self.quantized_module, type) and issubclass(self.quantized_module, nn.Module)):
            raise QuantizationConfigError(
                f"QuantizedModuleConfig.quantized_module must be an nn.Module class, got {self.quantized_module!r}"
            )
        _check_type(self.module_qconfig, QuantizationConfig, "QuantizedModuleConfig.module_qconfig")


@dataclass
class QuantizationMap:
    """What to convert and how, consumed by :func:`tquant.convert_to_quantized`.

    Priority (highest first): ``excluded_modules`` (state-dict names) > ``instance_qconfig_map``
    (state-dict names) > ``module_qconfig_map`` (exact module type) > recurse into children.
    ``input_activation_qconfig_map`` wraps the named (converted or kept) modules in a
    :class:`~tquant.QuantizedInputModule`. ``default_qconfig`` is only used by
    :func:`~tquant.append_default_conversions`.

    ``fold_activations`` (default False, aihwkit's behaviour): fold a ReLU/ReLU6/Hardtanh that
    directly follows a converted layer in an ``nn.Sequential`` into that layer, so its output
    quantizer sits after the activation and each tensor is quantized once (see
    :mod:`tquant.folding` for the patterns folded and the activations left alone).
    ``fold_batch_norm`` (default False): fold a BatchNorm2d that directly follows a converted
    Conv2d in an ``nn.Sequential`` into it (:class:`~tquant.folding.QuantConvBn2d`: the quantized
    weight is the BN-folded weight); ``batch_norm_pairs`` names more pairs (``{"layer1.conv1":
    "layer1.bn1"}``) for convs used from a custom ``forward``; ``bn_freeze_step``: training
    forwards after which the running statistics stop updating (None: never).
    ``quantize_bias`` (default False): Linear/Conv biases fake-quantized to int32 at input scale x
    weight scale, as onnxruntime's integer kernels add them (:mod:`tquant.bias` has the rule that
    finds each layer's input quantizer).
    """

    default_qconfig: QuantizationConfig = field(default_factory=QuantizationConfig)
    module_qconfig_map: dict = field(default_factory=dict)
    instance_qconfig_map: dict = field(default_factory=dict)
    input_activation_qconfig_map: dict = field(default_factory=dict)
    excluded_modules: list = field(default_factory=list)
    fold_activations: bool = False
    fold_batch_norm: bool = False
    batch_norm_pairs: dict = field(default_factory=dict)
    bn_freeze_step: int | None = None
    quantize_bias: bool = False

    def validate(self) -> None:
        """Check keys and values of every map (called by the converter before it starts)."""
        for flag in ("fold_activations", "fold_batch_norm", "quantize_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise QuantizationConfigError(
                    f"QuantizationMap.{flag} must be True or False, got {getattr(self, flag)!r}"
                )
        for key, value in self.batch_norm_pairs.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise QuantizationConfigError(
                    f"QuantizationMap.batch_norm_pairs: {key!r}: {value!r} must map a conv's state-dict name "
                    "to its batch norm's (str: str)"
                )
        step = self.bn_freeze_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise QuantizationConfigError(
                f"QuantizationMap.bn_freeze_step must be None or an int >= 0, got {step!r}"
            )
        _check_type(self.default_qconfig, QuantizationConfig, "QuantizationMap.default_qconfig")
        for key, value in self.module_qconfig_map.items():
            if not (isinstance(key, type) and issubclass(key, nn.Module)):
                raise QuantizationConfigError(
                    f"QuantizationMap.module_qconfig_map: key {key!r} is not a module type "
                    "(use instance_qconfig_map for state-dict names)"
                )
            _check_type(value, QuantizedModuleConfig, f"QuantizationMap.module_qconfig_map[{key.__name__}]")
        for key, value in self.instance_qconfig_map.items():
            if not isinstance(key, str):
                raise QuantizationConfigError(
                    f"QuantizationMap.instance_qconfig_map: key {key!r} is not a state-dict name (str)"
                )
            _check_type(value, QuantizedModuleConfig, f"QuantizationMap.instance_qconfig_map[{key!r}]")
        for key, value in self.input_activation_qconfig_map.items():
            if not isinstance(key, str):
                raise QuantizationConfigError(
                    f"QuantizationMap.input_activation_qconfig_map: key {key!r} is not a state-dict name (str)"
                )
            _check_type(value, ActivationQuantConfig, f"QuantizationMap.input_activation_qconfig_map[{key!r}]")
        for name in self.excluded_modules:
            if not isinstance(name, str):
                raise QuantizationConfigError(f"QuantizationMap.excluded_modules: {name!r} is not a state-dict name")


def _estimator_options(cfg: BaseQuantConfig) -> dict[str, Any]:
    params = cfg.range_estimator_params
    if cfg.range_estimator == RangeEstimators.running_minmax:
        return {"momentum": params.momentum}
    if cfg.range_estimator in (RangeEstimators.MSE, RangeEstimators.cross_entropy):
        return {
            "opt_method": params.range_opt_method,
            "num_candidates": params.num_candidates,
            "range_margin": params.range_margin,
        }
    return {}


def check_format(cfg: BaseQuantConfig) -> None:
    """The cross-field rules of ``fmt`` and ``group_size`` (fields are set one at a time, so they are
    checked when a layer is built): FP8 is 8-bit and symmetric, per tensor or per channel; groups take
    the min/max estimators (no percentile) and MSE."""
    name = type(cfg).__name__
    if cfg.n_bits <= 0:
        return
    if cfg.fmt != "int":
        if cfg.n_bits != 8:
            raise QuantizationConfigError(f"{name}.fmt={cfg.fmt!r} is an 8-bit format: set n_bits=8, got {cfg.n_bits}")
        if not cfg.symmetric:
            raise QuantizationConfigError(f"{name}.fmt={cfg.fmt!r} has no zero point: set symmetric=True")
        if getattr(cfg, "group_size", None) is not None:
            raise QuantizationConfigError(f"{name}.group_size: group-wise scales are for fmt='int' weights")
        if cfg.range_estimator in (RangeEstimators.MSE, RangeEstimators.cross_entropy):
            raise QuantizationConfigError(
                f"{name}.range_estimator={cfg.range_estimator.name} searches integer grids; FP8 takes "
                "current_minmax, allminmax or running_minmax"
            )
    if getattr(cfg, "group_size", None) is not None:
        est = cfg.range_estimator
        if est == RangeEstimators.cross_entropy or (
            est == RangeEstimators.current_minmax and cfg.range_estimator_params.percentile
        ):
            what = "cross_entropy" if est == RangeEstimators.cross_entropy else "a percentile"
            raise QuantizationConfigError(
                f"{name}.group_size: group-wise ranges do not support {what}; use current_minmax, allminmax, "
                "running_minmax or MSE"
            )


def convert_weight_config_to_kwargs_dict(cfg: WeightQuantConfig) -> dict[str, Any]:
    """``WeightQuantConfig`` → the keyword arguments of :class:`~tquant.QuantizedModule`."""
    check_format(cfg)
    current = cfg.range_estimator == RangeEstimators.current_minmax
    kwargs = {
        "method": QMethods.symmetric_uniform if cfg.symmetric else QMethods.asymmetric_uniform,
        "n_bits": cfg.n_bits,
        "per_channel_weights": cfg.per_channel,
        "percentile": cfg.range_estimator_params.percentile if current else None,
        "weight_range_method": cfg.range_estimator,
        "weight_range_options": _estimator_options(cfg),
    }
    if cfg.group_size is not None:  # tquant's additions, only when used: aihwkit's dict otherwise
        kwargs["weight_group_size"] = cfg.group_size
    if cfg.fmt != "int":
        kwargs["weight_fmt"] = cfg.fmt
    return kwargs


def convert_act_config_to_kwargs_dict(cfg: ActivationQuantConfig) -> dict[str, Any]:
    """``ActivationQuantConfig`` → the keyword arguments of :class:`~tquant.QuantizedModule`."""
    check_format(cfg)
    options = _estimator_options(cfg)
    if cfg.range_estimator == RangeEstimators.current_minmax:
        options["percentile"] = cfg.range_estimator_params.percentile
    kwargs = {
        "act_method": QMethods.symmetric_uniform if cfg.symmetric else QMethods.asymmetric_uniform,
        "n_bits_act": cfg.n_bits,
        "act_range_method": cfg.range_estimator,
        "act_range_options": options,
    }
    if cfg.fmt != "int":
        kwargs["act_fmt"] = cfg.fmt
    return kwargs


def convert_configs_to_kwargs_dict(cfg: QuantizationConfig) -> dict[str, Any]:
    """``QuantizationConfig`` → keyword arguments for a quantized module's constructor."""
    return {
        **convert_weight_config_to_kwargs_dict(cfg.weight_quant),
        **convert_act_config_to_kwargs_dict(cfg.activation_quant),
    }
