"""tquant.export: ONNX QuantizeLinear/DequantizeLinear export and onnxruntime validation.

- :func:`export_onnx` writes a trained, converted model as an ONNX QDQ graph with integer
  weights (atomically; checked with ``onnx.checker``);
- :func:`validate_onnx` runs the file in onnxruntime (optimisations off and on) against the
  PyTorch model and returns a :class:`ValidationReport` (codes that agree, error in LSBs, the
  nodes onnxruntime fused);
- :func:`inspect_onnx` lists a file's Q/DQ pairs and weight bytes by storage type (the
  ``tquant inspect`` command, :mod:`tquant.export.inspect_cmd`).

Needs the ``onnx`` extra: ``pip install 'tquant[onnx]'`` (onnx, onnxruntime, onnxscript).
"""

from .inspect_cmd import InspectReport, inspect_onnx
from .onnx_export import DEFAULT_OPSET, ExportResult, export_onnx
from .prepare import ExportError, ExportPlan, QuantizerExport, export_mode
from .validate import OutputComparison, ValidationReport, validate_onnx

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportPlan",
    "ExportResult",
    "QuantizerExport",
    "export_mode",
    "export_onnx",
    "InspectReport",
    "inspect_onnx",
    "OutputComparison",
    "ValidationReport",
    "validate_onnx",
]
