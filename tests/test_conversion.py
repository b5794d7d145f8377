"""convert_to_quantized: aihwkit's behaviours and every priority rule of the QuantizationMap."""

import copy

import pytest
import torch
from torch import nn

import tquant
from tquant import (
    ActivationQuantConfig,
    QuantizationConfig,
    QuantizationMap,
    QuantizedModuleConfig,
    QuantLinear,
    WeightQuantConfig,
)

from helpers import small_qmap


def two_linears(n=64):
    return nn.Sequential(nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False))


@pytest.mark.parametrize("act_bits", [0, 4, 8])
@pytest.mark.parametrize("w_bits", [0, 4, 8])
def test_layer_quantization_unique_values(act_bits, w_bits, backend):
    inp = torch.ones((1, 300))
    layer = nn.Linear(300, 300, bias=False)
    qlayer = tquant.convert_to_quantized(layer, small_qmap(w_bits, act_bits))
    out, qout = layer(inp), qlayer(inp)
    if act_bits == 0 and w_bits == 0:
        assert type(qlayer) is nn.Linear
        torch.testing.assert_close(out, qout)
    else:
        assert isinstance(qlayer, QuantLinear)
        assert not torch.allclose(out, qout, atol=1e-5)
        if act_bits > 0:
            assert qout.unique().numel() <= 2**act_bits
        else:
            assert qout.unique().numel() > 2**w_bits


@pytest.mark.parametrize("low_bit_layer", [0, 1])
def test_instance_map_beats_type_map(low_bit_layer, backend):
    qmap = QuantizationMap()
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    qmap.instance_qconfig_map[str(low_bit_layer)] = QuantizedModuleConfig(
        QuantLinear, QuantizationConfig(activation_quant=ActivationQuantConfig(n_bits=4))
    )
    qnet = tquant.convert_to_quantized(two_linears(), qmap)
    assert qnet[low_bit_layer].n_bits_act == 4 and qnet[1 - low_bit_layer].n_bits_act == 8
    n = qnet(torch.ones(1, 64)).unique().numel()
    assert (2**4 < n <= 2**8) if low_bit_layer == 0 else (n <= 2**4)


@pytest.mark.parametrize("actq_layer", [None, 0, 1])
def test_input_quantization(actq_layer, backend):
    net = two_linears()
    qmap = QuantizationMap()
    if actq_layer is not None:
        qmap.input_activation_qconfig_map[str(actq_layer)] = ActivationQuantConfig(n_bits=4)
    qnet = tquant.convert_to_quantized(net, qmap)
    inp = torch.rand(1, 64)
    if actq_layer is None:
        torch.testing.assert_close(net(inp), qnet(inp))
    else:
        assert isinstance(qnet[actq_layer], tquant.QuantizedInputModule)
        assert type(qnet[actq_layer].module) is nn.Linear
        assert not torch.allclose(net(inp), qnet(inp), atol=1e-5)
    if actq_layer == 0:
        q_in = qnet[0].input_quantizer(inp)
        assert q_in.unique().numel() <= 16


def test_input_quantization_wraps_converted_module():
    qmap = small_qmap(8, 8)
    qmap.input_activation_qconfig_map["0"] = ActivationQuantConfig(n_bits=8, symmetric=False)
    qnet = tquant.convert_to_quantized(two_linears(), qmap)
    assert isinstance(qnet[0], tquant.QuantizedInputModule) and isinstance(qnet[0].module, QuantLinear)
    assert qnet[0].input_quantizer._quant_a and not qnet[0].input_quantizer.activation_quantizer.symmetric


@pytest.mark.parametrize("quant_last", [True, False])
def test_exclusion(quant_last, backend):
    qmap = QuantizationMap()
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    if not quant_last:
        qmap.excluded_modules.append("1")
    qnet = tquant.convert_to_quantized(two_linears(300), qmap)
    n = qnet(torch.ones(1, 300)).unique().numel()
    assert (n <= 2**8) if quant_last else (n > 2**8)
    assert isinstance(qnet[1], QuantLinear) == quant_last


def test_exclusion_beats_instance_map():
    qmap = small_qmap()
    qmap.instance_qconfig_map["1"] = QuantizedModuleConfig(QuantLinear, QuantizationConfig(
        ActivationQuantConfig(4), WeightQuantConfig(4)))
    qmap.excluded_modules.append("1")
    qnet = tquant.convert_to_quantized(two_linears(), qmap)
    assert type(qnet[1]) is nn.Linear and isinstance(qnet[0], QuantLinear)


def test_type_map_is_exact_type_and_recursion_reaches_children():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), MyLinear(4, 4))
    qnet = tquant.convert_to_quantized(net, small_qmap())
    assert isinstance(qnet[0][0], QuantLinear)
    assert type(qnet[1]) is MyLinear, "a subclass is not matched by its parent's type entry"


def test_zero_bit_config_keeps_module_and_converter_leaves_original_untouched():
    net = two_linears()
    before = copy.deepcopy(net.state_dict())
    qmap = small_qmap()
    qmap.instance_qconfig_map["0"] = QuantizedModuleConfig(QuantLinear, QuantizationConfig())
    qnet = tquant.convert_to_quantized(net, qmap)
    assert type(qnet[0]) is nn.Linear and isinstance(qnet[1], QuantLinear)
    assert all(type(m) is not QuantLinear for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_default_conversions_share_weights_and_keep_constructor_args():
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Conv3d(2, 2, 1, bias=False), nn.LayerNorm(5, eps=1e-3, elementwise_affine=False),
        nn.Embedding(10, 4, padding_idx=0),
    )
    qnet = tquant.convert_to_quantized(net, small_qmap())
    expected = [tquant.QuantConv1d, tquant.QuantConv2d, tquant.QuantConv3d, tquant.QuantLayerNorm,
                tquant.QuantEmbedding]
    for orig, q, cls in zip(net, qnet, expected):
        assert type(q) is cls
        if getattr(orig, "weight", None) is not None:
            assert torch.equal(q.weight, orig.weight)
    assert qnet[1].padding_mode == "reflect" and qnet[1].stride == (2, 2)
    assert qnet[3].weight is None and qnet[3].eps == 1e-3
    assert qnet[4].padding_idx == 0
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(qnet[1].run_forward(x, qnet[1].weight, qnet[1].bias), net[1](x))


def test_custom_quantized_class_gets_original_and_map():
    seen = {}

    class QuantGELU(tquant.QuantizedActivation):
        def __init__(self, original, quantization_map=None, **kwargs):
            seen["original"], seen["map"] = original, quantization_map
            super().__init__(**kwargs)
            self.original = original

        def forward(self, x):
            return self.quantize_activations(self.original(x))

    qmap = small_qmap()
    qmap.module_qconfig_map[nn.GELU] = QuantizedModuleConfig(QuantGELU, qmap.default_qconfig)
    qnet = tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4), nn.GELU()), qmap)
    assert isinstance(qnet[1], QuantGELU) and isinstance(seen["original"], nn.GELU) and seen["map"] is qmap
    assert qnet[1]._quant_a and qnet(torch.randn(3, 4)).shape == (3, 4)


def test_batchnorm_conversion(backend):
    qmap = small_qmap()
    qmap.module_qconfig_map[nn.BatchNorm2d] = QuantizedModuleConfig(tquant.QuantBatchNorm2d, qmap.default_qconfig)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    qnet = tquant.convert_to_quantized(net, qmap)
    assert isinstance(qnet[1], tquant.QuantBatchNorm2d) and qnet[1].module is not net[1]
    out = qnet(torch.randn(2, 2, 6, 6))
    assert out.unique().numel() <= 256
    bn = qnet[1]
    assert bn.caching
    bn.caching = False
    assert not bn.act_bn_quantizer.caching and not bn.caching
    bn.fix_ranges()
    assert bn.act_bn_quantizer.activation_quantizer.state.name == "fix_ranges"


def test_append_default_conversions_keeps_existing_entries_and_copies_default():
    qmap = QuantizationMap()
    custom = QuantizedModuleConfig(QuantLinear, QuantizationConfig(weight_quant=WeightQuantConfig(4)))
    qmap.module_qconfig_map[nn.Linear] = custom
    tquant.append_default_conversions(qmap)
    assert qmap.module_qconfig_map[nn.Linear] is custom
    assert set(tquant.DEFAULT_CONVERSIONS) <= set(qmap.module_qconfig_map)
    conv_cfg = qmap.module_qconfig_map[nn.Conv2d].module_qconfig
    assert conv_cfg == qmap.default_qconfig and conv_cfg is not qmap.default_qconfig


def test_layer_names_in_errors():
    qnet = tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), small_qmap()).eval()
    with pytest.raises(tquant.QuantizerNotInitializedError, match=r"'0\.weight_quantizer'"):
        qnet(torch.randn(1, 4))


def test_map_validation_errors():
    net = two_linears()
    qmap = small_qmap()
    qmap.module_qconfig_map["0"] = QuantizedModuleConfig(QuantLinear, QuantizationConfig())
    with pytest.raises(tquant.QuantizationConfigError, match="module_qconfig_map.*not a module type"):
        tquant.convert_to_quantized(net, qmap)
    qmap = small_qmap()
    qmap.instance_qconfig_map["0"] = QuantizationConfig()
    with pytest.raises(tquant.QuantizationConfigError, match=r"instance_qconfig_map\['0'\]"):
        tquant.convert_to_quantized(net, qmap)
    with pytest.raises(tquant.QuantizationConfigError, match="quantized_module"):
        QuantizedModuleConfig("QuantLinear", QuantizationConfig())
    with pytest.raises(tquant.QuantizationConfigError, match="QuantizationMap"):
        tquant.convert_to_quantized(net, {"default": 8})


def test_unknown_state_dict_names_warn():
    qmap = small_qmap()
    qmap.excluded_modules.append("fc9")
    qmap.input_activation_qconfig_map["layer.0"] = ActivationQuantConfig(8)
    with pytest.warns(UserWarning, match="excluded_modules: no module named 'fc9'"):
        tquant.convert_to_quantized(two_linears(), qmap)


def test_converter_error_names_the_layer():
    class Broken(tquant.QuantizedActivation):
        def __init__(self, original, quantization_map=None, **kwargs):
            raise ValueError("unsupported thing")

    qmap = small_qmap()
    qmap.instance_qconfig_map["1"] = QuantizedModuleConfig(Broken, qmap.default_qconfig)
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"converting layer '1' \(ReLU -> Broken\): unsupported thing"):
        tquant.convert_to_quantized(net, qmap)
