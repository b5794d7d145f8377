"""The graph path: ``convert_to_quantized(model, qmap, example_inputs=...)`` (tquant/graph.py).

Per functional op: the traced model computes exactly the eager composition of its layers with the
quantizers the graph path documents (same bits), computes the float model with quantization off,
and exports to an ONNX graph onnxruntime runs on integers (the op's QLinear kernel, no float
compute left). Then: tracing failures fall back with a warning that says why, a tensor is never
quantized twice, conv/BN pairs and attention are found without names.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import tquant
from tquant.folding import QuantConvBn2d

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tquant.export import export_onnx, validate_onnx  # noqa: E402
from tquant.export.ort_graph import optimized_graph  # noqa: E402


def recipe_map(**flags) -> tquant.QuantizationMap:
    qmap = tquant.QuantizationMap(fold_activations=True, fold_batch_norm=True, quantize_bias=True)
    for name, value in flags.items():
        setattr(qmap, name, value)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8)
    tquant.append_default_conversions(qmap)
    return qmap


def calibrated(model: nn.Module, x: torch.Tensor, qmap=None, **kw) -> nn.Module:
    qmodel = tquant.convert_to_quantized(model, qmap or recipe_map(), example_inputs=(x,), **kw)
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        for seed in range(3):
            qmodel(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
    tquant.fix_ranges(qmodel)
    return qmodel


class Op(nn.Module):
    """``head(fn(a(x)[, b(x)]))``: the op between two quantized layers, as users write it."""

    def __init__(self, fn, image: bool, binary: bool, head_in: int):
        super().__init__()
        self.fn, self.binary = fn, binary
        self.a = nn.Conv2d(3, 4, 3, padding=1) if image else nn.Linear(6, 6)
        self.b = (nn.Conv2d(3, 4, 3, padding=1) if image else nn.Linear(6, 6)) if binary else None
        self.head = nn.Linear(head_in, 5)

    def forward(self, x):
        y = self.fn(self.a(x), self.b(x)) if self.binary else self.fn(self.a(x))
        return self.head(y)


IMAGE, SEQ = (2, 3, 6, 6), (2, 7, 6)
# (id, fn, image input?, binary?, head input features, quantizer the graph path adds after the op
#  (None: the op keeps its input's grid, or is folded into the layer before it))
CASES = [
    ("add", lambda a, b: a + b, True, True, 6, "add_quant"),
    ("torch.add", lambda a, b: torch.add(a, b), True, True, 6, "add_quant"),
    ("add+relu", lambda a, b: F.relu(a + b), True, True, 6, "relu_quant"),
    ("mul", lambda a, b: a * b, True, True, 6, "mul_quant"),
    ("cat", lambda a, b: torch.cat([a, b], 1), True, True, 6, "cat_quant"),
    ("matmul", lambda a, b: a @ b.transpose(1, 2), False, True, 7, "matmul_quant"),
    ("bmm", lambda a, b: torch.bmm(a, b.transpose(1, 2)), False, True, 7, "bmm_quant"),
    ("softmax", lambda a: F.softmax(a, -1), False, False, 6, "softmax_quant"),
    ("sigmoid", lambda a: torch.sigmoid(a), True, False, 6, "sigmoid_quant"),
    ("mean", lambda a: a.mean((2, 3)), True, False, 4, "mean_quant"),
    ("adaptive_avg_pool", lambda a: F.adaptive_avg_pool2d(a, 1).flatten(1), True, False, 4,
     "adaptive_avg_pool2d_quant"),
    ("avg_pool", lambda a: F.avg_pool2d(a, 2), True, False, 3, "avg_pool2d_quant"),
    ("seq mean", lambda a: a.mean(1), False, False, 6, "mean_quant"),
    ("max_pool", lambda a: F.max_pool2d(a, 2), True, False, 3, None),
    ("flatten", lambda a: torch.flatten(a, 1), True, False, 144, None),
    ("reshape", lambda a: a.reshape(a.shape[0], -1), True, False, 144, None),
    ("view+permute", lambda a: a.permute(0, 2, 3, 1).contiguous().view(2, -1, 4), True, False, 4, None),
    ("relu", F.relu, True, False, 6, None),
    ("relu6", F.relu6, True, False, 6, None),
    ("clamp", lambda a: torch.clamp(a, 0, 6), True, False, 6, None),
    ("hardtanh", lambda a: F.hardtanh(a, 0.0, 2.0), True, False, 6, None),
]
FOLDED = ("relu", "relu6", "clamp", "hardtanh")


def _eager_reference(qmodel, x, fn, binary, quant_name, folded):
    """The eager model's computation with the converted layers and the documented quantizers."""
    xq = qmodel.x_quant(x)
    ins = [qmodel.a(xq), qmodel.b(xq)] if binary else [qmodel.a(xq)]
    y = ins[0] if folded else fn(*ins)
    if quant_name is not None:
        y = getattr(qmodel, quant_name)(y)
    return qmodel.head(y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_functional_op_is_quantized_like_the_eager_model(case):
    name, fn, image, binary, head_in, quant_name = case
    torch.manual_seed(0)
    model = Op(fn, image, binary, head_in).eval()
    x = torch.randn(IMAGE if image else SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe converts every op without a complaint
        qmodel = calibrated(model, x)
    assert isinstance(qmodel, fx.GraphModule)
    inserted = sorted(q for q, _ in _quantizer_sources(qmodel))
    assert inserted == sorted(["x_quant"] + ([quant_name] if quant_name else []))
    folded = name in FOLDED
    assert (qmodel.a.activation_function is not None) == folded
    with torch.no_grad():
        assert torch.equal(qmodel(x), _eager_reference(qmodel, x, fn, binary, quant_name, folded))
        tquant.full_precision(qmodel)
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-6, atol=1e-6)


class ImageOps(nn.Module):
    """Every image op of the table in one forward, as a user might chain them."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 16))
        self.c5 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.c1(x)), 2)
        y = F.relu6(self.c2(y)) * torch.sigmoid(self.c3(y))
        y = torch.clamp(self.c4(torch.cat([y, y + y], 1)), 0, 6)
        y = F.hardtanh(self.c5(F.avg_pool2d(y, 2)), 0.0, 2.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1) + y.mean((2, 3)))


class SequenceOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.fc = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, x):
        att = F.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        y = torch.bmm(att, self.v(x)).reshape(x.shape[0], x.shape[1], 2, 3).permute(0, 2, 1, 3)
        return self.fc(y.flatten(2).transpose(1, 2).reshape(x.shape[0], x.shape[1], 6).mean(1))


@pytest.mark.parametrize("model, shape, integer", [
    (ImageOps, (2, 3, 16, 16), {"QLinearConv": 5, "QLinearMul": 1, "QLinearSigmoid": 1, "QLinearConcat": 1,
                                "QLinearAdd": 2, "QLinearAveragePool": 1, "QLinearGlobalAveragePool": 2, "QGemm": 1}),
    (SequenceOps, (2, 7, 6), {"QGemm": 4, "QLinearMatMul": 2, "QLinearSoftmax": 1, "QLinearGlobalAveragePool": 1}),
], ids=["image ops", "sequence ops"])
def test_functional_ops_export_as_integer_kernels(model, shape, integer, tmp_path):
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(shape)
    qmodel = calibrated(model, x)
    path = tmp_path / "ops.onnx"
    result = export_onnx(qmodel, x, path)
    assert result.double_qdq == [] and result.float_ops == []
    graph = optimized_graph(path)
    assert graph.integer_nodes == integer, graph.summary()
    assert graph.float_nodes == [], graph.summary()  # ReLU/ReLU6/clamp/hardtanh fused, max pool on integers
    assert graph.quantize == 1 and graph.dequantize == 0, graph.summary()  # input Q; float logits from QGemm
    report = validate_onnx(qmodel, x, path, n_random=1, levels=("disabled",))
    assert report.ok(), report.failures()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: torch.fx cannot trace it
            x = -x
        return self.fc2(F.relu(self.fc1(x)))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()
        self.stem = nn.Linear(4, 4)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.inner(self.stem(x)) + 1.0)


def test_untraceable_model_falls_back_to_module_conversion_with_the_reason():
    model = DataDependent().eval()
    x = torch.randn(3, 4)
    with pytest.warns(tquant.TracingFallbackWarning, match=r"cannot trace DataDependent\.forward.*control flow"):
        qmodel = tquant.convert_to_quantized(model, recipe_map(), example_inputs=(x,))
    assert type(qmodel) is DataDependent  # the module-level result, as without example_inputs
    plain = tquant.convert_to_quantized(model, recipe_map())
    assert [type(m) for m in qmodel.modules()] == [type(m) for m in plain.modules()]


def test_untraceable_submodule_stays_opaque_and_the_rest_is_graph_converted():
    model = Outer().eval()
    x = torch.randn(3, 4)
    with pytest.warns(tquant.TracingFallbackWarning, match=r"cannot trace 'inner'"):
        qmodel = calibrated(model, x)
    assert isinstance(qmodel, fx.GraphModule)
    assert isinstance(qmodel.inner.fc1, tquant.QuantLinear)  # converted by the map inside the leaf
    assert hasattr(qmodel, "x_quant")  # the graph path still quantizes the model input
    with torch.no_grad():
        tquant.full_precision(qmodel)
        torch.testing.assert_close(qmodel(x), model(x))


def _quantizer_sources(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(quantizer, what produced its input)`` for every inserted quantizer node."""
    modules = dict(gm.named_modules())
    return [(str(n.target), n.args[0].op if isinstance(n.args[0], fx.Node) else "")
            for n in gm.graph.nodes
            if n.op == "call_module" and type(modules[str(n.target)]) is tquant.QuantizedActivation]


class ReluBetweenConvs(nn.Module):
    """The issue's case: a ReLU written in forward, the next conv's input quantized by hand."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.conv2(y) + self.conv3(y)  # one tensor, two consumers


def test_a_tensor_is_never_quantized_twice(tmp_path):
    model = ReluBetweenConvs().eval()
    x = torch.randn(2, 3, 9, 9)
    qmap = recipe_map()
    qmap.input_activation_qconfig_map["conv2"] = tquant.ActivationQuantConfig(8)
    with pytest.warns(tquant.ConversionWarning, match=r"input_activation_qconfig_map\['conv2'\] ignored"):
        qmodel = calibrated(model, x, qmap)
    # the ReLU went into conv1 (its output quantizer after it); conv2 and conv3 read that one tensor
    assert isinstance(qmodel.conv1.activation_function, nn.ReLU)
    assert sorted(q for q, _ in _quantizer_sources(qmodel)) == ["add_quant", "x_quant"]
    assert all(src in ("placeholder", "call_function") for _, src in _quantizer_sources(qmodel))
    assert qmodel.conv2.bias_input_quantizer() is qmodel.conv1.activation_quantizer
    assert qmodel.conv3.bias_input_quantizer() is qmodel.conv1.activation_quantizer
    result = export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert result.double_qdq == []
    assert optimized_graph(tmp_path / "m.onnx").integer_nodes == {"QLinearAdd": 1, "QLinearConv": 3}


def test_shared_float_input_gets_one_quantizer_and_params_are_quantized_where_used():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.pos = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            h = F.gelu(x)  # a float op: both layers read its output through one quantizer
            return self.a(h) + self.b(h) + self.pos

    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pos is quantized where it is used: nothing is "left float"
        qmodel = calibrated(Net().eval(), x)
    assert sorted(q for q, _ in _quantizer_sources(qmodel)) == ["add_quant", "add_quant_1", "gelu_quant", "pos_quant"]


def test_conv_bn_pairs_found_in_forward_without_names():
    from tquant.benchmarks.families import build

    model, sample = build("resnet", "small")
    qmodel = calibrated(model, sample(2))
    folded = [name for name, m in qmodel.named_modules() if isinstance(m, QuantConvBn2d)]
    assert sorted(folded) == ["conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2",
                              "layer2.downsample.0", "layer3.conv1", "layer3.conv2", "layer3.downsample.0"]
    with torch.no_grad():
        tquant.full_precision(qmodel)
        x = sample(4)
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-5)


def test_without_folding_flags_the_graph_keeps_activations_and_batch_norm():
    model = ReluBetweenConvs().eval()
    x = torch.randn(2, 3, 9, 9)
    qmodel = calibrated(model, x, recipe_map(fold_activations=False, fold_batch_norm=False))
    assert qmodel.conv1.activation_function is None
    assert "relu_quant" in [q for q, _ in _quantizer_sources(qmodel)]  # the ReLU output is a new tensor


def test_attention_is_converted_by_default_and_computes_the_original():
    from tquant.attention import QuantMultiheadAttention

    class Net(nn.Module):
        def __init__(self, batch_first):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]

    for batch_first in (True, False):
        model = Net(batch_first).eval()
        q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        qmodel = tquant.convert_to_quantized(model, recipe_map(), example_inputs=(q, kv))
        assert isinstance(qmodel.attn, QuantMultiheadAttention)
        tquant.full_precision(qmodel)
        with torch.no_grad():
            torch.testing.assert_close(qmodel(q, kv), model(q, kv), rtol=1e-5, atol=1e-5)
    excluded = recipe_map()
    excluded.excluded_modules = ["attn"]
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    qmodel = tquant.convert_to_quantized(Net(True).eval(), excluded, example_inputs=(q, kv))
    assert type(qmodel.attn) is nn.MultiheadAttention


def test_quant_multihead_attention_matches_torch_with_masks_and_weights():
    from tquant.attention import QuantMultiheadAttention

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    qattn = QuantMultiheadAttention(attn).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, -2:] = True
    mask = torch.randn(3, 5)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": mask},
                       {"average_attn_weights": False}):
            out, weights = qattn(q, kv, kv, **kwargs)
            ref_out, ref_weights = attn(q, kv, kv, **kwargs)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-5)
        assert qattn(q, kv, kv, need_weights=False)[1] is None
    with pytest.raises(TypeError, match="expected an nn.MultiheadAttention"):
        QuantMultiheadAttention(nn.Linear(2, 2))


def test_graph_converted_model_trains():
    from tquant.benchmarks.families import build

    model, sample = build("mobilenet", "small")
    qmodel = tquant.convert_to_quantized(model.train(), recipe_map(), example_inputs=(sample(2),))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    x = sample(4)
    for _ in range(2):  # QAT: ranges follow the data on training forwards, BN statistics update
        optimizer.zero_grad()
        qmodel(x).square().mean().backward()
        optimizer.step()
    expand = qmodel.get_submodule("blocks.1.conv.0")  # fx keeps the paths, not the Sequential containers
    assert expand.weight.grad is not None and expand.bn_steps.item() == 2
    assert all(m.activation_quantizer.is_initialized for m in qmodel.modules()
               if type(m) is tquant.QuantizedActivation)


def test_linear_and_conv1d_batch_norm_pairs_are_folded(tmp_path):
    from tquant.folding import QuantConvBn1d, QuantLinearBn1d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1 = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
            self.fc, self.bn2 = nn.Linear(24, 8), nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv(x)))
            return self.head(F.relu(self.bn2(self.fc(y.flatten(1)))))

    model = Net()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4, 3, 8)
    qmodel = calibrated(model, x)
    assert type(qmodel.conv) is QuantConvBn1d and type(qmodel.fc) is QuantLinearBn1d
    assert isinstance(qmodel.fc.activation_function, nn.ReLU)
    result = export_onnx(qmodel, x, tmp_path / "bn1d.onnx")
    assert result.float_ops == []
    assert optimized_graph(tmp_path / "bn1d.onnx").integer_nodes == {"QGemm": 2, "QLinearConv": 1}
    with torch.no_grad():
        tquant.full_precision(qmodel)
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_names_what_stays_float_by_module_path(tmp_path):
    from tquant.export import FloatOpsWarning

    model = ReluBetweenConvs().eval()
    x = torch.randn(2, 3, 9, 9)
    qmap = recipe_map()
    qmap.input_activation_qconfig_map["conv1"] = tquant.ActivationQuantConfig(8)
    qmodel = tquant.convert_to_quantized(model, qmap)  # module by module: the ReLU in forward breaks the chain
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        qmodel(x)
    tquant.fix_ranges(qmodel)
    with pytest.warns(FloatOpsWarning, match=r"stay float after onnxruntime's optimisations") as caught:
        result = export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert str(caught[0].message).count("stays float") == len(result.float_ops)
    lines = {line.split(" stays float")[0]: line for line in result.float_ops}
    assert set(lines) == {"Relu at '<model>'", "Conv at 'conv2'", "Conv at 'conv3'", "Add at '<model>'"}
    assert "fold_activations" in lines["Relu at '<model>'"]
    assert "an input is not quantized" in lines["Conv at 'conv2'"] and "example_inputs" in lines["Conv at 'conv2'"]
