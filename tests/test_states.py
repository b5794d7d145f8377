"""Quantizer states, the eval weight cache, learned ranges and state_dict round trips."""

import io

import pytest
import torch
from torch import nn

import tquant
from tquant.quantization_manager import Qstates

from helpers import small_qmap


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def managers(model):
    return [m for m in model.modules() if isinstance(m, tquant.QuantizationManager)]


def test_default_state_estimates_on_training_forwards_only(backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    act = qnet[0].activation_quantizer
    assert act.state == Qstates.estimate_ranges_train
    qnet(torch.randn(4, 6))
    delta = act.quantizer._delta.clone()
    qnet.eval()
    qnet(torch.randn(4, 6) * 10)
    assert torch.equal(act.quantizer._delta, delta), "eval forwards leave the range alone"
    tquant.estimate_ranges(qnet)
    qnet(torch.randn(4, 6) * 10)
    assert not torch.equal(act.quantizer._delta, delta), "estimate_ranges updates in eval too"


def test_fix_ranges_freezes_and_requires_a_range(backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    tquant.fix_ranges(qnet)  # uninitialised quantizers are skipped, as in aihwkit
    assert all(m.state == Qstates.estimate_ranges_train for m in managers(qnet))
    with pytest.raises(tquant.QuantizerNotInitializedError, match="'0.activation_quantizer'"):
        qnet[0].activation_quantizer.fix_ranges()
    qnet(torch.randn(4, 6))
    tquant.fix_ranges(qnet)
    assert all(m.state == Qstates.fix_ranges for m in managers(qnet))
    before = [m.quantizer._delta.clone() for m in managers(qnet)]
    qnet(torch.randn(4, 6) * 5)
    assert all(torch.equal(b, m.quantizer._delta) for b, m in zip(before, managers(qnet)))


def test_fix_and_estimate_act_or_weight_ranges_separately():
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    qnet(torch.randn(4, 6))
    tquant.fix_act_ranges(qnet)
    assert qnet[0].activation_quantizer.state == Qstates.fix_ranges
    assert qnet[0].weight_quantizer.state == Qstates.estimate_ranges_train
    tquant.fix_weight_ranges(qnet)
    assert qnet[0].weight_quantizer.state == Qstates.fix_ranges
    tquant.estimate_act_ranges(qnet)
    assert qnet[0].activation_quantizer.state == Qstates.estimate_ranges
    tquant.reset_act_ranges(qnet)
    assert not qnet[0].activation_quantizer.is_initialized and qnet[0].weight_quantizer.is_initialized


def test_switches_quantized_and_full_precision():
    net = mlp()
    qnet = tquant.convert_to_quantized(net, small_qmap())
    x = torch.randn(4, 6)
    qnet(x)
    tquant.full_precision(qnet)
    torch.testing.assert_close(qnet(x), net(x))
    tquant.set_quant_state(qnet, weight_quant=True, act_quant=False)
    assert qnet[0]._quant_w and not qnet[0]._quant_a
    tquant.quantized(qnet)
    assert qnet(x).unique().numel() <= 256
    tquant.full_precision_weights(qnet)
    tquant.full_precision_acts(qnet)
    torch.testing.assert_close(qnet(x), net(x))
    tquant.quantized_weights(qnet)
    tquant.quantized_acts(qnet)
    assert qnet[2]._quant_w and qnet[2]._quant_a


def test_layer_methods_match_helpers():
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    qnet(torch.randn(4, 6))
    layer = qnet[0]
    layer.fix_ranges()
    assert layer.weight_quantizer.state == layer.activation_quantizer.state == Qstates.fix_ranges
    layer.estimate_ranges()
    assert layer.weight_quantizer.state == Qstates.estimate_ranges
    layer.estimate_ranges_train()
    assert layer.activation_quantizer.state == Qstates.estimate_ranges_train
    layer.learn_ranges()
    assert layer.weight_quantizer.is_learning() and layer.weight_quantizer.quantizer._delta.requires_grad


def test_eval_cache_reuses_and_invalidates(backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    x = torch.randn(4, 6)
    qnet(x)
    qnet.eval()
    layer = qnet[0]
    calls = []
    layer.weight_quantizer.register_forward_hook(lambda *a: calls.append(1))
    y1 = qnet(x)
    y2 = qnet(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place weight change invalidates the cache
    qnet(x)
    assert len(calls) == 2
    tquant.fix_ranges(qnet)  # a state change too
    qnet(x)
    assert len(calls) == 3
    qnet.train()
    qnet(x)
    qnet.eval()
    qnet(x)
    assert len(calls) == 5
    layer.caching = False
    qnet(x)
    qnet(x)
    assert len(calls) == 7 and layer.cached_params is None


def test_learn_ranges_trains_delta_and_zero_float(backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap(4, 4, symmetric=False))
    x = torch.randn(16, 6)
    qnet(x)
    tquant.learn_ranges(qnet)
    q = qnet[2].activation_quantizer.quantizer
    params = {id(p) for p in qnet.parameters() if p.requires_grad}
    assert id(q._delta) in params and id(q._zero_float) in params
    opt = torch.optim.SGD([p for p in qnet.parameters() if p.requires_grad], lr=0.05)
    before = (q._delta.detach().clone(), q._zero_float.detach().clone())
    qnet(x).square().sum().backward()
    assert q._delta.grad is not None and q._zero_float.grad is not None
    opt.step()
    assert not torch.equal(before[0], q._delta.detach())


def test_learned_range_gradient_matches_reference_autograd(backend):
    qm = tquant.QuantizationManager(tquant.QMethods.asymmetric_uniform, tquant.RangeEstimators.current_minmax,
                                    qparams={"n_bits": 4})
    x = torch.randn(5, 7)
    qm(x)
    qm.learn_ranges()
    q = qm.quantizer
    grad = torch.randn_like(x)
    qm(x).backward(grad)
    d = q._delta.detach().clone().requires_grad_()
    z = q._zero_float.detach().clone().requires_grad_()
    tquant.kernels.reference.fake_quant_reference(x, d, z, q._signed, 4, False).backward(grad)
    torch.testing.assert_close(q._delta.grad, d.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q._zero_float.grad, z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_state_dict_round_trip(per_channel, symmetric, tmp_path):
    qmap = small_qmap(4, 8, symmetric=symmetric, per_channel=per_channel)
    qnet = tquant.convert_to_quantized(mlp(), qmap)
    x = torch.randn(4, 6)
    qnet(x)
    qnet.eval()
    y = qnet(x)
    buffer = io.BytesIO()
    torch.save(qnet.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = tquant.convert_to_quantized(mlp(), qmap)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh(x), y)
    wq = fresh[0].weight_quantizer.quantizer
    assert wq._delta.shape == ((8,) if per_channel else (1,))  # [1]: FSDP2 shards no 0-dim parameter
    assert wq.is_initialized


def test_state_dict_round_trip_of_uninitialised_quantizers():
    qmap = small_qmap()
    qnet = tquant.convert_to_quantized(mlp(), qmap)
    fresh = tquant.convert_to_quantized(mlp(), qmap)
    fresh.load_state_dict(qnet.state_dict())
    assert not any(m.is_initialized for m in managers(fresh))
    fresh.eval()
    with pytest.raises(tquant.QuantizerNotInitializedError):
        fresh(torch.randn(2, 6))
    fresh.train()
    fresh(torch.randn(2, 6))
    assert all(m.is_initialized for m in managers(fresh))


def test_learn_ranges_skips_uninitialised_and_estimate_after_learn_works(backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    tquant.learn_ranges(qnet)
    assert all(not m.is_learning() for m in managers(qnet))
    qnet(torch.randn(3, 6))
    tquant.learn_ranges(qnet)
    tquant.estimate_ranges(qnet)
    qnet(torch.randn(3, 6) * 3)  # writes the (trainable) parameters without an autograd error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_keeps_fp32_quantizer_state(dtype, backend):
    qnet = tquant.convert_to_quantized(mlp(), small_qmap())
    qnet(torch.randn(4, 6))
    qnet.to(dtype)
    states = [t for m in managers(qnet) for t in (m.quantizer._delta, m.range_estimator.current_xmin)]
    assert all(t.dtype == torch.float32 for t in states)
    assert qnet[0].weight.dtype == dtype
    y = qnet(torch.randn(4, 6, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert all(t.dtype == torch.float32 for t in states)
