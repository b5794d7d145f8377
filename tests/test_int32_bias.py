"""int32 biases at input scale x weight scale (``QuantizationMap.quantize_bias``, issue 11).

The layer fake-quantizes its bias onto the int32 grid that onnxruntime's integer kernels add
(straight-through gradient), the converter links each layer to its input quantizer by the rule of
:mod:`tquant.bias` (a note where it cannot), the export stores int32 codes feeding
``DequantizeLinear``, and eager and onnxruntime then agree with all optimisations on.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

from tquant.export import export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402

import models  # noqa: E402


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
        nn.ReLU(), nn.Linear(6, 3),
    )


def _qmap(on: bool) -> tquant.QuantizationMap:
    qmap = models.make_qmap(per_channel=True, input_quant=("0",))
    qmap.fold_activations = True
    qmap.quantize_bias = on
    return qmap


def _sample(b: int) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8)


def test_linking_rule():
    """Wrapped layer: its input quantizer; a later layer: the previous quantized layer's output
    quantizer across Identity/MaxPool/Flatten; no predecessor: float bias with a note."""
    qmodel = tquant.convert_to_quantized(_model(), _qmap(True))
    conv, fc1, fc2 = qmodel[0].module, qmodel[4], qmodel[6]
    assert conv.bias_input_quantizer() is qmodel[0].input_quantizer.activation_quantizer
    assert fc1.bias_input_quantizer() is conv.activation_quantizer
    assert fc2.bias_input_quantizer() is fc1.activation_quantizer
    alone = tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), models.make_qmap())
    assert alone[0].bias_input_quantizer() is None and alone[0].float_bias_note is None, "off by default"
    qmap = models.make_qmap()
    qmap.quantize_bias = True
    alone = tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), qmap)
    assert alone[0].bias_input_quantizer() is None and "input quantizer is unknown" in alone[0].float_bias_note


def test_bias_is_on_the_int32_grid_with_a_straight_through_gradient():
    qmodel = models.calibrated(_model(), _qmap(True), _sample)
    fc1 = qmodel[4]
    s_b = fc1.bias_input_quantizer().quantizer.scale.detach() * fc1.weight_quantizer.quantizer.scale.detach()
    _, bias = fc1.get_params()
    codes = bias / s_b
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-3)
    assert not torch.equal(bias, fc1.bias.detach()), "the bias moved onto the grid"
    assert (bias - fc1.bias).abs().max() <= s_b.max() / 2 + 1e-7
    qmodel.train()
    fc1.bias.grad = None
    qmodel(_sample(4)).sum().backward()
    assert fc1.bias.grad is not None and fc1.bias.grad.abs().sum() > 0
    off = models.calibrated(_model(), _qmap(False), _sample)
    assert torch.equal(off[4].get_params()[1], off[4].bias), "option off: the float bias, as aihwkit"


@pytest.mark.parametrize("on", [False, True], ids=["float-bias", "int32-bias"])
def test_export_stores_int32_biases_and_agrees_with_onnxruntime(tmp_path, on):
    qmodel = models.calibrated(_model(), _qmap(on), _sample)
    path = tmp_path / "m.onnx"
    result = export_onnx(qmodel, _sample(4), path)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    int32 = [inits[n.input[0]] for n in model.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in inits
             and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert len(int32) == (3 if on else 0)
    assert sum(q.int32_bias for q in result.quantizers) == len(int32)
    if on:
        conv_codes = numpy_helper.to_array(next(i for i in int32 if i.name.startswith("0.")))
        assert conv_codes.shape == (8,)
    report = validate_onnx(qmodel, _sample(8), path, n_random=2)
    assert report.ok(level="disabled"), str(report)
    assert report.max_lsb("all") <= 1.0 + 1e-3, str(report)
    graph = optimized_graph(path)
    assert graph.integer_nodes == {"QGemm": 2, "QLinearConv": 1}, graph.summary()


def test_resnet_with_folded_batch_norm_and_int32_biases_matches_onnxruntime(tmp_path):
    """BN folded, int32 biases: onnxruntime's fused QLinearConv/QGemm give PyTorch's codes."""
    from test_bn_folding import RESNET_PAIRS

    model, qmap, sample = models.cnn_case(per_channel=True)
    qmap.batch_norm_pairs = dict(RESNET_PAIRS)
    qmap.quantize_bias = True
    qmodel = models.calibrated(model, qmap, sample)
    path = tmp_path / "resnet.onnx"
    export_onnx(qmodel, sample(4), path)
    report = validate_onnx(qmodel, sample(8), path, n_random=2)
    assert report.ok(level="disabled"), str(report)
    assert report.ok(min_match=0.99, level="all"), str(report)
    assert optimized_graph(path).integer_nodes.get("QLinearConv") == 6
