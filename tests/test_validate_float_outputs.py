"""``validate_onnx`` on float outputs written by a quantized Linear: judged in LSBs of the layer's input.

A Linear that writes the model's output in float (QGemm's float output) has no output grid. Its error is
judged by its input codes: onnxruntime's codes must agree with PyTorch's (within 1 LSB, >= 50 % equal) and
every output element must be within what its row's flipped input codes move it. The flipped codes are made
here by editing the file (a constant added before the input's ``QuantizeLinear``: a runtime that rounds
differently), and so are the broken exports (a scale, a weight, a bias, a zero point), which must fail.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tquant.export import OutputComparison, ValidationReport, export_onnx, validate_onnx  # noqa: E402
from tquant.export.float_outputs import float_output_producers  # noqa: E402

UNEXPLAINED = "more than its flipped input codes explain"


class TwoLinear(nn.Module):
    """``head(relu(fc1(x)))``: the head writes the model's output in float; its input is fc1's quantized output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The deployment recipe's conversion (graph path, int32 biases), exported. Calibrated on inputs 8x wider
    than the validated ones: the head's input codes are small, so one flipped code moves the logits by
    percents of their largest value (as a random head's small logits in the benchmark transformer)."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    qmap = tquant.QuantizationMap(fold_activations=True, quantize_bias=True)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8)
    tquant.append_default_conversions(qmap)
    qmodel = tquant.convert_to_quantized(TwoLinear(), qmap, example_inputs=(x,))
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        for _ in range(4):
            qmodel(8 * torch.randn(32, 8))
    tquant.fix_ranges(qmodel)
    path = tmp_path_factory.mktemp("float_out") / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(qmodel, x, path)
    return qmodel, x, path


def _head(model: onnx.ModelProto):
    """The head's ``Gemm``, its input ``DequantizeLinear``, the ``QuantizeLinear`` before it and its weight's."""
    producers = {out: node for node in model.graph.node for out in node.output}
    gemm = producers[model.graph.output[0].name]
    data_dq = producers[gemm.input[0]]
    return gemm, data_dq, producers[data_dq.input[0]], producers[gemm.input[1]]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) initializer ``name``."""
    kept = [t for t in model.graph.initializer if t.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, numpy_helper.from_array(value, name)])


def _edited(path, name: str, edit) -> str:
    model = onnx.load(path)
    edit(model)
    out = path.with_name(f"{name}.onnx")
    onnx.save(model, out)
    return out


def _shift_before_head_input(model: onnx.ModelProto, lsbs: float) -> None:
    """Add ``lsbs`` of the head input's scale to features 0-2 before they are quantized: a runtime that
    rounds them differently (codes move by ceil or floor of ``lsbs``)."""
    _, _, q, _ = _head(model)
    scale = float(_init(model, q.input[1]))
    shift = np.zeros((1, 8), np.float32)
    shift[0, :3] = lsbs * scale
    _set_init(model, "shift", shift)
    add = helper.make_node("Add", [q.input[0], "shift"], ["shifted"], name="shift_add")
    q.input[0] = "shifted"
    index = next(i for i, n in enumerate(model.graph.node) if n.name == q.name)
    model.graph.node.insert(index, add)


def test_flipped_input_codes_pass(exported):
    """Codes flipped by one LSB move the float output beyond 1 % of its range: the relative rule would
    reject it; the input codes explain it, so it passes."""
    qmodel, x, path = exported
    flipped = _edited(path, "flipped", lambda m: _shift_before_head_input(m, 0.5))
    report = validate_onnx(qmodel, x, flipped)
    assert report.ok(), report.failures()
    for c in report.comparisons:
        assert c.judged_by_inputs and c.producer.startswith("Gemm '") and c.producer.endswith("(module 'head')")
        assert c.input_max_lsb == pytest.approx(1.0, abs=1e-3) and 0.5 <= c.input_code_share < 1.0, str(report)
        assert c.error_input_lsb > 0.5 and c.unexplained_input_lsb == 0.0, str(report)
        assert c.max_rel > 1e-2, str(report)
    assert not report.ok(by_inputs=False)
    assert "all within what its flipped input codes explain" in str(report)


def test_input_codes_two_lsb_apart_fail(exported):
    qmodel, x, path = exported
    shifted = _edited(path, "two_lsb", lambda m: _shift_before_head_input(m, 1.5))
    report = validate_onnx(qmodel, x, shifted, levels=("disabled",))
    (failure,) = report.failures()
    assert "a code of the input of its Gemm" in failure and "is 2.00 LSB from PyTorch's (max_lsb=1.0)" in failure


def _double_weight_scale(m):
    name = _head(m)[3].input[1]
    _set_init(m, name, _init(m, name) * 2)


def _transpose_weight(m):
    name = _head(m)[3].input[0]
    _set_init(m, name, np.ascontiguousarray(_init(m, name).T))


def _negate_weight(m):
    name = _head(m)[3].input[0]
    _set_init(m, name, (-_init(m, name).astype(np.int16)).clip(-127, 127).astype(np.int8))


def _drop_bias(m):
    gemm = _head(m)[0]
    del gemm.input[2]


def _shift_input_zero_point(m):
    dq = _head(m)[1]
    _set_init(m, "wrong_zero_point", (_init(m, dq.input[2]).astype(np.int16) + 1).astype(_init(m, dq.input[2]).dtype))
    dq.input[2] = "wrong_zero_point"


def _double_input_scale(m):
    dq = _head(m)[1]
    _set_init(m, "wrong_scale", _init(m, dq.input[1]) * 2)
    dq.input[1] = "wrong_scale"


WEIGHT_BUGS = [_double_weight_scale, _transpose_weight, _negate_weight, _drop_bias]


@pytest.mark.parametrize("edit", WEIGHT_BUGS, ids=["weight-scale-x2", "weight-transposed", "weight-negated",
                                                   "bias-dropped"])
def test_broken_layer_fails(exported, edit):
    """A bug in the layer moves the float output by more than its (unchanged) input codes can."""
    qmodel, x, path = exported
    report = validate_onnx(qmodel, x, _edited(path, edit.__name__, edit), levels=("disabled",))
    (c,) = report.comparisons
    assert c.judged_by_inputs and c.input_code_share == 1.0 and c.unexplained_input_lsb > 1.0, str(report)
    assert any(f.startswith("output 'output' at level 'disabled': error") and UNEXPLAINED in f
               for f in report.failures()), report.failures()


@pytest.mark.parametrize("edit, missed", [
    (_shift_input_zero_point, "0.0% of the codes of the input of its Gemm"),  # every input one LSB off
    (_double_input_scale, "a code of the input of its Gemm"),  # the layer's input far off PyTorch's
], ids=["input-zero-point+1", "input-scale-x2"])
def test_broken_layer_input_fails(exported, edit, missed):
    """A bug in how the layer's input is decoded shows in its input codes, read through the file's decoder."""
    qmodel, x, path = exported
    report = validate_onnx(qmodel, x, _edited(path, edit.__name__, edit), levels=("disabled",))
    (c,) = report.comparisons
    assert c.judged_by_inputs, str(report)
    (failure,) = report.failures()
    assert failure.startswith("output 'output' at level 'disabled': ") and missed in failure, failure


def _comparison(**kw) -> OutputComparison:
    fields = dict(level="all", output="logits", numel=10, match_share=0.8, code_share=None, max_lsb=None,
                  max_abs=0.05, lsb=None, max_rel=0.02, producer="Gemm 'g' (module 'head')",
                  input_code_share=0.98, input_max_lsb=1.0, error_input_lsb=3.0, unexplained_input_lsb=0.0)
    return OutputComparison(**{**fields, **kw})


def test_float_output_verdict_by_input_codes():
    explained = ValidationReport("m.onnx", 1, [_comparison()])
    assert explained.ok() and not explained.ok(by_inputs=False)
    assert explained.failures(by_inputs=False) == [
        "output 'logits' at level 'all': relative error 0.02 (max_rel_error=0.01)"
    ]
    beyond = ValidationReport("m.onnx", 1, [_comparison(unexplained_input_lsb=40.0, error_input_lsb=43.0)])
    assert beyond.failures() == [
        "output 'logits' at level 'all': error 43 input LSBs of its Gemm 'g' (module 'head'), 40 more than its "
        "flipped input codes explain (relative error 0.02)"
    ]
    disagree = ValidationReport("m.onnx", 1, [_comparison(input_code_share=0.3)])
    assert disagree.failures() == [
        "output 'logits' at level 'all': 30.0% of the codes of the input of its Gemm 'g' (module 'head') agree "
        "(min_code_agreement=0.5)"
    ]
    assert disagree.ok(min_code_agreement=0.2)
    unread = _comparison(input_code_share=None, input_max_lsb=None, error_input_lsb=None, unexplained_input_lsb=None,
                         producer_note="module 'head' ran 2 times in 1 forward passes")
    assert not unread.judged_by_inputs
    assert ValidationReport("m.onnx", 1, [unread]).failures() == [
        "output 'logits' at level 'all': relative error 0.02 (max_rel_error=0.01); not judged by its Gemm 'g' "
        "(module 'head')'s input codes: module 'head' ran 2 times in 1 forward passes"
    ]


def _graph(nodes, inits, out_shape=(2, 3)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_producers_found_on_hand_built_graphs():
    """A Gemm/MatMul with a per-tensor integer input and a constant weight writes a float output; an
    activation times an activation, or a float input, does not."""
    w = np.arange(12, dtype=np.int8).reshape(3, 4) - 6
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "s"),
        helper.make_tensor("z", TensorProto.UINT8, [], [128]),
        numpy_helper.from_array(w, "wq"),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
        numpy_helper.from_array(np.ones(3, np.float32), "b"),
    ]
    quantize = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    weight = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0, name="dq_w")
    gemm = _graph([*quantize, weight, helper.make_node("Gemm", ["xd", "wd"], ["g"], transB=1, alpha=-2.0, name="gemm"),
                   helper.make_node("Add", ["g", "b"], ["y"])], inits)
    (p,) = float_output_producers(gemm).values()
    assert (p.op_type, p.node, p.codes, p.scale, p.zero_point) == ("Gemm", "gemm", "xq", 0.5, 128)
    expected = np.abs(w.astype(np.float64) * np.array([[0.1], [0.2], [0.3]], np.float32)).T * 2.0
    np.testing.assert_allclose(p.weight, expected, rtol=1e-6)
    assert p.layer is None  # the weight's scale is not named after a tquant weight quantizer

    float_input = _graph([weight, helper.make_node("Gemm", ["x", "wd"], ["y"], transB=1)], inits)
    assert float_output_producers(float_input) == {}
    two_activations = _graph([*quantize, helper.make_node("MatMul", ["xd", "xd"], ["y"])], inits, (2, 4))
    assert float_output_producers(two_activations) == {}
