"""Group-wise weight quantization (issue 20): one (delta, zero point) per output row and group of input features.

The reference (``kernels/group_reference.py``) defines the numerics; the torch lane and the Triton kernels
(interpreter here, compiled on a GPU) must give its bits: values, masks, ranges and parameters, across group
sizes that tile a row or leave a shorter last group, odd shapes, conv weights, fp32/fp16/bf16 and NaN/inf.
At the module level: the state is ``[C, n_groups]`` from conversion on and survives ``state_dict`` round trips,
the min/max, MSE and learned-range estimators work per group, bad group sizes name the layer and the field,
and ``torch.compile``/``torch.export`` trace the ``tquant::group_*`` ops.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import tquant
import tquant.kernels as K
from tquant.kernels import group_quant as G
from tquant.kernels import group_reference as GR
from tquant.kernels import reference as R
from tquant.kernels._triton import HAS_TRITON

from helpers import assert_bits_equal, lane_device
from test_launches import launches  # noqa: F401  (the fixture that records Triton launches)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# (shape, group_len): groups that tile the row, a shorter last group, one group per row, a conv kernel
SHAPES = [
    pytest.param((5, 300), 128, id="5x300-g128"),
    pytest.param((4, 256), 64, id="4x256-g64"),
    pytest.param((7, 33), 16, id="7x33-g16"),
    pytest.param((3, 6, 3, 3), 18, id="conv3x6x3x3-g2ch"),
    pytest.param((2, 20), 32, id="2x20-g32"),
    pytest.param((1, 48), 24, id="1x48-g24"),
]
LANES = ["torch"] + (["triton"] if HAS_TRITON else [])


def poisoned(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    flat[3 % flat.numel()] = float("nan")
    flat[7 % flat.numel()] = float("inf")
    flat[-1] = -float("inf")
    return x.to(dtype)


def state_for(x, group_len, n_bits, symmetric, shrink=0.8):
    bmin, bmax = GR.group_minmax_reference(x, group_len)
    bmin = torch.where(torch.isfinite(bmin), bmin * shrink, torch.zeros_like(bmin))
    bmax = torch.where(torch.isfinite(bmax), bmax * shrink, torch.zeros_like(bmax))
    return R.qparams_from_range(bmin, bmax, n_bits, symmetric)


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_group_per_row_is_the_per_channel_quantizer(symmetric):
    x = poisoned((6, 40))
    d, z, s = state_for(x, 40, 4, symmetric)
    y = GR.group_fake_quant_reference(x, d, z, s, 4, symmetric, 40)
    assert_bits_equal(y, R.fake_quant_reference(x, d[:, 0], z[:, 0], s, 4, symmetric, 0), "one group per row")
    lo, hi = GR.group_minmax_reference(x, 40)
    want = R.batch_minmax_reference(x, 0)
    assert_bits_equal(lo[:, 0], want[0], "min")
    assert_bits_equal(hi[:, 0], want[1], "max")


def test_each_element_uses_its_groups_parameters():
    x = torch.arange(1.0, 11.0).repeat(2, 1)  # [2, 10], groups of 4: 4 + 4 + 2
    delta = torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 8.0]])
    y = GR.group_fake_quant_reference(x, delta, torch.zeros_like(delta), torch.tensor(True), 8, True, 4)
    expected = torch.round(x / GR.expand_groups(delta, 10, 4)) * GR.expand_groups(delta, 10, 4)
    assert torch.equal(y, expected)
    assert GR.group_quantize_reference(x, delta, torch.zeros_like(delta), torch.tensor(True), 8, True, 4)[0, 9] == 2


@pytest.mark.parametrize("shape,size,expected", [
    ((64, 300), 128, (128, 3)),
    ((64, 300), 100, (100, 3)),
    ((8, 3, 5, 5), 1, (25, 3)),
    ((8, 64, 3, 3), 32, (288, 2)),
    ((4, 20), 32, (32, 1)),
])
def test_group_layout(shape, size, expected):
    assert GR.group_layout(shape, size) == expected


@pytest.mark.parametrize("shape,size,match", [
    ((64, 300), 24, "neither a power of two >= 16 nor a divisor of the layer's 300 input features"),
    ((64, 300), 8, "neither a power of two"),
    ((64,), 16, "needs a weight with input features"),
    ((64, 32), 0, "an int >= 1"),
])
def test_group_layout_errors(shape, size, match):
    with pytest.raises(ValueError, match=match):
        GR.group_layout(shape, size)


# --------------------------------------------------------------------------------------------
# torch and Triton lanes against the reference
# --------------------------------------------------------------------------------------------


def _lane(name):
    return K.use_backend("triton" if name == "triton" else "torch")


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape,group_len", SHAPES)
def test_lanes_match_the_reference(lane, shape, group_len, symmetric):
    """Ranges, running updates (current/all/EMA), parameters, values and masks, bit for bit, fp32/fp16."""
    dev = lane_device(lane)
    for dtype in (torch.float32, torch.float16):
        x = poisoned(shape, dtype)
        c, _, ng = GR.group_shape(x, group_len)
        with _lane(lane):
            lo, hi = G.group_minmax(x.to(dev), group_len)
        want_lo, want_hi = GR.group_minmax_reference(x, group_len)
        assert_bits_equal(lo, want_lo, "min")
        assert_bits_equal(hi, want_hi, "max")
        for estimator in (K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING):
            old = torch.full((c, ng), math.nan)
            old[0, 0] = -0.5
            state = [old.clone(), -old.clone(), torch.zeros(c, ng), torch.zeros(c, ng),
                     torch.zeros((), dtype=torch.bool)]
            want = [t.clone() for t in state]
            with K.use_backend("reference"):
                G.group_update_range(x, *want, 4, symmetric, group_len, estimator, 0.9, False)
            state = [t.to(dev) for t in state]
            with _lane(lane):
                G.group_update_range(x.to(dev), *state, 4, symmetric, group_len, estimator, 0.9, False)
            for name, got, ref in zip(("range_min", "range_max", "delta", "zero_float", "signed"), state, want):
                assert_bits_equal(got, ref, f"{name} est={estimator} {dtype}")
        d, z, s = want[2], want[3], want[4]
        with _lane(lane):
            y, mask = G.group_fake_quant_forward(x.to(dev), d.to(dev), z.to(dev), s.to(dev), 4, symmetric,
                                                 group_len, True)
        assert_bits_equal(y, GR.group_fake_quant_reference(x, d, z, s, 4, symmetric, group_len), f"y {dtype}")
        mask = mask.cpu()
        x2 = x.float().reshape(c, -1)
        v = torch.round(x2 / GR.expand_groups(d, x2.shape[1], group_len)) + GR.expand_groups(
            torch.zeros_like(z) if symmetric else torch.clamp(torch.round(z), 0, 15), x2.shape[1], group_len)
        qmin, qmax = R.grid_bounds(4, symmetric, s)
        assert torch.equal(mask.reshape(c, -1), (v >= qmin) & (v <= qmax)), "mask"


def test_torch_lane_bf16_and_strided_input():
    x = poisoned((6, 40)).to(torch.bfloat16)
    d, z, s = state_for(x, 16, 4, False)
    with K.use_backend("torch"):
        y, _ = G.group_fake_quant_forward(x, d, z, s, 4, False, 16, False)
    assert_bits_equal(y, GR.group_fake_quant_reference(x, d, z, s, 4, False, 16), "bf16")
    w = poisoned((40, 6)).t()  # a transposed view: the op sees it in row-major order of its shape
    y = G.group_fake_quant(w, d, z, s, 4, False, 16)
    assert y.is_contiguous()
    assert_bits_equal(y, GR.group_fake_quant_reference(w, d, z, s, 4, False, 16), "strided")


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gradients(lane, symmetric):
    """x: grad * mask exactly (the reference's autograd to float rounding: it multiplies and divides by the scale);
    delta / zero_float: the reference's autograd (LSQ), to float rounding."""
    x = torch.randn(5, 300) * 2
    d, z, s = state_for(x, 128, 4, symmetric, shrink=0.6)
    z = z + 0.3
    g = torch.randn(5, 300)
    xr, dr, zr = (t.clone().requires_grad_() for t in (x, d, z))
    GR.group_fake_quant_reference(xr, dr, zr, s, 4, symmetric, 128).backward(g)
    dev = lane_device(lane)
    xt, dt, zt = (t.to(dev).requires_grad_() for t in (x, d, z))
    with _lane(lane):
        G.group_fake_quant(xt, dt, zt, s.to(dev), 4, symmetric, 128).backward(g.to(dev))
    _, mask = G.group_fake_quant_forward(x, d, z, s, 4, symmetric, 128, True)
    assert torch.equal(xt.grad.cpu(), g * mask)
    torch.testing.assert_close(xt.grad.cpu(), xr.grad)
    torch.testing.assert_close(dt.grad.cpu(), dr.grad, rtol=1e-4, atol=1e-4)
    if not symmetric:
        torch.testing.assert_close(zt.grad.cpu(), zr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_loops_over_many_tiles(monkeypatch):
    """Tiles shrunk so groups span several column steps and several programs share the sign flag."""
    from tquant.kernels import _triton_group as TG

    monkeypatch.setattr(TG, "_MAX_TILE", 16)
    monkeypatch.setattr(TG, "_MAX_BLOCK_T", 8)
    dev = lane_device("triton")
    x = poisoned((9, 70))
    x[0] = x[0].abs()  # the sign flag comes from another program than the first
    for symmetric in (True, False):
        state = [torch.full((9, 3), math.nan), torch.full((9, 3), math.nan), torch.zeros(9, 3), torch.zeros(9, 3),
                 torch.zeros((), dtype=torch.bool)]
        want = [t.clone() for t in state]
        with K.use_backend("reference"):
            G.group_update_range(x, *want, 3, symmetric, 32, K.ESTIMATOR_CURRENT, 0.9, False)
        state = [t.to(dev) for t in state]
        params = [t.to(dev) for t in want[2:]]
        with K.use_backend("triton"):
            G.group_update_range(x.to(dev), *state, 3, symmetric, 32, K.ESTIMATOR_CURRENT, 0.9, False)
            y, _ = G.group_fake_quant_forward(x.to(dev), *params, 3, symmetric, 32, False)
            gd, gz = G.group_fake_quant_range_grads(torch.ones(9, 70, device=dev), x.nan_to_num(0, 1, -1).to(dev),
                                                    *params, 3, symmetric, 32)
        for got, ref in zip(state, want):
            assert_bits_equal(got, ref, "state")
        assert_bits_equal(y, GR.group_fake_quant_reference(x, *want[2:], 3, symmetric, 32), "y")
        rd, rz = G._group_range_grads_torch(torch.ones(9, 70), x.nan_to_num(0, 1, -1), *want[2:], 3, symmetric, 32)
        torch.testing.assert_close(gd.cpu(), rd)
        torch.testing.assert_close(gz.cpu(), rz)


# --------------------------------------------------------------------------------------------
# quantizers and layers
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(300, 32)
        self.conv = nn.Conv2d(6, 4, 3)
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()

    def forward(self, x, img):
        return self.norm(self.fc1(x)), self.conv(img)


def group_qmap(group_size=32, symmetric=True, estimator=tquant.RangeEstimators.current_minmax, params=None):
    qmap = tquant.QuantizationMap()
    w = tquant.WeightQuantConfig(4, symmetric, range_estimator=estimator, range_estimator_params=params,
                                 group_size=group_size)
    qmap.default_qconfig.weight_quant = w
    tquant.append_default_conversions(qmap)
    return qmap


def inputs():
    return torch.randn(5, 300), torch.randn(2, 6, 7, 7)


def test_layers_state_shapes_and_state_dict_round_trip(backend):
    """(``backend``: conftest's fixture, the torch path and the Triton kernels, on the GPU where there is one.)"""
    net = Net()
    qnet = tquant.convert_to_quantized(net, group_qmap())
    fc1, conv = qnet.fc1.weight_quantizer, qnet.conv.weight_quantizer
    assert fc1.quantizer._delta.shape == (32, 10) and fc1.range_estimator.current_xmin.shape == (32, 10)
    assert conv.quantizer._delta.shape == (4, 1) and conv.quantizer.group_len == 32 * 9  # 6 channels: one group
    blank = {k: v.clone() for k, v in qnet.state_dict().items()}  # uninitialised: NaN, the same shapes
    qnet(*inputs())
    w = qnet.fc1.weight
    expected = GR.group_fake_quant_reference(w, fc1.quantizer._delta, fc1.quantizer._zero_float,
                                             fc1.quantizer._signed, 4, True, 32)
    qnet.eval()
    assert_bits_equal(qnet.fc1.get_params()[0], expected, "layer weight")
    trained = qnet.state_dict()
    again = tquant.convert_to_quantized(net, group_qmap())
    again.load_state_dict(blank)
    assert not again.fc1.weight_quantizer.is_initialized
    again.load_state_dict(trained)
    again.eval()
    x = inputs()
    for a, b in zip(again(*x), qnet(*x)):
        assert torch.equal(a, b)
    bad = dict(trained, **{"fc1.weight_quantizer.quantizer._delta": torch.ones(32, 9)})
    with pytest.raises(RuntimeError, match=r"fc1.weight_quantizer: .*shape \(32, 9\).*\(32, 10\)"):
        again.load_state_dict(bad)


@pytest.mark.parametrize("group_size,layer,match", [
    (24, "fc1", "WeightQuantConfig.group_size=24 is neither a power of two >= 16 nor a divisor"),
    (32, "norm", "WeightQuantConfig.group_size=32: group-wise quantization needs a weight with input features"),
])
def test_bad_group_size_names_the_layer_and_field(group_size, layer, match):
    with pytest.raises(ValueError, match=rf"converting layer '{layer}'.*{match}"):
        tquant.convert_to_quantized(Net(norm=True), group_qmap(group_size))


def test_config_checks():
    with pytest.raises(tquant.QuantizationConfigError, match="group_size must be None or an int >= 1"):
        tquant.WeightQuantConfig(4, group_size=-3)
    cfg = tquant.WeightQuantConfig(4, group_size=64)
    assert cfg.group_size == 64 and "group_size=64" in repr(cfg) and cfg != tquant.WeightQuantConfig(4)
    for est, params, what in ((tquant.RangeEstimators.cross_entropy, None, "cross_entropy"),
                              (tquant.RangeEstimators.current_minmax, tquant.CurrentMinMaxEstimatorParams(1.0),
                               "a percentile")):
        qmap = group_qmap(estimator=est, params=params)
        match = f"group_size: group-wise ranges do not support {what}"
        with pytest.raises(tquant.QuantizationConfigError, match=match):
            tquant.convert_to_quantized(Net(), qmap)


@pytest.mark.parametrize("estimator", ["running_minmax", "MSE"])
def test_estimators_per_group(estimator):
    """Running min/max: the EMA per group; MSE: each group searched as a per-channel row (its result equals the
    per-channel search on the rows of the ``[C * n_groups, group_len]`` view)."""
    torch.manual_seed(0)
    params = tquant.MSEEstimatorParams(tquant.OptMethod.golden_section) if estimator == "MSE" else None
    # (the asymmetric golden-section search takes seconds even per channel: the symmetric one here)
    symmetric = estimator == "MSE"
    qmap = group_qmap(symmetric=symmetric, estimator=tquant.RangeEstimators[estimator], params=params)
    qnet = tquant.convert_to_quantized(Net(), qmap)
    manager = qnet.fc1.weight_quantizer
    x = inputs()
    qnet(*x)
    w = qnet.fc1.weight.detach()
    if estimator == "running_minmax":
        lo, hi = GR.group_minmax_reference(w, 32)
        assert torch.equal(manager.range_estimator.current_xmin, lo)
        with torch.no_grad():
            qnet.fc1.weight.mul_(2)
        qnet(*x)
        assert_bits_equal(manager.range_estimator.current_xmin, R.ema_range(lo * 2, lo, 0.9), "EMA")
    else:
        from tquant.kernels import range_search as rs

        rows = G.group_rows(w, 32)
        space = dataclasses.replace(rs.define_search_space(w, 4, True, True, 100, 0.5), channels=rows.shape[0])
        lo, hi = rs.golden_section_range(rows, space, 4, True)
        assert torch.equal(manager.range_estimator.current_xmin, lo.reshape(32, 10))
        d, z, s = R.qparams_from_range(lo.reshape(32, 10), hi.reshape(32, 10), 4, True)
        assert torch.equal(manager.quantizer._delta, d)


def test_learned_ranges_train_each_groups_scale():
    qnet = tquant.convert_to_quantized(Net(), group_qmap(symmetric=False))
    x = inputs()
    qnet(*x)
    tquant.learn_ranges(qnet)
    q = qnet.fc1.weight_quantizer.quantizer
    assert q._delta.requires_grad and q._zero_float.requires_grad
    opt = torch.optim.SGD(qnet.parameters(), lr=1e-3)
    before = q._delta.detach().clone()
    sum(y.square().mean() for y in qnet(*x)).backward()
    assert q._delta.grad.shape == (32, 10) and q._delta.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(q._delta, before)


def test_export_traces_the_group_op():
    qnet = tquant.convert_to_quantized(Net(), group_qmap(symmetric=False))
    qnet(*inputs())
    qnet.eval()
    exported = torch.export.export(qnet, inputs())
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "tquant.group_fake_quant.default" in targets, sorted(targets)
    x = inputs()
    for a, b in zip(exported.module()(*x), qnet(*x)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_triton_launches_per_call(launches, symmetric):  # noqa: F811 (the imported fixture)
    """Training forward with range estimation: two launches (symmetric: the second also computes delta);
    backward: none (``grad * mask``); fixed ranges: one; learned ranges' backward: one reduction."""
    qmethod = tquant.QMethods.symmetric_uniform if symmetric else tquant.QMethods.asymmetric_uniform
    dev = lane_device("triton")
    qm = tquant.QuantizationManager(qmethod, tquant.RangeEstimators.running_minmax, n_channels=6,
                                    qparams={"n_bits": 4, "group_size": 32, "weight_shape": (6, 100)}).to(dev)
    x = torch.randn(6, 100, device=dev, requires_grad=True)
    qm(x)
    launches.clear()
    y = qm(x)
    assert launches == ["_group_range_kernel", "_group_fake_quant_kernel"], launches
    want = torch.full((6, 4), math.nan), torch.full((6, 4), math.nan)
    ref_state = [*want, torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros((), dtype=torch.bool)]
    with K.use_backend("reference"):
        for _ in range(2):
            G.group_update_range(x.detach().cpu(), *ref_state, 4, symmetric, 32, K.ESTIMATOR_RUNNING, 0.9, False)
    q = qm.quantizer
    got = (qm.range_estimator.current_xmin, qm.range_estimator.current_xmax, q._delta, q._zero_float, q._signed)
    for have, ref in zip(got, ref_state):
        assert_bits_equal(have, ref, "state after the fused training forward")
    assert_bits_equal(y, GR.group_fake_quant_reference(x.detach().cpu(), *ref_state[2:], 4, symmetric, 32), "y")
    launches.clear()
    y.sum().backward()
    assert launches == []
    qm.fix_ranges()
    launches.clear()
    qm(x)
    assert launches == ["_group_fake_quant_kernel"]
    qm.learn_ranges()
    y = qm(x)
    launches.clear()
    y.sum().backward()
    assert launches == ["_group_range_grads_kernel"]
