"""tquant: fast quantization-aware training for PyTorch.

aihwkit's ``QuantizationMap`` / ``convert_to_quantized`` API and numerics, with every quantizer
running as fused kernels (Triton on the GPU), and one-call ONNX QDQ export (``tquant.export``).
"""

from . import kernels
from .base_modules import FP32Acts, QuantizationHijacker, QuantizedActivation, QuantizedModule
from .config import (
    ActivationQuantConfig,
    BaseQuantConfig,
    CrossEntropyEstimatorParams,
    CurrentMinMaxEstimatorParams,
    MSEEstimatorParams,
    OptMethod,
    QMethods,
    QuantizationConfig,
    QuantizationMap,
    QuantizedModuleConfig,
    RangeEstimators,
    RunningMinMaxEstimatorParams,
    WeightQuantConfig,
    convert_act_config_to_kwargs_dict,
    convert_configs_to_kwargs_dict,
    convert_weight_config_to_kwargs_dict,
)
from .conversion import (
    DEFAULT_CONVERSIONS,
    append_default_conversions,
    convert_to_quantized,
    get_module_args,
    quantize_model,
)
from .distributed import convert_sync_ranges
from .errors import QuantizationConfigError, QuantizerNotInitializedError
from .layers import (
    QuantBatchNorm2d,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantEmbedding,
    QuantizedInputModule,
    QuantLayerNorm,
    QuantLinear,
)
from .quantization_manager import QuantizationManager, Qstates
from .quantizers import AsymmetricUniformQuantizer, QuantizerBase, SymmetricUniformQuantizer
from .range_estimators import (
    AllMinMaxEstimator,
    CrossEntropyEstimator,
    CurrentMinMaxEstimator,
    MSE_Estimator,
    RangeEstimatorBase,
    RunningMinMaxEstimator,
)
from .states import (
    QuantizedModel,
    enable_quant_states,
    estimate_act_ranges,
    estimate_ranges,
    estimate_ranges_train,
    fix_act_ranges,
    fix_ranges,
    fix_weight_ranges,
    full_precision,
    full_precision_acts,
    full_precision_weights,
    learn_ranges,
    quantized,
    quantized_acts,
    quantized_weights,
    reset_act_ranges,
    set_quant_state,
)

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
