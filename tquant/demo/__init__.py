"""``tquant demo``: the whole job end to end on real data, in one command.

1. loads scikit-learn's bundled handwritten digits (1797 8x8 images, no download) and splits
   off a stratified, seeded 25% test set;
2. trains a small float CNN (:class:`DigitsCNN`) and reports its test accuracy;
3. converts it twice with a :class:`~tquant.QuantizationMap` (:func:`quantization_map`) —
   8-bit per-channel weights and 8-bit activations (``W8A8``), and ``--bits``-bit weights with
   8-bit activations (``W4A8`` by default) — both with 8-bit quantization of the network input
   (the first layer's ``input_activation_qconfig_map`` entry), each ReLU folded into the layer
   before it (``fold_activations``: one quantization per tensor), int32 biases
   (``quantize_bias``) and float logits; calibrates each (``tquant.estimate_ranges`` on training batches; the accuracy
   after calibration is the post-training-quantization figure), then runs QAT (the default
   ``estimate_ranges_train`` state) and reports the test accuracy;
4. exports the float model and each quantized model to ONNX (:func:`tquant.export.export_onnx`),
   validates each file in onnxruntime (:func:`tquant.export.validate_onnx`), and measures the
   onnxruntime model's test accuracy, its agreement with the PyTorch model's predictions, the
   file size relative to the float file and the onnxruntime speed-up over the float model;
5. prints one summary table and writes ``summary.md``, ``summary.json``, ``summary.png`` and
   the ONNX files to ``--out`` (default ``./tquant-demo/``).

Deterministic for a given ``--seed`` on a given machine and device: the split, the weight
initialisation and the batch order are seeded, ``torch.use_deterministic_algorithms`` is on
(``warn_only``) and TF32 is off for the run; the process-wide torch settings it changes
(threads, determinism, TF32) are restored when it returns. On a CUDA device the quantizers run
as tquant's Triton kernels (``TQUANT_BACKEND=auto``); onnxruntime always runs on the CPU.

Bad input (an unknown option value, ``--device cuda`` without a CUDA device, an output folder
that cannot be created or written, a missing optional dependency) prints one line
``tquant demo: error: ...`` on stderr and exits with status 2, without a traceback.

The code is split by what it does: :mod:`.settings` (constants, options, errors), :mod:`.data`,
:mod:`.model` (the CNN and its QuantizationMap), :mod:`.training`, :mod:`.runtime`
(onnxruntime), :mod:`.report` (table, markdown, plot), :mod:`.pipeline` (:func:`run_demo`) and
:mod:`.cli` (``add_parser``/``run``, used by ``tquant/cli.py``). This package is the face of
tquant: it imports the core and ``tquant.export``; nothing in the core imports it.
"""

from __future__ import annotations

import tempfile  # noqa: F401  (tests patch tempfile through this module)

from .._lazy import lazy_attributes

_EXPORTS_BY_MODULE = {
    "cli": ("add_parser", "run"),
    "data": ("DigitsData", "load_digits_split"),
    "model": ("DigitsCNN", "quantization_map"),
    "pipeline": ("prepare_out_dir", "run_demo"),
    "report": ("DemoReport", "VariantResult"),
    "runtime": ("ort_latencies_ms", "ort_predict"),
    "settings": ("DEFAULT_BITS", "DEFAULT_EPOCHS", "DEFAULT_QAT_EPOCHS", "FLOAT_LR", "LATENCY_BATCH", "QAT_LR",
                 "DemoConfig", "DemoError"),
    "training": ("accuracy", "calibrate", "predict", "train"),
}

# names load on first use: ``tquant demo --help`` needs only the option parser (``.cli``)
__getattr__, __dir__, __all__ = lazy_attributes(__name__, _EXPORTS_BY_MODULE)
