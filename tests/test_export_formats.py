"""Export of group-wise and FP8 quantizers (issue 20), checked in onnxruntime.

Group-wise weights are stored as packed 4-bit (or 8-bit) integers with a blocked ``DequantizeLinear``
(``block_size``, opset 21); in front of a Linear's ``MatMul`` onnxruntime's QDQ optimiser fuses them into
``MatMulNBits`` (checked in the optimised graph it saves). FP8 quantizers export as ``QuantizeLinear`` /
``DequantizeLinear`` to float8 (opset 19 and 21) and onnxruntime reproduces PyTorch bit for bit. Every stored
weight decodes to PyTorch's quantized weight exactly (``validate_onnx``'s weight check).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant.export import MATMULNBITS_ACCURACY, ExportError, export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402

FP32 = {MATMULNBITS_ACCURACY: "1"}


class TwoLinears(nn.Module):
    """A Linear with a bias followed by a ReLU (2-D input), then one without a bias."""

    def __init__(self, k=300):
        super().__init__()
        self.fc1 = nn.Linear(k, 64)
        self.fc2 = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def convert(model, weight_quant, act_quant=None, calib=()):
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = weight_quant
    qmap.default_qconfig.activation_quant = act_quant or tquant.ActivationQuantConfig(0)
    tquant.append_default_conversions(qmap)
    qmodel = tquant.convert_to_quantized(model, qmap, strict=True)
    for x in calib:
        qmodel(*x)
    return qmodel.eval()


def stored_types(path) -> dict[str, str]:
    m = onnx.load(path)
    types = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in m.graph.initializer}
    return {n.input[1]: types.get(n.input[0], "") for n in m.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in types}


@pytest.mark.parametrize("bits,symmetric,stored", [
    pytest.param(4, True, "INT4", id="int4-sym"),
    pytest.param(4, False, "UINT4", id="uint4-asym"),
    pytest.param(8, True, "INT8", id="int8-sym"),
])
def test_group_linears_run_as_matmulnbits(tmp_path, bits, symmetric, stored):
    torch.manual_seed(0)
    x = torch.randn(6, 300)
    qmodel = convert(TwoLinears(), tquant.WeightQuantConfig(bits, symmetric, group_size=32), calib=[(x,)])
    path = tmp_path / "g.onnx"
    result = export_onnx(qmodel, x, path)
    assert {q.storage_bits for q in result.quantizers if q.kind == "weight"} == {bits}
    assert set(stored_types(path).values()) == {stored}
    blocked = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
    assert all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in blocked)
    graph = optimized_graph(path)
    assert graph.node_counts.get("MatMulNBits") == 2, graph.node_counts  # both Linears, bias and ReLU included
    assert graph.dequantize == 0 and "Gemm" not in graph.node_counts and "MatMul" not in graph.node_counts
    exact = validate_onnx(qmodel, x, path, session_config=FP32)
    assert exact.ok(max_rel_error=1e-5), exact.failures()
    assert [w.name for w in exact.weights] == ["fc1.weight_quantizer", "fc2.weight_quantizer"]
    assert exact.fused == {"MatMulNBits": 2}
    default = validate_onnx(qmodel, x, path)  # onnxruntime's default: int8 activations inside MatMulNBits
    assert default.ok(), default.failures()


def test_group_weights_are_a_fraction_of_the_float_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.SiLU(), nn.Linear(512, 256, bias=False))
    x = torch.randn(2, 7, 512)  # a language model's [batch, tokens, features]
    qmodel = convert(model, tquant.WeightQuantConfig(4, True, group_size=128), calib=[(x,)])
    float_path, path = tmp_path / "float.onnx", tmp_path / "w4.onnx"
    torch.onnx.export(model.eval(), (x,), float_path, dynamo=True, external_data=False)
    export_onnx(qmodel, x, path)
    ratio = path.stat().st_size / float_path.stat().st_size
    assert ratio < 0.15, ratio  # 4-bit codes plus one fp32 scale per 128 weights: ~13 %
    graph = optimized_graph(path)
    assert graph.node_counts.get("MatMulNBits") == 2, graph.node_counts
    report = validate_onnx(qmodel, x, path, session_config=FP32)
    assert report.ok(max_rel_error=1e-5), report.failures()


def test_group_sizes_that_onnxruntime_cannot_fuse_still_export(tmp_path):
    """A divisor that is not a power of two (24 of 48 features) and a conv (groups of whole input channels with
    their kernels): a blocked DequantizeLinear runs unfused, with the same values."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 16)
            self.conv = nn.Conv2d(4, 8, 3)

        def forward(self, x, img):
            return self.fc(x), self.conv(img)

    torch.manual_seed(0)
    inputs = (torch.randn(3, 48), torch.randn(3, 4, 6, 6))
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(4, False, group_size=24)
    tquant.append_default_conversions(qmap)
    qmap.module_qconfig_map[nn.Conv2d].module_qconfig.weight_quant = tquant.WeightQuantConfig(4, group_size=2)
    qmodel = tquant.convert_to_quantized(Net(), qmap)
    qmodel(*inputs)
    qmodel.eval()
    path = tmp_path / "g.onnx"
    export_onnx(qmodel, inputs, path)
    blocks = sorted({a.i for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
                     if a.name == "block_size"})
    assert blocks == [18, 24]  # 2 input channels x 3x3 kernel; 24 features
    report = validate_onnx(qmodel, inputs, path)
    assert report.ok(max_rel_error=1e-5), report.failures()
    assert all(w.equal_share == 1.0 for w in report.weights) and len(report.weights) == 2
    with pytest.raises(ExportError, match="group-wise; blocked DequantizeLinear needs opset >= 21, got opset 20"):
        export_onnx(qmodel, inputs, tmp_path / "old.onnx", opset=20)
    assert not (tmp_path / "old.onnx").exists()


@pytest.mark.parametrize("opset", [19, 21])
def test_fp8_exports_and_matches_pytorch_bit_for_bit(tmp_path, opset):
    """E4M3 weights per channel, E5M2 weights per tensor, FP8 activations; ties, saturation and NaN-free random
    data: onnxruntime's outputs equal PyTorch's exactly, optimisations off and on."""
    torch.manual_seed(0)
    model = TwoLinears(k=40)
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, True, True, fmt="fp8_e4m3")
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8, fmt="fp8_e4m3")
    tquant.append_default_conversions(qmap)
    qmap.instance_qconfig_map["fc2"] = tquant.QuantizedModuleConfig(tquant.QuantLinear, tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(8, fmt="fp8_e5m2"), tquant.WeightQuantConfig(8, fmt="fp8_e5m2")))
    qmodel = tquant.convert_to_quantized(model, qmap)
    x = torch.randn(16, 40)
    qmodel(x)
    qmodel.eval()
    x = torch.cat([x, x * 1000])  # beyond the calibrated range: saturates to +-max
    path = tmp_path / "f8.onnx"
    export_onnx(qmodel, x, path, opset=opset)
    assert set(stored_types(path).values()) == {"FLOAT8E4M3FN", "FLOAT8E5M2"}
    report = validate_onnx(qmodel, x, path)
    assert report.ok(), report.failures()
    for c in report.comparisons:
        assert c.max_abs == 0.0, (c.level, c.output, c.max_abs)
    assert len(report.weights) == 2 and all(w.equal_share == 1.0 for w in report.weights)
    if opset == 19:
        with pytest.raises(ExportError, match="float8 QuantizeLinear/DequantizeLinear need opset >= 19, got opset 18"):
            export_onnx(qmodel, x, tmp_path / "old.onnx", opset=18)
