"""A model whose training batches so far held no finite value (empty, all NaN/inf) is not calibrated.

Before issue 18 such a batch counted as calibration: the range became [0, eps], eval returned
about 0 for every input and the export wrote ``scale 1e-08``. Now every quantizer that never saw a
finite value keeps its NaN ("no range yet") state: eval and export raise
``QuantizerNotInitializedError`` naming the layer, and the first real batch calibrates the model
exactly as if the bad batches had never come.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tquant

from helpers import small_qmap

BAD_BATCHES = {"empty": lambda: torch.empty(0, 6), "all-nan": lambda: torch.full((5, 6), math.nan),
               "all-inf": lambda: torch.full((5, 6), math.inf)}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return tquant.convert_to_quantized(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                                       small_qmap(symmetric=False))


@pytest.mark.parametrize("bad", list(BAD_BATCHES), ids=list(BAD_BATCHES))
def test_no_finite_value_seen_is_not_calibration(backend, bad, tmp_path):
    qmodel, twin = mlp(), mlp()
    qmodel(BAD_BATCHES[bad]())  # a training forward (estimate_ranges_train)
    first_act = qmodel[0].activation_quantizer
    assert not first_act.is_initialized and torch.isnan(first_act.quantizer._delta)
    tquant.fix_ranges(qmodel)  # fixes the weights' ranges, leaves the uninitialised ones alone
    qmodel.eval()
    x = torch.randn(4, 6)
    with pytest.raises(tquant.QuantizerNotInitializedError, match=r"layer '0\.activation_quantizer'"):
        qmodel(x)
    pytest.importorskip("onnxscript")
    from tquant.export import export_onnx

    with pytest.raises(tquant.QuantizerNotInitializedError, match=r"layer '0\.activation_quantizer'"):
        export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

    tquant.estimate_ranges_train(qmodel)
    real = torch.randn(16, 6)
    for model in (qmodel.train(), twin):  # the real batch calibrates as if the bad one never came
        model(real)
        model.eval()
    for a, b in zip(qmodel.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(qmodel(x), twin(x))
