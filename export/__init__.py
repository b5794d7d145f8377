"""tquant.export: ONNX QuantizeLinear/DequantizeLinear export and onnxruntime validation.

- :func:`export_onnx` writes a trained, converted model as an ONNX QDQ graph with integer
  weights (atomically; checked with ``onnx.checker``);
- :func:`validate_onnx` runs the file in onnxruntime (optimisations off and on) against the
  PyTorch model and returns a :class:`ValidationReport` (codes that agree, error in LSBs, the
  nodes onnxruntime fused);
- :func:`inspect_onnx` lists a file's Q/DQ pairs and weight bytes by storage type (the
  ``tquant inspect`` command, :mod:`tquant.export.inspect_cmd`).

Needs the ``onnx`` extra: ``pip install 'tquant[onnx]'`` (onnx, onnxruntime, onnxscript); without
it, the first use of a name from this package (``from tquant.export import export_onnx``) raises a
``ModuleNotFoundError`` that says so. Importing it also drops
torch.onnx's "torchvision is not installed. Skipping torchvision::nms" log lines
(:func:`~tquant.export._quiet.quiet_third_party_logs`); real warnings pass.
"""

from .._lazy import lazy_attributes
from ..extras import missing_dependency_error
from ._quiet import quiet_third_party_logs

_EXPORTS_BY_MODULE = {
    "float_report": ("FloatOpsWarning",),
    "inspect_cmd": ("InspectReport", "inspect_onnx"),
    "onnx_export": ("DEFAULT_OPSET", "ExportResult", "export_onnx"),
    "prepare": ("ExportError", "ExportPlan", "QuantizerExport", "export_mode"),
    "validate": ("MATMULNBITS_ACCURACY", "OutputComparison", "ValidationReport", "WeightComparison", "validate_onnx"),
}

# names load on first use (``tquant inspect --help`` needs only its option parser); a missing onnx
# extra is reported then, naming the extra that brings it
__getattr__, __dir__, __all__ = lazy_attributes(
    __name__, _EXPORTS_BY_MODULE, lambda err: missing_dependency_error(err, "tquant.export")
)

quiet_third_party_logs()
