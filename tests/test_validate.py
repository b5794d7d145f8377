"""``validate_onnx``'s report says what it measured (issue 12): codes and LSBs for quantized outputs,
relative error for float ones, the float ops between quantizers, thresholds with documented defaults."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tquant.export import OutputComparison, ValidationReport, export_onnx, validate_onnx  # noqa: E402
from tquant.export.validate import (  # noqa: E402
    DEFAULT_MAX_LSB,
    DEFAULT_MAX_REL_ERROR,
    DEFAULT_MIN_CODE_AGREEMENT,
    float_ops_between_quantizers,
)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_model(seed: int):
    """The README's API-tour model, trained one step, ranges fixed, in eval mode (its first python block)."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    block = block.replace('torch.save(qmodel.state_dict(), "qmodel.pt")', "")
    torch.manual_seed(seed)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace["qmodel"], namespace["x"]


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def readme_export(request, tmp_path_factory):
    qmodel, x = readme_model(request.param)
    path = tmp_path_factory.mktemp("readme") / "qmodel.onnx"
    export_onnx(qmodel, x, path)
    return qmodel, x, path


def test_readme_model_passes_with_optimisations_disabled(readme_export):
    qmodel, x, path = readme_export
    report = validate_onnx(qmodel, x, path, levels=("disabled",))
    (c,) = report.comparisons
    assert c.quantized and c.code_share == 1.0 and c.max_lsb == 0.0, str(report)
    assert report.float_ops == {} and "float ops between quantizers: none" in str(report)
    assert report.ok(), report.failures()


def test_readme_model_passes_with_all_optimisations(readme_export):
    """onnxruntime's QLinearConv moves some codes by one LSB: ok() accepts exactly that."""
    qmodel, x, path = readme_export
    report = validate_onnx(qmodel, x, path, levels=("all",))
    (c,) = report.comparisons
    assert c.quantized and c.max_lsb <= 1.0 + 1e-3 and c.code_share >= 0.9, str(report)
    assert report.fused.get("QLinearConv") == 1
    assert report.ok(), report.failures()
    assert report.ok(level="all") and report.failures() == []


class FloatAttention(nn.Module):
    """Two quantized linears with a float ``softmax(h h^T) h`` between them (like an attention left float)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin1(x)
        return self.lin2(torch.softmax(h @ h.transpose(-1, -2), -1) @ h)


def test_report_names_the_float_ops_between_quantizers(tmp_path):
    torch.manual_seed(0)
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    qmap.input_activation_qconfig_map["lin1"] = tquant.ActivationQuantConfig(8)
    qmodel = tquant.convert_to_quantized(FloatAttention(), qmap)
    x = torch.randn(4, 6, 8)
    qmodel(x)
    qmodel.eval()
    path = tmp_path / "attn.onnx"
    export_onnx(qmodel, x, path)
    report = validate_onnx(qmodel, x, path, levels=("disabled",))
    # h @ h^T, softmax, (.) @ h, and lin2 (its input is float, so it is not a quantized layer; a 3-D
    # Linear exports as Reshape -> Gemm -> Reshape)
    assert report.float_ops == {"MatMul": 2, "Softmax": 1, "Gemm": 1}
    assert report.comparisons[0].float_ops == report.float_ops
    assert "float ops between quantizers: MatMul 2, Gemm 1, Softmax 1 (" in str(report)
    assert report.ok()


def _dq(name: str, out: str) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [name, "s", "z"], [out])


def test_float_ops_between_quantizers_on_a_hand_built_graph():
    """A MatMul with dequantized weights is a quantized layer; one with a float weight is not."""
    init = [
        numpy_helper.from_array(torch.tensor(0.1).numpy(), "s"),
        helper.make_tensor("z", TensorProto.UINT8, [], [128]),
        helper.make_tensor("wq", TensorProto.UINT8, [4, 4], [128] * 16),
        numpy_helper.from_array(torch.ones(4, 4).numpy(), "wf"),
        numpy_helper.from_array(torch.zeros(4).numpy(), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        _dq("xq", "xd"),
        _dq("wq", "wd"),
        helper.make_node("MatMul", ["xd", "wd"], ["m1"], name="quantized_matmul"),
        helper.make_node("Add", ["m1", "b"], ["a1"], name="bias"),
        helper.make_node("QuantizeLinear", ["a1", "s", "z"], ["q1"]),
        _dq("q1", "d1"),
        helper.make_node("MatMul", ["d1", "wf"], ["m2"], name="float_weight_matmul"),
        helper.make_node("Softmax", ["m2"], ["sm"], name="softmax"),
        helper.make_node("QuantizeLinear", ["sm", "s", "z"], ["q2"]),
        _dq("q2", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert [n.name for n in float_ops_between_quantizers(model)] == ["float_weight_matmul", "softmax"]


def _report(*comparisons: OutputComparison) -> ValidationReport:
    return ValidationReport("m.onnx", 1, list(comparisons))


def _quantized(code_share: float, max_lsb: float, level: str = "all") -> OutputComparison:
    return OutputComparison(level, "y", 100, code_share, code_share, max_lsb, max_lsb * 0.1, 0.1)


def test_ok_thresholds_have_documented_defaults():
    assert (DEFAULT_MAX_LSB, DEFAULT_MIN_CODE_AGREEMENT, DEFAULT_MAX_REL_ERROR) == (1.0, 0.5, 1e-2)
    assert _report(_quantized(0.89, 1.0)).ok()  # onnxruntime's 1-LSB rounding on 11% of the codes
    two_lsb = _report(_quantized(0.99, 2.0))
    assert not two_lsb.ok() and two_lsb.ok(max_lsb=2.0)
    assert two_lsb.failures() == ["output 'y' at level 'all': a code is 2.00 LSB from PyTorch's (max_lsb=1.0)"]
    shifted = _report(_quantized(0.0, 1.0))  # a systematic off-by-one: every code moved
    assert shifted.failures() == [
        "output 'y' at level 'all': 0.0% of the codes agree (min_code_agreement=0.5)"
    ]
    assert shifted.ok(min_code_agreement=0.0)


def test_float_outputs_are_judged_by_relative_error():
    close = OutputComparison("all", "logits", 10, 0.8, None, None, 0.05, None, max_rel=0.004)
    far = OutputComparison("disabled", "logits", 10, 0.8, None, None, 0.5, None, max_rel=0.04, float_ops={"MatMul": 2})
    assert _report(close).ok() and not _report(close).ok(max_rel_error=1e-3)
    assert _report(far).failures() == [
        "output 'logits' at level 'disabled': relative error 0.04 (max_rel_error=0.01); "
        "float ops between quantizers before it: MatMul 2"
    ]
    assert _report(close, far).ok(level="all") and not _report(close, far).ok()
    assert not _report(close).ok(min_match=0.9)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_transformer_encoder_with_float_attention(w_bits, tmp_path):
    """The issue's case: 2 encoder layers, attention left float. The float ops are named, and onnxruntime
    agrees within 1 LSB (the PyTorch side runs its quantizers: no fused eval path, see the converter)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(w_bits, per_channel=True)
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    qmap.input_activation_qconfig_map[""] = tquant.ActivationQuantConfig(8, symmetric=False)
    with pytest.warns(tquant.ConversionWarning, match="left float: 2 MultiheadAttention"):
        qmodel = tquant.convert_to_quantized(model, qmap)
    x = torch.randn(4, 10, 32)
    for _ in range(3):
        qmodel(x)
    tquant.fix_ranges(qmodel)
    qmodel.eval()
    path = tmp_path / "encoder.onnx"
    export_onnx(qmodel, x, path)
    report = validate_onnx(qmodel, x, path)
    assert report.float_ops.get("Softmax") == 2 and report.float_ops.get("MatMul", 0) >= 4, str(report)
    for c in report.comparisons:
        assert c.quantized and c.max_lsb <= 1.0 + 1e-3 and c.code_share >= 0.99, str(report)
    assert report.ok(), report.failures()
