"""Batch norm folded into its convolution (``QuantizationMap.fold_batch_norm`` / ``batch_norm_pairs``, issue 11).

The folded layer computes conv → batch norm (eval statistics) exactly when quantization is off,
updates its running statistics in training until ``bn_freeze_step``, passes gradients to the BN's
affine parameters, and exports as one ``DequantizeLinear → Conv → QuantizeLinear``: a hand-built
ResNet-style CNN has every conv fused into a QLinearConv by onnxruntime.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tquant
from tquant.folding import QuantConvBn2d

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant.export import export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402

import models  # noqa: E402

RESNET_PAIRS = {
    "stem": "bn", "layer1.conv1": "layer1.bn1", "layer1.conv2": "layer1.bn2",
    "layer2.conv1": "layer2.bn1", "layer2.conv2": "layer2.bn2",
}


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(8, 3, 6, 6) * 2 + 1)
    return model.eval()


def _qmap(**kw) -> tquant.QuantizationMap:
    qmap = models.make_qmap(per_channel=True, input_quant=("0",))
    for key, value in kw.items():
        setattr(qmap, key, value)
    return qmap


def test_default_map_keeps_batch_norm():
    qmodel = tquant.convert_to_quantized(_seq(), _qmap())
    assert type(qmodel[1]) is nn.BatchNorm2d and type(qmodel[0].module) is tquant.QuantConv2d


def test_folded_layer_computes_conv_then_batch_norm():
    float_model = _seq()
    qmodel = tquant.convert_to_quantized(float_model, _qmap(fold_batch_norm=True, fold_activations=True))
    layer = qmodel[0].module
    assert isinstance(layer, QuantConvBn2d) and isinstance(qmodel[1], nn.Identity)
    assert isinstance(layer.activation_function, nn.ReLU) and isinstance(qmodel[2], nn.Identity)
    tquant.full_precision(qmodel)
    qmodel.eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), float_model(x), rtol=1e-5, atol=1e-5)


def test_running_statistics_update_until_the_freeze_step_and_gradients_reach_bn():
    qmodel = tquant.convert_to_quantized(_seq(), _qmap(fold_batch_norm=True, bn_freeze_step=2))
    layer = qmodel[0].module
    qmodel.train()
    means = [layer.bn.running_mean.clone()]
    for _ in range(3):
        qmodel(torch.randn(8, 3, 6, 6) + 3.0).sum().backward()
        means.append(layer.bn.running_mean.clone())
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])
    assert torch.equal(means[2], means[3]), "frozen after bn_freeze_step=2 training forwards"
    assert int(layer.bn_steps) == 2
    assert layer.bn.weight.grad is not None and layer.bn.bias.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("pairs, match", [
    ({"nope": "1"}, "'nope' is not a converted Conv2d"),
    ({"0": "3"}, "'3' is not a BatchNorm2d"),
])
def test_bad_pairs_name_the_module(pairs, match):
    with pytest.raises(tquant.QuantizationConfigError, match=match):
        tquant.convert_to_quantized(_seq(), _qmap(batch_norm_pairs=pairs))


def test_bn_freeze_step_is_validated():
    with pytest.raises(tquant.QuantizationConfigError, match="bn_freeze_step"):
        tquant.convert_to_quantized(_seq(), _qmap(fold_batch_norm=True, bn_freeze_step=-1))


def test_resnet_with_batch_norm_exports_every_conv_as_qlinearconv(tmp_path):
    """tests/models.py's ResNet-style CNN (6 convs, 5 with BatchNorm): all 6 become QLinearConv."""
    model, qmap, sample = models.cnn_case(per_channel=True)
    qmap.batch_norm_pairs = dict(RESNET_PAIRS)
    qmodel = models.calibrated(model, qmap, sample)
    assert sum(isinstance(m, QuantConvBn2d) for m in qmodel.modules()) == 5
    path = tmp_path / "resnet.onnx"
    result = export_onnx(qmodel, sample(4), path)
    assert "BatchNormalization" not in result.node_counts
    graph = optimized_graph(path)
    assert graph.integer_nodes.get("QLinearConv") == 6, graph.summary()
    assert "Conv" not in [op for op, _ in graph.float_nodes], graph.summary()
    report = validate_onnx(qmodel, sample(8), path, n_random=1)
    assert report.ok(level="disabled"), str(report)
    assert report.max_lsb("all") <= 1.0 + 1e-3, str(report)
