"""The converter says what it left float (issue 12): warnings by their text, ``strict=True`` errors."""

import re
import warnings

import pytest
import torch
from torch import nn

import tquant
from tquant import ActivationQuantConfig, QuantizationConfig, QuantizationMap, QuantizedModuleConfig


def w4a8_map() -> QuantizationMap:
    qmap = QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 4
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    return qmap


def encoder() -> nn.Module:
    """Two transformer layers: 2 Linear + 2 LayerNorm each are mapped, the attention is not."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def conversion_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, tquant.ConversionWarning)]


def test_multihead_attention_left_float_is_named():
    messages = conversion_warnings(lambda: tquant.convert_to_quantized(encoder(), w4a8_map()))
    assert messages == [
        "convert_to_quantized: converted 8 layers; left float: 2 MultiheadAttention not in the map "
        "('layers.0.self_attn', 'layers.1.self_attn'); map their types or names, or list them in "
        "QuantizationMap.excluded_modules to keep them float on purpose"
    ]


def test_counts_by_type_and_a_conv1d_without_map_entry():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2), nn.Embedding(5, 3))
    qmap = w4a8_map()
    del qmap.module_qconfig_map[nn.Conv1d]
    del qmap.module_qconfig_map[nn.Embedding]
    (message,) = conversion_warnings(lambda: tquant.convert_to_quantized(model, qmap))
    assert message.startswith(
        "convert_to_quantized: converted 2 layers; left float: 1 Conv1d, 1 Embedding not in the map ('0', '4')"
    )


def test_empty_map_converts_nothing_and_says_why():
    model = nn.Sequential(nn.Linear(4, 4))
    (message,) = conversion_warnings(lambda: tquant.convert_to_quantized(model, QuantizationMap()))
    assert message == (
        "convert_to_quantized: converted 0 layers of Sequential: the QuantizationMap has no "
        "module_qconfig_map or instance_qconfig_map entries (call tquant.append_default_conversions(qmap) first?)"
    )


def test_zero_bit_defaults_convert_nothing_and_say_why():
    qmap = QuantizationMap()
    tquant.append_default_conversions(qmap)  # n_bits were never set: every layer is kept as is
    (message,) = conversion_warnings(
        lambda: tquant.convert_to_quantized(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), qmap)
    )
    assert "converted 0 layers of Sequential: 1 Conv2d, 1 Linear matched with n_bits <= 0" in message


def test_strict_raises_the_same_message():
    expected = "convert_to_quantized(strict=True): converted 8 layers; left float: 2 MultiheadAttention"
    with pytest.raises(tquant.ConversionError, match=re.escape(expected)):
        tquant.convert_to_quantized(encoder(), w4a8_map(), strict=True)
    with pytest.raises(tquant.ConversionError, match="converted 0 layers of Sequential"):
        tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 4)), QuantizationMap(), strict=True)
    with pytest.raises(tquant.ConversionError, match=re.escape("quantize_model(strict=True): converted 8 layers")):
        tquant.quantize_model(encoder(), w4a8_map(), strict=True)
    assert issubclass(tquant.ConversionError, tquant.QuantizationConfigError)


def test_quantize_model_warns_in_place():
    model = encoder()
    messages = conversion_warnings(lambda: tquant.quantize_model(model, w4a8_map()))
    assert len(messages) == 1 and messages[0].startswith("quantize_model: converted 8 layers; left float: 2 ")
    assert isinstance(model.layers[0].linear1, tquant.QuantLinear)


def test_complete_conversion_is_silent_and_strict_passes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    assert conversion_warnings(lambda: tquant.convert_to_quantized(model, w4a8_map(), strict=True)) == []


def test_modules_kept_float_on_request_are_not_warned_about():
    """excluded_modules and a matched config with both bit widths <= 0 are decisions, not accidents."""
    qmap = w4a8_map()
    qmap.excluded_modules = ["layers.0.self_attn"]
    qmap.instance_qconfig_map["layers.1.self_attn"] = QuantizedModuleConfig(tquant.QuantLinear, QuantizationConfig())
    qmodel = tquant.convert_to_quantized(encoder(), qmap, strict=True)
    assert type(qmodel.layers[0].self_attn) is nn.MultiheadAttention
    summary = tquant.ConversionSummary("TransformerEncoder", converted={"a": "Linear"},
                                       excluded={"layers.0.self_attn": "MultiheadAttention"},
                                       kept={"layers.1.self_attn": "MultiheadAttention"})
    assert summary.problem() is None
    assert str(summary) == (
        "converted 1 layer; kept float on request (excluded: 1 MultiheadAttention, n_bits <= 0: 1 MultiheadAttention)"
    )


def test_input_quantizers_alone_are_a_conversion():
    """A map that only quantizes inputs of weightless modules converts something: no warning."""
    qmap = QuantizationMap(input_activation_qconfig_map={"0": ActivationQuantConfig(8)})
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    assert conversion_warnings(lambda: tquant.convert_to_quantized(model, qmap, strict=True)) == []


def test_everything_excluded_warns():
    qmap = w4a8_map()
    qmap.excluded_modules = ["0"]
    (message,) = conversion_warnings(lambda: tquant.convert_to_quantized(nn.Sequential(nn.Linear(2, 2)), qmap))
    assert message.endswith("converted 0 layers of Sequential: 1 Linear in excluded_modules")


def test_quantized_encoder_layers_stay_off_the_fused_eval_path():
    """Eval under no_grad: nn.TransformerEncoderLayer's fused kernel would skip linear1/linear2's quantizers."""
    torch.manual_seed(0)
    qmap = w4a8_map()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tquant.ConversionWarning)  # the attention stays float here
        qmodel = tquant.convert_to_quantized(encoder(), qmap)
    x = torch.randn(3, 5, 32)
    qmodel(x)
    qmodel.eval()
    assert all(layer.activation_relu_or_gelu == 0 for layer in qmodel.layers)
    with torch.no_grad():
        fast = qmodel(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = qmodel(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert fast.unique().numel() <= 2**8  # the last layer's norm2 output quantizer (8 bits) is applied


def test_float_encoder_keeps_its_fast_path():
    model = encoder().eval()
    assert tquant.disable_fused_transformer_fast_path(model) == 0
    assert all(layer.activation_relu_or_gelu for layer in model.layers)


class TokenTransformer(nn.Module):
    """A model of the user's with parameters of its own (positional embedding, CLS token) used in its forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 32))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 32))
        self.encoder = encoder()
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x) + self.pos_embed], dim=1)
        return self.head(self.encoder(h)[:, 0])


ATTENTIONS = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]


def test_a_containers_own_parameters_are_named_as_such_and_the_float_layers_inside_it_too():
    (message,) = conversion_warnings(lambda: tquant.convert_to_quantized(TokenTransformer(), w4a8_map()))
    assert message == (
        "convert_to_quantized: converted 10 layers; left float: 2 MultiheadAttention not in the map "
        "('encoder.layers.0.self_attn', 'encoder.layers.1.self_attn') and 2 parameters of TokenTransformer itself, "
        "outside any layer ('pos_embed', 'cls_token'); map the layers' types or names, or list any of these names "
        "in QuantizationMap.excluded_modules to keep them float on purpose"
    )


def test_following_the_advice_makes_strict_pass():
    qmap = w4a8_map()
    qmap.excluded_modules += ["pos_embed", "cls_token"]
    with pytest.raises(tquant.ConversionError, match=r"left float: 2 MultiheadAttention not in the map"):
        tquant.convert_to_quantized(TokenTransformer(), qmap, strict=True)
    qmap.excluded_modules += ATTENTIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-name warning for the parameter names either
        qmodel = tquant.convert_to_quantized(TokenTransformer(), qmap, strict=True)
    assert qmodel(torch.randn(2, 5, 8)).shape == (2, 3)


def test_nested_container_parameters_have_their_path():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * self.gain

    (message,) = conversion_warnings(
        lambda: tquant.convert_to_quantized(nn.Sequential(Scaled(), nn.Linear(4, 2)), w4a8_map()))
    assert "left float: 1 parameter of Scaled itself, outside any layer ('0.gain'); list them in" in message


def test_changing_the_default_after_append_default_conversions_warns():
    qmap = QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    qmap.default_qconfig.weight_quant.n_bits = 4  # too late: the entries hold copies (aihwkit's behaviour)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    (message,) = conversion_warnings(lambda: tquant.convert_to_quantized(model, qmap))
    assert message == (
        "convert_to_quantized: QuantizationMap.default_qconfig changed after append_default_conversions "
        "(weight_quant.n_bits 8 -> 4): the Linear, Conv1d, Conv2d, Conv3d, LayerNorm, Embedding entries it made "
        "keep the copy they took; set default_qconfig before calling append_default_conversions, or set those "
        "entries' module_qconfig"
    )
    with pytest.raises(tquant.ConversionError, match=r"strict=True\): QuantizationMap.default_qconfig changed"):
        tquant.convert_to_quantized(model, qmap, strict=True)
    for entry in qmap.module_qconfig_map.values():  # following the advice: the entries say 4 bits
        entry.module_qconfig.weight_quant.n_bits = 4
    qmodel = tquant.convert_to_quantized(model, qmap, strict=True)
    assert qmodel[0].weight_quantizer.n_bits == 4


def test_a_target_that_is_not_a_tquant_class_is_named_as_such():
    qmap = w4a8_map()
    qmap.module_qconfig_map[nn.ReLU] = QuantizedModuleConfig(nn.ReLU, qmap.default_qconfig)
    with pytest.raises(tquant.QuantizationConfigError, match=re.escape(
            "converting layer '1' (ReLU -> ReLU): the quantized_module of a QuantizedModuleConfig must be a tquant "
            "quantized class (a subclass of tquant.QuantizedModule or tquant.QuantizedModel")):
        tquant.convert_to_quantized(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), qmap)
