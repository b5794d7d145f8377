"""Activation folding (``QuantizationMap.fold_activations``) and one quantization per tensor in ONNX (issue 11).

Conversion: which activations are folded, what is left alone (default map: aihwkit's structure;
GELU; excluded names). Export: the folded model agrees with onnxruntime (optimisations off and on),
an unfoldable activation is a note in the export report, ``DequantizeLinear → QuantizeLinear``
pairs with equal constants are collapsed, and the number of Q/DQ nodes onnxruntime leaves after
optimisation for the demo CNN and a transformer block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx_ir as ir  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tquant import demo  # noqa: E402
from tquant.export import export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402
from tquant.export.qdq_passes import collapse_dq_q  # noqa: E402

import models  # noqa: E402


def _seq_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Hardtanh(-1.0, 2.0), nn.Linear(16, 4),
    )


def _qmap(fold: bool, **kw) -> tquant.QuantizationMap:
    qmap = models.make_qmap(per_channel=True, input_quant=("0",), **kw)
    qmap.fold_activations = fold
    return qmap


def _sample(b: int) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8)


# -- conversion ----------------------------------------------------------------------------------
def test_default_map_does_not_fold():
    """aihwkit's behaviour: the activations stay in the Sequential, the layers have none."""
    qmodel = tquant.convert_to_quantized(_seq_model(), _qmap(False))
    assert isinstance(qmodel[1], nn.ReLU) and isinstance(qmodel[3], nn.ReLU6) and isinstance(qmodel[7], nn.Hardtanh)
    assert all(
        m.activation_function is None for m in qmodel.modules() if isinstance(m, tquant.QuantizationHijacker)
    )


def test_fold_moves_activation_into_layer_before_its_output_quantizer():
    float_model = _seq_model()
    qmodel = tquant.convert_to_quantized(float_model, _qmap(True))
    assert [type(qmodel[i]) for i in (1, 3, 7)] == [nn.Identity] * 3
    assert isinstance(qmodel[0].module.activation_function, nn.ReLU)
    assert isinstance(qmodel[2].activation_function, nn.ReLU6)
    assert isinstance(qmodel[6].activation_function, nn.Hardtanh)
    assert qmodel[6].activation_function.max_val == 2.0
    assert qmodel[8].activation_function is None
    assert isinstance(float_model[1], nn.ReLU), "the float model is not changed"
    # the output quantizer now sees the activation's output: every code of conv 0 is >= 0 (unsigned grid)
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        qmodel(_sample(8))
    tquant.fix_ranges(qmodel)
    assert qmodel[0].module.activation_quantizer.export_qparams()["qmin"] == 0
    # with quantization switched off, the folded model computes the float model
    tquant.full_precision(qmodel)
    x = _sample(4)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), float_model.eval()(x))


def test_gelu_and_excluded_activations_are_not_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    qmap = _qmap(True)
    qmap.excluded_modules.append("3")
    qmodel = tquant.convert_to_quantized(model, qmap)
    assert isinstance(qmodel[1], nn.GELU) and isinstance(qmodel[3], nn.ReLU)
    assert "GELU ('1')" in qmodel[0].module.unfolded_activation
    assert qmodel[2].unfolded_activation is None


def test_fold_activations_must_be_a_bool():
    qmap = _qmap(True)
    qmap.fold_activations = "yes"
    with pytest.raises(tquant.QuantizationConfigError, match="QuantizationMap.fold_activations"):
        tquant.convert_to_quantized(_seq_model(), qmap)


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True], ids=["fold-off", "fold-on"])
def test_folded_model_agrees_with_onnxruntime(tmp_path, fold):
    """Eager and onnxruntime agree (optimisations off and on) with folding on and off."""
    qmodel = models.calibrated(_seq_model(), _qmap(fold), _sample)
    path = tmp_path / "m.onnx"
    result = export_onnx(qmodel, _sample(4), path)
    report = validate_onnx(qmodel, _sample(8), path, n_random=2)
    assert report.ok(level="disabled"), str(report)
    # fused kernels requantize in integers: within 1 LSB when folded; unfolded, onnxruntime merges
    # the double quantization (DQ -> Relu -> Q -> DQ -> Q) approximately: one more LSB
    assert report.max_lsb("all") <= (1.0 if fold else 2.0) + 1e-3, str(report)
    assert result.notes == []
    relus = result.node_counts.get("Relu", 0) + result.node_counts.get("Clip", 0)
    assert relus >= 3
    graph = optimized_graph(path)
    if fold:
        # one quantization per tensor: only the input Q and the output DQ are left
        assert (graph.quantize, graph.dequantize) == (1, 1), graph.summary()
        assert graph.integer_nodes == {"QGemm": 2, "QLinearConv": 2}, graph.summary()
    else:
        assert graph.quantize > 1, graph.summary()


def test_unfolded_gelu_is_a_note_in_the_export_report(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    qmodel = models.calibrated(model, _qmap(True), lambda b: torch.randn(b, 8))
    result = export_onnx(qmodel, torch.randn(4, 8), tmp_path / "gelu.onnx")
    assert len(result.notes) == 1
    assert "layer '0.module'" in result.notes[0] and "GELU" in result.notes[0]
    assert "note: layer '0.module'" in str(result)
    assert validate_onnx(qmodel, torch.randn(8, 8), tmp_path / "gelu.onnx", n_random=1).ok(min_match=0.99)


def _qdq_chain_model(second_scale: float) -> onnx.ModelProto:
    """x → Q(s) → DQ(s) → Q(s2) → DQ(s2) → Relu: the middle DQ → Q pair collapses iff s2 == s."""
    s, s2 = np.array(0.05, np.float32), np.array(second_scale, np.float32)
    zp = np.array(128, np.uint8)
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [float(s)]),
        helper.make_tensor("s_copy", TensorProto.FLOAT, [], [float(s2)]),
        helper.make_tensor("zp", TensorProto.UINT8, [], [int(zp)]),
        helper.make_tensor("zp_copy", TensorProto.UINT8, [], [int(zp)]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "s", "zp"], ["d1"]),
        helper.make_node("QuantizeLinear", ["d1", "s_copy", "zp_copy"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s_copy", "zp_copy"], ["d2"]),
        helper.make_node("Relu", ["d2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits,
    )
    # IR version 10 (opset 21's): the newest onnx writes a newer one that older onnxruntimes refuse
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("second_scale, removed", [(0.05, 1), (0.1, 0)], ids=["equal", "different"])
def test_collapse_dq_q(second_scale, removed):
    proto = _qdq_chain_model(second_scale)
    model = ir.from_proto(proto)
    assert collapse_dq_q(model) == removed
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 2 - removed and ops.count("DequantizeLinear") == 2 - removed
    x = {"x": np.array([-1.0, 0.03, 0.5, 3.0], np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(run(out), run(proto))


# -- what onnxruntime leaves after optimisation ---------------------------------------------------------
def test_demo_cnn_is_fully_integer_after_onnxruntime_optimisation(tmp_path):
    """The demo's map (folded ReLUs, one input quantizer, int32 biases, float logits): onnxruntime
    leaves 1 QuantizeLinear (the image) and no DequantizeLinear (the last QGemm outputs float);
    without folding and int32 biases, a Q/DQ pair at every layer boundary."""
    counts = {}
    for fold in (True, False):
        torch.manual_seed(0)
        qmap = demo.quantization_map(8, fold_activations=fold)
        qmodel = models.calibrated(demo.DigitsCNN(), qmap, lambda b: torch.rand(b, 1, 8, 8))
        path = tmp_path / f"digits-{fold}.onnx"
        export_onnx(qmodel, torch.rand(4, 1, 8, 8), path)
        counts[fold] = graph = optimized_graph(path)
        if fold:
            assert (graph.quantize, graph.dequantize) == (1, 0), graph.summary()
            assert graph.integer_nodes == {"QGemm": 2, "QLinearConv": 3}, graph.summary()
            assert graph.float_nodes == [], graph.summary()
    assert (counts[False].quantize, counts[False].dequantize) == (5, 6), counts[False].summary()


TRANSFORMER_QDQ = (5, 10)
"""(QuantizeLinear, DequantizeLinear) nodes onnxruntime 1.32 leaves in the transformer block."""


def test_transformer_block_qdq_left_after_onnxruntime_optimisation(tmp_path):
    """tests/models.py's transformer block (8-bit, per-channel): onnxruntime leaves these counts today.

    Every linear, also on 3-D inputs, is a QGemm (export runs it as Reshape → Gemm → Reshape);
    attention's matmuls, softmax and the residual adds stay float (functional ops, not reached by
    the QuantizationMap), so Q/DQ remain around them."""
    model, qmap, sample = models.transformer_case(per_channel=True)
    qmodel = models.calibrated(model, qmap, sample)
    path = tmp_path / "block.onnx"
    export_onnx(qmodel, sample(4), path)
    graph = optimized_graph(path)
    print(graph.summary())
    assert (graph.quantize, graph.dequantize) == TRANSFORMER_QDQ, graph.summary()
    assert graph.integer_nodes.get("QGemm", 0) == 7, "every linear (3-D inputs included) is a QGemm"

