"""Quantizers and min/max range estimators at module level, against aihwkit's formulas."""

import math

import pytest
import torch
from torch import nn

import tquant
from tquant import QMethods, QuantizationManager, RangeEstimators


def manager(symmetric=True, estimator=RangeEstimators.running_minmax, n_bits=8, per_channel=False, **options):
    method = QMethods.symmetric_uniform if symmetric else QMethods.asymmetric_uniform
    return QuantizationManager(method, estimator, per_channel=per_channel, qparams={"n_bits": n_bits},
                               init_params=options)


def aihwkit_fake_quant(x, x_min, x_max, n_bits, symmetric, per_channel=False):
    """aihwkit 1.2.0's set_quant_range + forward, written out independently."""
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.ones_like(x_max) * 1e-8)
    if symmetric:
        signed = bool(x_min.min() < 0)
        int_max = 2.0 ** (n_bits - signed) - 1
        int_min = -(2.0 ** (n_bits - 1)) if signed else 0.0
        delta = torch.max(x_min.abs(), x_max) / int_max
        zp = torch.zeros_like(delta)
    else:
        int_min, int_max = 0.0, 2.0**n_bits - 1
        delta = (x_max - x_min) / int_max
        zp = torch.clamp(torch.round(-x_min / delta), int_min, int_max)
    scale = torch.clamp(delta, min=1e-8)
    if per_channel:
        scale, zp = scale.view(-1, *[1] * (x.dim() - 1)), zp.view(-1, *[1] * (x.dim() - 1))
    x_int = torch.clamp(torch.round(x / scale) + zp, int_min, int_max)
    return scale * (x_int - zp)


@pytest.mark.parametrize("n_bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("offset", [0.0, 2.5], ids=["two-sided", "positive"])
def test_matches_aihwkit_formula(n_bits, symmetric, per_channel, offset, backend):
    x = torch.randn(5, 13) + offset
    if offset:
        x = x.abs()
    qm = manager(symmetric, RangeEstimators.current_minmax, n_bits, per_channel)
    y = qm(x)
    if per_channel:
        x_min, x_max = x.min(dim=1).values, x.max(dim=1).values
    else:
        x_min, x_max = x.min(), x.max()
    # the formula on the CPU: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal
    expected = aihwkit_fake_quant(x.cpu(), x_min.cpu(), x_max.cpu(), n_bits, symmetric, per_channel)
    torch.testing.assert_close(y.cpu(), expected, rtol=0, atol=0)
    assert y.unique().numel() <= 2**n_bits * (5 if per_channel else 1)


def test_symmetric_per_channel_sign_decided_by_smallest_channel_minimum(backend):
    w = torch.rand(3, 8) + 0.1
    w[1, 0] = -0.01  # one slightly negative channel makes the whole quantizer signed
    qm = manager(True, RangeEstimators.current_minmax, 8, per_channel=True)
    qm(w)
    q = qm.quantizer
    assert q.signed and q.int_min == -128 and q.int_max == 127
    torch.testing.assert_close(q.delta, w.abs().max(dim=1).values / 127)
    qm(w.abs())
    assert not q.signed and q.int_max == 255


def test_running_minmax_follows_ema(backend):
    qm = manager(False, RangeEstimators.running_minmax, momentum=0.5)
    qm(torch.tensor([-1.0, 1.0]))
    qm(torch.tensor([-3.0, 5.0]))
    est = qm.range_estimator
    assert est.current_xmin == -2.0 and est.current_xmax == 3.0
    assert qm.quantizer.delta == torch.tensor(5.0) / 255


def test_allminmax_keeps_extremes(backend):
    qm = manager(True, RangeEstimators.allminmax)
    for x in (torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 4.0]), torch.tensor([-2.0, 0.5])):
        qm(x)
    assert qm.range_estimator.current_xmin == -2.0 and qm.range_estimator.current_xmax == 4.0


def test_estimator_forward_api_returns_ranges():
    est = tquant.RunningMinMaxEstimator(momentum=0.9)
    lo, hi = est(torch.tensor([-1.0, 2.0]))
    assert (lo, hi) == (-1.0, 2.0)
    lo, hi = est(torch.tensor([-3.0, 4.0]))
    assert math.isclose(float(lo), -1.2, rel_tol=1e-6) and math.isclose(float(hi), 2.2, rel_tol=1e-6)
    est.reset()
    assert torch.isnan(est.current_xmin) and torch.isnan(est.current_xmax), "reset: no range yet (NaN)"
    assert est(torch.tensor([-5.0, 1.0])) == (-5.0, 1.0), "after reset the next batch sets the range"


def test_set_quant_range_and_fixed_manager():
    qm = QuantizationManager(QMethods.asymmetric_uniform, RangeEstimators.current_minmax, x_min=-1.0, x_max=3.0,
                             qparams={"n_bits": 8})
    assert qm.state.name == "fix_ranges"
    q = qm.quantizer
    torch.testing.assert_close(q.scale, torch.tensor(4.0 / 255))
    assert q.zero_point == round(1.0 / (4.0 / 255))
    torch.testing.assert_close(q.x_min, q.scale * (0 - q.zero_point))
    with pytest.raises(ValueError, match="per-tensor"):
        q.set_quant_range(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 2.0]))


def test_uninitialised_quantizer_errors_name_the_layer():
    qm = manager()
    qm.layer_name = "blocks.3.act"
    qm.eval()
    with pytest.raises(tquant.QuantizerNotInitializedError, match="'blocks.3.act'"):
        qm(torch.randn(3))
    with pytest.raises(tquant.QuantizerNotInitializedError, match="'blocks.3.act'"):
        qm.export_qparams()
    with pytest.raises(tquant.QuantizerNotInitializedError):
        _ = qm.quantizer.delta


def test_nan_and_inf_in_training_data_never_make_a_nan_scale(backend):
    qm = manager(False)
    x = torch.tensor([-2.0, float("nan"), 1.0, float("inf"), 0.5])
    y = qm(x)
    q = qm.quantizer
    assert torch.isfinite(q.delta) and torch.isfinite(q.zero_float)
    assert q.delta.cpu() == torch.tensor(3.0) / 255  # a true division (computed on the CPU: see true_divide)
    assert torch.isnan(y[1]) and torch.isfinite(y[[0, 2, 3, 4]]).all()
    assert y[3] == q.x_max, "+inf clamps to the top of the grid"


def test_quantizer_constructor_validation():
    with pytest.raises(ValueError, match="scale_domain"):
        tquant.SymmetricUniformQuantizer(8, scale_domain="log")
    with pytest.raises(ValueError, match="axis"):
        tquant.AsymmetricUniformQuantizer(8, axis=2)
    with pytest.raises(ValueError, match="momentum"):
        tquant.RunningMinMaxEstimator(momentum=2.0)


def test_export_qparams_contract():
    qm = manager(True, RangeEstimators.current_minmax, 8, per_channel=True)
    qm(torch.randn(4, 5))
    p = qm.export_qparams()
    assert p["scale"].shape == (4,) and p["zero_point"].dtype == torch.int64
    assert (p["qmin"], p["qmax"], p["axis"], p["signed"]) == (-128, 127, 0, True)


def test_quantized_embedding_and_layernorm_forward(backend):
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 4
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    net = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6))
    qnet = tquant.convert_to_quantized(net, qmap)
    out_emb = qnet[0](torch.tensor([[1, 2, 3]]))
    assert out_emb.unique().numel() <= 16, "embedding rows are 4-bit weights and not re-quantized"
    assert qnet(torch.tensor([[1, 2, 3]])).shape == (1, 3, 6)


def test_unsupported_dtype_names_the_layer():
    qm = manager()
    qm.layer_name = "fc.activation_quantizer"
    with pytest.raises(TypeError, match="'?fc.activation_quantizer'?: cannot quantize a torch.int64"):
        qm(torch.arange(4))


@pytest.mark.parametrize("estimator", [RangeEstimators.MSE, RangeEstimators.cross_entropy], ids=["mse", "ce"])
@pytest.mark.parametrize("opt", [tquant.OptMethod.grid, tquant.OptMethod.golden_section], ids=["grid", "golden"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_search_estimators_clip_outliers_and_keep_state(estimator, opt, symmetric, per_channel):
    torch.manual_seed(0)
    qm = manager(symmetric, estimator, 4, per_channel, opt_method=opt, num_candidates=20, range_margin=0.5)
    x = torch.randn(4, 64)
    x[:, 0] = 12.0  # one far outlier per row: the best 4-bit range clips it
    y = qm(x)
    q = qm.quantizer
    assert q.is_initialized and q._delta.shape == ((4,) if per_channel else (1,))  # [1]: FSDP2 takes no 0-dim
    assert torch.isfinite(q._delta).all() and y.shape == x.shape
    if estimator == RangeEstimators.MSE:
        assert torch.all(q.x_max < 12.0), "the MSE search clips the outlier instead of covering it"
    if estimator == RangeEstimators.MSE and symmetric:  # a 1-D search reaches the min/max range's error
        minmax = manager(symmetric, RangeEstimators.current_minmax, 4, per_channel)
        assert (y - x).square().mean() <= 1.01 * (minmax(x) - x).square().mean()
    if opt == tquant.OptMethod.grid:
        losses = qm.range_estimator.loss_array.clone()
        qm(x)
        assert torch.equal(qm.range_estimator.loss_array[:, 1:], 2 * losses[:, 1:]), "losses add up over batches"
    qm.range_estimator.reset()
    assert qm.range_estimator.loss_array is None and not qm.range_estimator.has_range


def test_mse_weight_quantizer_from_config():
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(
        4, True, True, RangeEstimators.MSE, tquant.MSEEstimatorParams(tquant.OptMethod.grid, 30))
    tquant.append_default_conversions(qmap)
    qnet = tquant.convert_to_quantized(nn.Sequential(nn.Linear(16, 8)), qmap)
    est = qnet[0].weight_quantizer.range_estimator
    assert isinstance(est, tquant.MSE_Estimator) and est.num_candidates == 30 and est.per_channel
    qnet(torch.randn(2, 16))
    assert qnet[0].weight_quantizer.quantizer._delta.shape == (8,)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_percentile_clips_both_tails(per_channel, backend):
    x = torch.linspace(-10.0, 30.0, 401).repeat(3, 1)
    qm = manager(False, RangeEstimators.current_minmax, 8, per_channel, percentile=5.0)
    qm(x)
    est = qm.range_estimator
    torch.testing.assert_close(est.current_xmin, torch.full_like(est.current_xmin, -8.0))
    torch.testing.assert_close(est.current_xmax, torch.full_like(est.current_xmax, 28.0))
    torch.testing.assert_close(qm.quantizer.x_max.max(), torch.tensor(28.0), atol=36 / 255, rtol=0)
