"""tquant: fast quantization-aware training for PyTorch.

aihwkit's ``QuantizationMap`` / ``convert_to_quantized`` API and numerics, with every quantizer
running as fused kernels (Triton on the GPU), and one-call ONNX QDQ export (``tquant.export``).

The public names below load on first use (``tquant._lazy``), and every submodule is an attribute
without an explicit import (``tquant.attention``, ``tquant.export``): ``import tquant`` alone does
not import torch, so the ``tquant`` command answers ``--help`` in a fraction of a second. When torch is
already imported, ``import tquant`` loads everything at once, as a plain package would (the
``torch.ops.tquant`` ops are then registered right away).
"""

import sys

from ._lazy import lazy_attributes, load_all

__version__ = "0.1.0"

_EXPORTS_BY_MODULE = {
    "base_modules": ("FP32Acts", "QuantizationHijacker", "QuantizedActivation", "QuantizedModule"),
    "config": (
        "ActivationQuantConfig", "BaseQuantConfig", "CrossEntropyEstimatorParams", "CurrentMinMaxEstimatorParams",
        "MSEEstimatorParams", "OptMethod", "QMethods", "QuantizationConfig", "QuantizationMap",
        "QuantizedModuleConfig", "RangeEstimators", "RunningMinMaxEstimatorParams", "WeightQuantConfig",
        "convert_act_config_to_kwargs_dict", "convert_configs_to_kwargs_dict", "convert_weight_config_to_kwargs_dict",
    ),
    "conversion": (
        "DEFAULT_CONVERSIONS", "ConversionError", "ConversionSummary", "ConversionWarning",
        "append_default_conversions", "convert_to_quantized", "disable_fused_transformer_fast_path",
        "get_module_args", "quantize_model",
    ),
    "distributed": ("convert_sync_ranges",),
    "errors": ("QuantizationConfigError", "QuantizerNotInitializedError"),
    "graph": ("TracingFallbackWarning",),
    "layers": (
        "QuantBatchNorm2d", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantEmbedding", "QuantizedInputModule",
        "QuantLayerNorm", "QuantLinear",
    ),
    "quantization_manager": ("Qstates", "QuantizationManager"),
    "quantizers": ("AsymmetricUniformQuantizer", "QuantizerBase", "SymmetricUniformQuantizer"),
    "range_estimators": (
        "AllMinMaxEstimator", "CrossEntropyEstimator", "CurrentMinMaxEstimator", "MSE_Estimator",
        "RangeEstimatorBase", "RunningMinMaxEstimator",
    ),
    "states": (
        "QuantizedModel", "enable_quant_states", "estimate_act_ranges", "estimate_ranges", "estimate_ranges_train",
        "fix_act_ranges", "fix_ranges", "fix_weight_ranges", "full_precision", "full_precision_acts",
        "full_precision_weights", "learn_ranges", "quantized", "quantized_acts", "quantized_weights",
        "reset_act_ranges", "set_quant_state",
    ),
}
__getattr__, __dir__, _names = lazy_attributes(__name__, _EXPORTS_BY_MODULE)

__all__ = ["__version__", "kernels", *_names]

if "torch" in sys.modules:
    load_all(__name__, __all__)
