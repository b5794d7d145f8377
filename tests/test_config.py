"""Configuration classes: aihwkit's signatures and defaults, and validation naming the field."""

import copy

import pytest

import tquant
from tquant import (
    ActivationQuantConfig,
    CrossEntropyEstimatorParams,
    CurrentMinMaxEstimatorParams,
    MSEEstimatorParams,
    OptMethod,
    QuantizationConfigError,
    RangeEstimators,
    RunningMinMaxEstimatorParams,
    WeightQuantConfig,
)


def test_defaults_and_positional_order():
    a = ActivationQuantConfig(8, False)
    assert (a.n_bits, a.symmetric, a.range_estimator) == (8, False, RangeEstimators.running_minmax)
    assert a.range_estimator_params == RunningMinMaxEstimatorParams(0.9)
    w = WeightQuantConfig(4, True, True, RangeEstimators.MSE, MSEEstimatorParams(OptMethod.grid, 50, 0.1))
    assert (w.n_bits, w.symmetric, w.per_channel, w.range_estimator) == (4, True, True, RangeEstimators.MSE)
    assert w.range_estimator_params.num_candidates == 50
    assert WeightQuantConfig().range_estimator == RangeEstimators.current_minmax
    assert WeightQuantConfig().range_estimator_params == CurrentMinMaxEstimatorParams(None)
    assert MSEEstimatorParams() == MSEEstimatorParams(OptMethod.golden_section, 100, 0.5)
    q = tquant.QuantizationConfig()
    assert q.activation_quant.n_bits == 0 and q.weight_quant.n_bits == 0
    assert RangeEstimators["MSE"] is RangeEstimators.MSE and OptMethod["grid"] is OptMethod.grid


def test_setting_estimator_resets_params():
    cfg = ActivationQuantConfig(8)
    cfg.range_estimator_params = RunningMinMaxEstimatorParams(0.5)
    cfg.range_estimator = RangeEstimators.cross_entropy
    assert cfg.range_estimator_params == CrossEntropyEstimatorParams()
    cfg.range_estimator = RangeEstimators.allminmax
    assert cfg.range_estimator_params is None
    cfg.range_estimator = "current_minmax"
    assert cfg.range_estimator_params == CurrentMinMaxEstimatorParams()


def test_params_of_wrong_class_raise_type_error():
    cfg = WeightQuantConfig(8)
    with pytest.raises(TypeError, match="current_minmax.*CurrentMinMaxEstimatorParams.*RunningMinMax"):
        cfg.range_estimator_params = RunningMinMaxEstimatorParams()
    cfg.range_estimator = RangeEstimators.allminmax
    with pytest.raises(TypeError, match="allminmax"):
        cfg.range_estimator_params = CurrentMinMaxEstimatorParams()
    with pytest.raises(TypeError):
        ActivationQuantConfig(8, True, RangeEstimators.MSE, RunningMinMaxEstimatorParams())


@pytest.mark.parametrize("bits", [17, 1, 8.0, "8", True])
def test_bad_bit_widths(bits):
    with pytest.raises(QuantizationConfigError, match="n_bits"):
        WeightQuantConfig(bits)
    cfg = ActivationQuantConfig()
    with pytest.raises(QuantizationConfigError, match="ActivationQuantConfig.*n_bits"):
        cfg.n_bits = bits


def test_bad_fields_name_the_field():
    with pytest.raises(QuantizationConfigError, match="range_estimator.*'minmax'"):
        ActivationQuantConfig(8, True, "minmax")
    with pytest.raises(QuantizationConfigError, match="symmetric"):
        ActivationQuantConfig(8, "yes")
    with pytest.raises(QuantizationConfigError, match="per_channel"):
        WeightQuantConfig(8, True, 1)
    with pytest.raises(QuantizationConfigError, match="percentile"):
        CurrentMinMaxEstimatorParams(60)
    with pytest.raises(QuantizationConfigError, match="momentum"):
        RunningMinMaxEstimatorParams(1.5)
    with pytest.raises(QuantizationConfigError, match="num_candidates"):
        MSEEstimatorParams(OptMethod.grid, 0)
    with pytest.raises(QuantizationConfigError, match="range_opt_method"):
        MSEEstimatorParams("newton")
    with pytest.raises(QuantizationConfigError, match="activation_quant"):
        tquant.QuantizationConfig(activation_quant=WeightQuantConfig(8))


def test_deepcopy_and_equality():
    cfg = tquant.QuantizationConfig(ActivationQuantConfig(8), WeightQuantConfig(4, per_channel=True))
    clone = copy.deepcopy(cfg)
    assert clone == cfg and clone.weight_quant is not cfg.weight_quant
    clone.weight_quant.n_bits = 2
    assert clone != cfg and cfg.weight_quant.n_bits == 4


def test_kwargs_conversion_matches_aihwkit_names():
    cfg = tquant.QuantizationConfig(
        ActivationQuantConfig(8, False, RangeEstimators.current_minmax, CurrentMinMaxEstimatorParams(1.0)),
        WeightQuantConfig(4, True, True, RangeEstimators.running_minmax, RunningMinMaxEstimatorParams(0.8)),
    )
    kw = tquant.convert_configs_to_kwargs_dict(cfg)
    assert kw == {
        "method": tquant.QMethods.symmetric_uniform, "n_bits": 4, "per_channel_weights": True,
        "percentile": None, "weight_range_method": RangeEstimators.running_minmax,
        "weight_range_options": {"momentum": 0.8}, "act_method": tquant.QMethods.asymmetric_uniform,
        "n_bits_act": 8, "act_range_method": RangeEstimators.current_minmax,
        "act_range_options": {"percentile": 1.0},
    }
