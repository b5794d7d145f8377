"""tquant.export: ONNX QuantizeLinear/DequantizeLinear export and onnxruntime validation.

- :func:`export_onnx` writes a trained, converted model as an ONNX QDQ graph with integer
  weights (atomically; checked with ``onnx.checker``);
- :func:`validate_onnx` runs the file in onnxruntime (optimisations off and on) against the
  PyTorch model and returns a :class:`ValidationReport` (codes that agree, error in LSBs, the
  nodes onnxruntime fused);
- :func:`inspect_onnx` lists a file's Q/DQ pairs and weight bytes by storage type (the
  ``tquant inspect`` command, :mod:`tquant.export.inspect_cmd`).

Needs the ``onnx`` extra: ``pip install 'tquant[onnx]'`` (onnx, onnxruntime, onnxscript); without
it, importing this package raises a ``ModuleNotFoundError`` that says so. Importing it also drops
torch.onnx's "torchvision is not installed. Skipping torchvision::nms" log lines
(:func:`~tquant.export._quiet.quiet_third_party_logs`); real warnings pass.
"""

from ..extras import missing_dependency_error
from ._quiet import quiet_third_party_logs

try:
    from .float_report import FloatOpsWarning
    from .inspect_cmd import InspectReport, inspect_onnx
    from .onnx_export import DEFAULT_OPSET, ExportResult, export_onnx
    from .prepare import ExportError, ExportPlan, QuantizerExport, export_mode
    from .validate import MATMULNBITS_ACCURACY, OutputComparison, ValidationReport, WeightComparison, validate_onnx
except ImportError as err:
    _missing = missing_dependency_error(err, "tquant.export")
    if _missing is None:
        raise
    raise _missing from err

quiet_third_party_logs()

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportPlan",
    "ExportResult",
    "FloatOpsWarning",
    "QuantizerExport",
    "export_mode",
    "export_onnx",
    "InspectReport",
    "inspect_onnx",
    "MATMULNBITS_ACCURACY",
    "OutputComparison",
    "ValidationReport",
    "WeightComparison",
    "validate_onnx",
]
