"""The int8 deployment recipe (README: "Deploying any model") and its peers, for ``tquant bench onnx``.

:func:`deploy_int8` is the recipe: the same lines for every model (no layer names), as the README
shows them. :func:`brevitas_peer` is Brevitas' graph mode as its documentation teaches it, run
when Brevitas is installed (``pip install 'tquant[peers]'``; never needed by tquant itself).
:func:`family_files` builds one model family's files: float, ``quantize_static``, tquant and
Brevitas, plus what is measured without a clock (argmax agreement with the float model on random
inputs, validation, what onnxruntime leaves in float).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import families

__all__ = ["AGREEMENT_SAMPLES", "CALIBRATION_BATCHES", "brevitas_peer", "deploy_int8", "family_files"]

CALIBRATION_BATCHES = 8
"""Calibration batches (of the benchmark batch size) for tquant, ``quantize_static`` and Brevitas alike."""
AGREEMENT_SAMPLES = 512
"""Random inputs on which each file's argmax is compared with the float PyTorch model's."""


def deploy_int8(model: nn.Module, example: torch.Tensor, calibration, path):
    """Quantize ``model`` to int8, calibrate it on ``calibration`` batches, export it to ``path`` and validate.

    Returns ``(qmodel, export result, validation report)``.
    """
    import tquant
    from tquant.export import export_onnx, validate_onnx

    qmap = tquant.QuantizationMap(fold_activations=True, fold_batch_norm=True, quantize_bias=True)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8)
    tquant.append_default_conversions(qmap)
    qmodel = tquant.convert_to_quantized(model, qmap, example_inputs=(example,))
    tquant.estimate_ranges(qmodel)  # calibration: ranges follow the data in eval mode too
    qmodel.eval()
    with torch.no_grad():
        for batch in calibration:
            qmodel(batch)
    tquant.fix_ranges(qmodel)
    result = export_onnx(qmodel, example, path)
    report = validate_onnx(qmodel, example, path)
    return qmodel, result, report


def brevitas_available() -> bool:
    return importlib.util.find_spec("brevitas") is not None and importlib.util.find_spec("onnxoptimizer") is not None


def brevitas_peer(model: nn.Module, example: torch.Tensor, calibration, path) -> None:
    """Brevitas graph mode (its default 8-bit recipe), calibrated on the same batches, exported as QCDQ."""
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import preprocess_for_quantize, quantize

    qmodel = quantize(preprocess_for_quantize(copy.deepcopy(model).eval()))
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in calibration:
            qmodel(batch)
    qmodel.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # its dynamo export has no quantized biases; the TorchScript one does
        export_onnx_qcdq(qmodel, args=example, export_path=str(path), opset_version=17, dynamo=False,
                         input_names=["input"], output_names=["output"],
                         dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def family_files(family: str, directory: Path, quick: bool, batch: int):
    """Export ``family``'s variants into ``directory``.

    Returns ``(paths, example batch as numpy, {variant: argmax agreement %}, notes)``; a peer that
    fails is left out of ``paths`` and named in ``notes`` with its error.
    """
    from tquant.export import export_onnx

    from .bench_onnx import quantize_static_peer, run_session, session

    model, sample = families.build(family, "small" if quick else "bench")
    torch.manual_seed(1)
    calibration = [sample(batch) for _ in range(2 if quick else CALIBRATION_BATCHES)]
    example = sample(batch)
    tests = sample(64 if quick else AGREEMENT_SAMPLES)
    paths = {name: directory / f"{family}-{i}.onnx" for i, name in enumerate(
        ("float", "quantize_static", "tquant W8A8", "brevitas"))}
    notes: list[str] = []
    export_onnx(model, example, paths["float"])
    quantize_static_peer(paths["float"], paths["quantize_static"], [b.numpy() for b in calibration])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, report = deploy_int8(model, example, calibration, paths["tquant W8A8"])
    notes += [f"{family} tquant: {w.message}" for w in caught if "export_onnx" in str(w.message)]
    if not report.ok():
        notes.append(f"{family} tquant validate_onnx: " + "; ".join(report.failures()))
    if brevitas_available():
        try:
            brevitas_peer(model, example, calibration, paths["brevitas"])
        except Exception as e:  # a peer's failure is a result, not a crash of the benchmark
            notes.append(f"{family} brevitas: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del paths["brevitas"]
    else:
        del paths["brevitas"]
    with torch.no_grad():
        reference = model(tests).argmax(1).numpy()
    agreement = {}
    for name, path in paths.items():
        out = np.concatenate([run_session(session(path), chunk.numpy()) for chunk in tests.split(batch)])
        agreement[name] = 100.0 * float((out.argmax(1) == reference).mean())
    agreement["validates"] = report.ok()
    return paths, example.numpy(), agreement, notes
