"""Quantized attention: functional ops with output quantizers and ``QuantTransformerEncoderLayer`` (issue 11).

With quantization off the converted layer computes ``nn.TransformerEncoderLayer`` (post- and
pre-norm, batch first or not, ReLU or GELU, masks); exported, onnxruntime runs its projections,
attention matmuls, softmax and residual adds as integer kernels (only LayerNorm stays float).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tquant
from tquant.attention import QuantAdd, QuantMatMul, QuantSoftmax, QuantTransformerEncoderLayer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant.export import export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402

D, HEADS, SEQ = 32, 4, 8


@pytest.fixture(autouse=True)
def no_fast_path():
    """nn.TransformerEncoderLayer's fused eval path (the float reference) differs in rounding only; keep
    the module path so the comparison is tight."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def _qmap(input_quant: bool = True) -> tquant.QuantizationMap:
    qmap = tquant.QuantizationMap(quantize_bias=True)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, symmetric=True, per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8)
    if input_quant:
        qmap.input_activation_qconfig_map[""] = tquant.ActivationQuantConfig(8)
    qmap.module_qconfig_map[nn.TransformerEncoderLayer] = tquant.QuantizedModuleConfig(
        QuantTransformerEncoderLayer, copy.deepcopy(qmap.default_qconfig)
    )
    tquant.append_default_conversions(qmap)
    return qmap


def _encoder(layers: int = 1, **kw) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, **kw)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    with torch.no_grad():  # non-zero projection biases (nn.MultiheadAttention starts them at 0)
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_(0, 0.1)
                m.out_proj.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kw", [
    dict(batch_first=True),
    dict(batch_first=False, norm_first=True),
    dict(batch_first=True, activation="gelu"),
], ids=["post-norm", "pre-norm-seq-first", "gelu"])
def test_full_precision_computes_the_original_layer(kw):
    model = _encoder(2, **kw)
    qmodel = tquant.convert_to_quantized(model, _qmap())
    assert sum(isinstance(m, QuantTransformerEncoderLayer) for m in qmodel.modules()) == 2
    tquant.full_precision(qmodel)
    qmodel.eval()
    x = torch.randn(3, SEQ, D) if kw.get("batch_first") else torch.randn(SEQ, 3, D)
    padding = torch.zeros(3, SEQ, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            qmodel(x, src_key_padding_mask=padding), model(x, src_key_padding_mask=padding), rtol=1e-5, atol=1e-5
        )
        causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
        torch.testing.assert_close(qmodel(x, mask=causal, is_causal=True), model(x, mask=causal, is_causal=True),
                                   rtol=1e-5, atol=1e-5)


def test_functional_ops_quantize_their_result():
    ops = [QuantMatMul(n_bits_act=8), QuantAdd(n_bits_act=8), QuantSoftmax(-1, n_bits_act=8)]
    a, b = torch.randn(4, 5), torch.randn(5, 5)
    for op in ops:
        op.quantized_acts()
        tquant.estimate_ranges(op)
        op.eval()
    with torch.no_grad():
        outs = [ops[0](a, b), ops[1](a, a), ops[2](a)]
    for op, out in zip(ops, outs):
        scale = op.activation_quantizer.export_qparams()["scale"]
        codes = out / scale
        torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-3)


def test_rejects_what_it_cannot_rebuild():
    with pytest.raises(TypeError, match="must be an nn.TransformerEncoderLayer"):
        QuantTransformerEncoderLayer(nn.Linear(2, 2))
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, activation=torch.tanh)
    with pytest.raises(ValueError, match="only relu and gelu"):
        QuantTransformerEncoderLayer(layer)


def test_export_runs_attention_as_integer_kernels(tmp_path):
    model = _encoder(1, batch_first=True)
    qmodel = tquant.convert_to_quantized(model, _qmap())
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        for _ in range(3):
            qmodel(torch.randn(8, SEQ, D))
    tquant.fix_ranges(qmodel)
    path = tmp_path / "encoder.onnx"
    x = torch.randn(4, SEQ, D)
    export_onnx(qmodel, x, path)
    graph = optimized_graph(path)
    assert graph.integer_nodes == {"QGemm": 6, "QLinearAdd": 2, "QLinearMatMul": 2, "QLinearSoftmax": 1}, \
        graph.summary()
    assert {op for op, _ in graph.float_nodes} == {"LayerNormalization"}, graph.summary()
    report = validate_onnx(qmodel, x, path, n_random=1)
    # float LayerNorm and softmax round differently in each runtime; a code flipped before a
    # matmul moves a few outputs by one more LSB
    assert report.min_match_share("disabled") >= 0.99, str(report)
    assert report.max_lsb("disabled") <= 2.0 + 1e-3, str(report)
    assert report.max_lsb("all") <= 4.0 + 1e-3, str(report)
