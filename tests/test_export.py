"""ONNX export (issue 4): QDQ graphs with integer weights, validated in onnxruntime.

Model-level cases (``tests/models.py``: a ResNet-style CNN, a transformer block, an MLP) are
exported once per quantization config (module-scoped fixture) and checked for: the ONNX checker
with ``full_check``, agreement with PyTorch (optimisations off: >= 99.9% equal to float precision,
the rest within 1 LSB; full optimisations: within 1 LSB, and onnxruntime fuses the QDQ patterns
into integer kernels), the file size against the float export, integer weight initializers,
per-channel ``axis``, the dynamic batch. Then the export ops' numerics, errors, atomic writes,
the restored model, storage options and ``tquant inspect``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tquant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

from tquant.export import (  # noqa: E402
    ExportError,
    export_onnx,
    inspect_cmd,  # noqa: E402
    validate_onnx,
)
from tquant.export.onnx_export import strip_debug_info  # noqa: E402
from tquant.kernels import qdq  # noqa: E402
from tquant.kernels import reference as ref  # noqa: E402

import models  # noqa: E402

CONFIGS = {
    "sym8-tensor": dict(w_bits=8, symmetric=True, per_channel=False),
    "asym8-channel": dict(w_bits=8, symmetric=False, per_channel=True),
    "sym8-channel": dict(w_bits=8, symmetric=True, per_channel=True),
    "asym8-tensor": dict(w_bits=8, symmetric=False, per_channel=False),
    "w4-sym-channel": dict(w_bits=4, symmetric=True, per_channel=True),
    "w4-asym-tensor": dict(w_bits=4, symmetric=False, per_channel=False),
}
# The MLP is cheap: every config. CNN and transformer: sym/asym x per-tensor/per-channel and 4-bit
# are each covered by three configs (export dominates this file's runtime).
CASES = [("mlp", c) for c in CONFIGS] + [
    (m, c) for m in ("cnn", "transformer") for c in ("sym8-tensor", "asym8-channel", "w4-sym-channel")
]
FUSED_EXPECTED = {"mlp": {"QGemm"}, "cnn": {"QLinearConv", "QGemm"}, "transformer": {"QGemm"}}


class Case:
    """A calibrated model, its export and its validation report."""

    def __init__(self, name: str, config: str, directory):
        float_model, qmap, self.sample = models.CASES[name](**CONFIGS[config])
        self.name, self.config, self.float_model = name, config, float_model
        self.qmodel = models.calibrated(float_model, qmap, self.sample)
        self.example = self.sample(4)
        with torch.no_grad():
            self.qmodel(self.example)  # fills the eval weight cache, which the export must bypass
        self.path = str(directory / f"{name}-{config}.onnx")
        self.result = export_onnx(self.qmodel, self.example, self.path)
        self.report = validate_onnx(self.qmodel, self.sample(8), self.path, n_random=2)
        self.onnx = onnx.load(self.path)


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{c}" for m, c in CASES])
def case(request, tmp_path_factory):
    name, config = request.param
    return Case(name, config, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def float_sizes(tmp_path_factory):
    """Bytes of each float model's ONNX export (same exporter, same stripping of debug metadata)."""
    directory = tmp_path_factory.mktemp("float")
    sizes = {}
    for name, builder in models.CASES.items():
        model, _, sample = builder()
        program = torch.onnx.export(
            model.eval(), (sample(4),), dynamo=True, opset_version=21, verbose=False, external_data=False
        )
        strip_debug_info(program.model)
        path = directory / f"{name}.onnx"
        program.save(str(path), external_data=False)
        sizes[name] = os.path.getsize(path)
    return sizes


def _initializers(model_proto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model_proto.graph.initializer}


def _weight_dq_nodes(model_proto):
    inits = {i.name: i for i in model_proto.graph.initializer}
    return [
        (n, inits[n.input[0]])
        for n in model_proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]


# -- model-level acceptance --------------------------------------------------------------------
def test_checker_full_check(case):
    onnx.checker.check_model(case.path, full_check=True)


def test_matches_pytorch_without_optimisations(case):
    """>= 99.9% of the elements equal to float precision, the rest within 1 LSB of the output quantizer."""
    print(case.report)
    for c in case.report.level("disabled"):
        assert c.lsb is not None, "the model output comes from a DequantizeLinear"
        assert c.match_share >= 0.999, str(case.report)
        assert c.max_lsb <= 1.0 + 1e-3, str(case.report)


def test_matches_pytorch_with_full_optimisations(case):
    """onnxruntime's fused integer kernels still agree within 1 LSB."""
    for c in case.report.level("all"):
        assert c.max_lsb <= 1.0 + 1e-3, str(case.report)
        assert c.code_share >= 0.95, str(case.report)


def test_onnxruntime_fuses_qdq(case):
    """8-bit weights: onnxruntime turns the QDQ patterns into integer kernels (QLinearConv, QGemm,
    MatMulIntegerToFloat). int4 weights have no fused CPU kernels: they run as DequantizeLinear."""
    fused = set(case.report.fused)
    print(f"{case.name}-{case.config}: fused {case.report.fused}")
    if CONFIGS[case.config]["w_bits"] == 8:
        assert FUSED_EXPECTED[case.name] <= fused, str(case.report)


def test_file_is_small(case, float_sizes):
    ratio = os.path.getsize(case.path) / float_sizes[case.name]
    print(f"{case.name}-{case.config}: {ratio:.1%} of the float export")
    assert ratio < 0.35


def test_weights_are_integer_initializers(case):
    """Every quantized weight is an integer initializer feeding DequantizeLinear; no float copy is left."""
    w_bits = CONFIGS[case.config]["w_bits"]
    # signed_weights=True (default): signed grids (qmin < 0) stay int8/int4, unsigned ones uint8/uint4
    signed = {q.name: q.constants.qmin < 0 for q in case.result.quantizers if q.kind == "weight"}
    weight_nodes = _weight_dq_nodes(case.onnx)
    assert len(weight_nodes) >= len({q.owner for q in case.result.quantizers if q.kind == "weight"}) - 2
    for node, init in weight_nodes:
        name = node.input[1].rsplit(".scale", 1)[0]
        expected = ("INT" if signed[name] else "UINT") + str(w_bits)
        assert onnx.TensorProto.DataType.Name(init.data_type) == expected, node.input[0]
        zp = next(i for i in case.onnx.graph.initializer if i.name == node.input[2])
        assert zp.data_type == init.data_type
    big_float = [
        name for name, a in _initializers(case.onnx).items() if a.dtype == np.float32 and a.size >= 1024
    ]
    assert not big_float, f"float weights left in the file: {big_float}"


def test_per_channel_axis(case):
    per_channel = CONFIGS[case.config]["per_channel"]
    inits = _initializers(case.onnx)
    for node, init in _weight_dq_nodes(case.onnx):
        scale = inits[node.input[1]]
        axis = {a.name: a.i for a in node.attribute}.get("axis")
        if per_channel and scale.size > 1:
            assert axis == 0 and scale.shape == (init.dims[0],), node.input[0]
        elif not per_channel:
            assert scale.ndim == 0 and axis is None, node.input[0]
    if per_channel:
        assert any(inits[n.input[1]].size > 1 for n, _ in _weight_dq_nodes(case.onnx))


def test_dynamic_batch(case):
    dim = case.onnx.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.HasField("dim_value")
    assert case.report.n_batches == 3  # batches of 8 and 9 against an export traced with 4


def test_report_prints_a_table(case):
    text = str(case.report)
    assert "disabled" in text and "all" in text and "max LSB" in text and "fused integer nodes" in text


# -- export ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
@pytest.mark.parametrize("n_bits", [4, 8, 12])
def test_qdq_ops_match_reference(symmetric, axis, n_bits):
    x = torch.randn(6, 33) * 3
    shape = (6,) if axis == 0 else ()
    x_min = torch.full(shape, -2.0) if symmetric else -torch.rand(shape) * 3
    x_max = torch.rand(shape) * 3 + 0.5
    delta, zero_float, signed = ref.qparams_from_range(x_min, x_max, n_bits, symmetric)
    step = delta.reshape(-1, 1) if axis == 0 else delta
    x[:, :8] = (torch.arange(8) - 4 + 0.5) * step  # exact ties: round half to even must agree
    expected = ref.fake_quant_reference(x, delta, zero_float, signed, n_bits, symmetric, axis)
    c = qdq.export_constants(delta, zero_float, signed, n_bits, symmetric, axis)
    for storage_bits in {8 if n_bits <= 8 else 16, 4 if n_bits <= 4 else 8 if n_bits <= 8 else 16}:
        for constants in (c, qdq.shift_to_unsigned(c, storage_bits)[0]):
            y = qdq.quantize_dequantize(
                x, constants.scale, constants.zero_point, constants.qmin, constants.qmax, axis
            )
            assert torch.equal(y, expected)
            codes = qdq.quantize_codes(x, constants)
            assert codes.dtype == constants.dtype
            w = qdq.dequantize_codes(codes, constants.scale, constants.zero_point, axis, storage_bits)
            assert torch.equal(w, expected)


def test_qdq_ops_have_fake_impls():
    x = torch.randn(4, 5)
    s, z = torch.tensor(0.1), torch.tensor(128, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.tquant.quantize_dequantize.default, (x, s, z, 0, 255, -1))
    codes = torch.randint(0, 255, (4, 5), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.tquant.dequantize_codes.default, (codes, s, z, -1, 8))


# -- errors and atomic writes ------------------------------------------------------------------
def _tiny(calibrate: bool = True, **qkw):
    """A two-layer model (fast to export) and its sampler."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    qmap = models.make_qmap(input_quant=("0",), **qkw)
    sample = lambda b: torch.randn(b, 16)
    if calibrate:
        return models.calibrated(model, qmap, sample), sample
    return tquant.convert_to_quantized(model, qmap).eval(), sample


def _leftovers(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_uninitialised_quantizer_names_the_layer(tmp_path):
    qmodel, sample = _tiny(calibrate=False)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(tquant.QuantizerNotInitializedError, match="'0"):
        export_onnx(qmodel, sample(2), path)
    assert path.read_bytes() == b"previous" and not _leftovers(tmp_path)


def test_empty_example_batch_is_one_clear_line(tmp_path):
    qmodel, sample = _tiny()
    with pytest.raises(ExportError) as err:
        export_onnx(qmodel, sample(0), tmp_path / "model.onnx")
    message = str(err.value)
    assert message == ("export_onnx: example_inputs is empty (shape (0, 16)): the example batch must be non-empty "
                       "(at least one sample)")
    with pytest.raises(ExportError, match=r"example_inputs\[1\] is empty \(shape \(0,\)\)"):
        export_onnx(qmodel, (sample(2), torch.empty(0)), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())
    export_onnx(qmodel, sample(2), tmp_path / "model.onnx")
    with pytest.raises(ExportError, match=r"^validate_onnx: example_inputs is empty \(shape \(0, 16\)\)"):
        validate_onnx(qmodel, sample(0), tmp_path / "model.onnx")


def test_training_mode_names_the_layer(tmp_path):
    qmodel, sample = _tiny()
    qmodel[2].train()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="'2'.*training mode"):
        export_onnx(qmodel, sample(2), path)
    assert path.read_bytes() == b"previous"


def test_failed_export_never_clobbers_the_file(tmp_path, monkeypatch):
    qmodel, sample = _tiny()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")

    def broken_check(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(qmodel, sample(2), path)
    assert path.read_bytes() == b"previous" and not _leftovers(tmp_path)
    monkeypatch.undo()
    result = export_onnx(qmodel, sample(2), path)
    assert result.file_bytes == os.path.getsize(path) and not _leftovers(tmp_path)
    onnx.checker.check_model(str(path), full_check=True)


def test_bad_options(tmp_path):
    qmodel, sample = _tiny(w_bits=4)
    with pytest.raises(ValueError, match="weight_storage"):
        export_onnx(qmodel, sample(2), tmp_path / "a.onnx", weight_storage="int2")
    with pytest.raises(ValueError, match="bias_add"):
        export_onnx(qmodel, sample(2), tmp_path / "a.onnx", bias_add="maybe")
    with pytest.raises(ExportError, match="opset >= 21"):
        export_onnx(qmodel, sample(2), tmp_path / "a.onnx", opset=20, weight_storage="int4")
    with pytest.raises(FileNotFoundError):
        export_onnx(qmodel, sample(2), tmp_path / "missing" / "a.onnx")
    assert not os.path.exists(tmp_path / "a.onnx")


class W4Export:
    """An MLP with 4-bit per-channel weights, snapshotted before export, exported once."""

    def __init__(self, directory):
        self.qmodel, self.sample = _mlp_w4()
        self.x = self.sample(3)
        with torch.no_grad():
            self.before = self.qmodel(self.x)
        self.state = {k: v.clone() for k, v in self.qmodel.state_dict().items()}
        self.buffers = {name for name, _ in self.qmodel.named_buffers()}
        self.caching = [m.caching for m in self.qmodel.modules() if isinstance(m, tquant.QuantizedModule)]
        self.path = directory / "w4.onnx"
        self.result = export_onnx(self.qmodel, self.x, self.path)


def _mlp_w4():
    model, qmap, sample = models.mlp_case(w_bits=4, per_channel=True)
    return models.calibrated(model, qmap, sample), sample


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    return W4Export(tmp_path_factory.mktemp("w4"))


def test_model_is_restored(w4):
    qmodel = w4.qmodel
    assert set(qmodel.state_dict()) == set(w4.state)
    assert all(torch.equal(v, w4.state[k]) for k, v in qmodel.state_dict().items())
    assert {name for name, _ in qmodel.named_buffers()} == w4.buffers
    assert [m.caching for m in qmodel.modules() if isinstance(m, tquant.QuantizedModule)] == w4.caching
    assert all("forward" not in m.__dict__ and "run_forward" not in m.__dict__ for m in qmodel.modules())
    with torch.no_grad():
        assert torch.equal(qmodel(w4.x), w4.before)


def test_export_result_and_quantizers(w4):
    weights = [q for q in w4.result.quantizers if q.kind == "weight"]
    assert len(weights) == 3 and {q.storage_bits for q in weights} == {4}
    assert all(q.separate_bias and q.per_channel for q in weights)
    assert "integer weights" in str(w4.result)


# -- storage options ---------------------------------------------------------------------------
def test_opset_18_and_4bit_fallback(tmp_path):
    """Below opset 21 there is no int4: 4-bit weights are stored in int8 (weight_storage='auto'), or
    shifted into uint8 with ``signed_weights=False``."""
    qmodel, sample = _tiny(w_bits=4, per_channel=True)
    for signed_weights, storage in ((True, "INT8"), (False, "UINT8")):
        path = tmp_path / f"m18-{storage}.onnx"
        export_onnx(qmodel, sample(4), path, opset=18, signed_weights=signed_weights)
        model = onnx.load(str(path))
        assert next(o.version for o in model.opset_import if o.domain == "") == 18
        assert {onnx.TensorProto.DataType.Name(i.data_type) for _, i in _weight_dq_nodes(model)} == {storage}
        report = validate_onnx(qmodel, sample(4), path, levels=("disabled",))
        assert report.ok()


def test_signed_storage_keeps_trained_zero_points(tmp_path):
    """TensorRT's convention: signed grids in int8 with zero point 0 (exact with optimisations off)."""
    qmodel, sample = _tiny(symmetric=True, per_channel=True)
    path = tmp_path / "signed.onnx"
    export_onnx(qmodel, sample(4), path, signed_storage=True)
    report = inspect_cmd.inspect_onnx(path)
    weights = report.weights
    assert weights and all(e.storage == "INT8" and set(e.zero_point) == {0} for e in weights)
    assert validate_onnx(qmodel, sample(4), path, levels=("disabled",)).ok()


def test_narrow_and_wide_activation_grids(tmp_path):
    """6-bit activations: QuantizeLinear → Clip → DequantizeLinear in uint8; 12-bit: uint16 storage."""
    for a_bits, storage in ((6, "UINT8"), (12, "UINT16")):
        qmodel, sample = _tiny(a_bits=a_bits)
        path = tmp_path / f"a{a_bits}.onnx"
        result = export_onnx(qmodel, sample(4), path)
        assert result.node_counts.get("Clip", 0) >= 1
        report = inspect_cmd.inspect_onnx(path)
        assert all(e.storage == storage and e.bits == a_bits for e in report.activations), str(report)
        assert validate_onnx(qmodel, sample(4), path, levels=("disabled",)).ok(min_match=0.999)


def test_double_quantization_warns(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    qmap = models.make_qmap(input_quant=("1",))
    qmodel = models.calibrated(model, qmap, lambda b: torch.randn(b, 16))
    with pytest.warns(UserWarning, match="DoubleQDQPairsRemover"):
        result = export_onnx(qmodel, torch.randn(2, 16), tmp_path / "d.onnx")
    assert len(result.double_qdq) == 1


# -- tquant inspect ----------------------------------------------------------------------------
def _cli(*argv):
    parser = argparse.ArgumentParser(prog="tquant")
    inspect_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_inspect_cli(w4, tmp_path, capsys):
    path = w4.path
    assert _cli("inspect", str(path)) == 0
    out = capsys.readouterr().out
    assert "Q/DQ pairs: 4 activation quantizers, 3 integer weights" in out
    assert "int4" in out and "fc1.module.weight_quantizer" in out and "quantized weights" in out
    assert _cli("inspect", str(path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    weights = [e for e in data["entries"] if e["kind"] == "weight"]
    assert all(e["axis"] == 0 and e["bits"] == 4 and e["storage"] == "INT4" for e in weights)
    assert data["quantized_weight_bytes"]["INT4"] == sum(e["nbytes"] for e in weights)
    assert _cli("inspect", str(tmp_path / "nope.onnx")) == 2
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _cli("inspect", str(tmp_path / "bad.onnx")) == 2
