"""FP8 fake quantization (issue 20): ``fmt="fp8_e4m3"`` / ``"fp8_e5m2"`` on weight and activation configs.

The reference (``kernels/fp8_reference.py``: ``scale * fp8(clamp(x / scale, -max, max))``, round to nearest
even as ``Tensor.to(float8)``) against the torch lane and the Triton kernel (whose rounding is built from the
fp32 bits) on every FP8 value, every midpoint between neighbours and the values just beside them, subnormals,
zeros of both signs, saturation and NaN/inf, per tensor and per channel, in every layout; ranges, gradients,
config errors, and the layers (plus ``torch.compile`` of a model mixing group-wise and FP8 quantizers).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tquant
import tquant.kernels as K
from tquant.kernels import fp8 as F8
from tquant.kernels import fp8_reference as FR
from tquant.kernels import reference as R
from tquant.kernels._triton import HAS_TRITON

from helpers import assert_bits_equal, lane_device
from test_launches import launches  # noqa: F401  (the fixture that records Triton launches)

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]  # the interpreter's numpy
LANES = ["torch"] + (["triton"] if HAS_TRITON else [])
FORMATS = list(FR.FP8_DTYPES)


def sweep(fmt: str) -> torch.Tensor:
    """Every finite FP8 value, the midpoints between neighbours (ties) and the fp32 values beside them, zeros,
    fp32 subnormals, values beyond the format, infinities and NaN."""
    values = torch.arange(256, dtype=torch.uint8).view(FR.FP8_DTYPES[fmt]).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    inf = torch.tensor(float("inf"))
    edge = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, float("inf"), -float("inf"), float("nan")])
    return torch.cat([values, mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), edge,
                      torch.randn(2000) * 50, torch.randn(1000) * 1e-3])


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_value_rounds_as_the_reference(lane, fmt):
    x, dev = sweep(fmt), lane_device(lane)
    for delta in (torch.tensor(1.0), torch.tensor(0.37), torch.tensor(1e-12)):  # the last clamps to EPS
        want = FR.fp8_fake_quant_reference(x, delta, fmt)
        with K.use_backend(lane):
            y, mask = F8.fp8_fake_quant_forward(x.to(dev), delta.to(dev), fmt, -1, True)
        assert_bits_equal(y, want, f"{fmt} delta={float(delta)}")
        v = x / torch.clamp(delta, min=K.EPS)
        assert torch.equal(mask.cpu(), (v >= -FR.fp8_max(fmt)) & (v <= FR.fp8_max(fmt)))


def test_reference_is_the_saturating_cast():
    x = torch.tensor([500.0, -1e6, float("inf"), 60000.0, 0.0012])
    assert FR.fp8_fake_quant_reference(x, torch.tensor(1.0), "fp8_e4m3").tolist() == [
        448.0, -448.0, 448.0, 448.0, 0.001953125]
    assert FR.fp8_fake_quant_reference(x, torch.tensor(1.0), "fp8_e5m2").tolist() == [
        512.0, -57344.0, 57344.0, 57344.0, 0.001220703125]
    delta = FR.fp8_qparams_from_range(torch.tensor([-3.0, 0.5]), torch.tensor([2.0, 0.7]), "fp8_e4m3")
    assert torch.equal(delta, torch.tensor([3.0, 0.7]) / 448.0)


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_channel_layouts(lane, layout, dtype):
    x = torch.randn(4, 3, 5, 5) * 30
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, ::2]
    x = x.to(dtype)
    delta = torch.rand(4) * 0.2 + 0.01
    dev = lane_device(lane)
    with K.use_backend(lane):
        y, mask = F8.fp8_fake_quant_forward(x.to(dev), delta.to(dev), "fp8_e4m3", 0, True)
    assert y.stride() == torch.empty_like(x.to(dev)).stride() and mask.stride() == y.stride()
    assert_bits_equal(y, FR.fp8_fake_quant_reference(x, delta, "fp8_e4m3", 0), layout)


def test_torch_lane_bf16():
    x = (torch.randn(64) * 10).to(torch.bfloat16)
    with K.use_backend("torch"):
        y = F8.fp8_fake_quant(x, torch.tensor(0.05), "fp8_e5m2")
    assert_bits_equal(y, FR.fp8_fake_quant_reference(x, torch.tensor(0.05), "fp8_e5m2"), "bf16")


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_range_update(lane, axis):
    x = torch.randn(6, 10) * 4
    x[1, 3] = float("nan")
    shape = (6,) if axis == 0 else ()
    dev = lane_device(lane)
    for estimator in (K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING):
        old = torch.full(shape, 0.25)
        state = [t.clone().to(dev) for t in (-old, old, torch.zeros(shape))]
        with K.use_backend(lane):
            F8.fp8_update_range(x.to(dev), *state, "fp8_e5m2", axis, estimator, 0.9, False)
        lo, hi = R.batch_minmax_reference(x, axis)
        new_lo, new_hi = R.update_range_reference(lo, hi, -old, old, estimator, 0.9)
        assert_bits_equal(state[0], new_lo, "min")
        assert_bits_equal(state[1], new_hi, "max")
        assert_bits_equal(state[2], FR.fp8_qparams_from_range(new_lo, new_hi, "fp8_e5m2"), "delta")


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_gradients(lane, axis):
    x = torch.randn(5, 40) * 3
    delta = torch.full((5,) if axis == 0 else (), 2.0 / 448)  # some values saturate
    g = torch.randn(5, 40)
    xr, dr = x.clone().requires_grad_(), delta.clone().requires_grad_()
    FR.fp8_fake_quant_reference(xr, dr, "fp8_e4m3", axis).backward(g)
    dev = lane_device(lane)
    xt, dt = x.to(dev).requires_grad_(), delta.to(dev).requires_grad_()
    with K.use_backend(lane):
        F8.fp8_fake_quant(xt, dt, "fp8_e4m3", axis).backward(g.to(dev))
    inside = (x / delta.reshape(-1, 1) if axis == 0 else x / delta).abs() <= 448
    assert torch.equal(xt.grad.cpu(), g * inside)
    torch.testing.assert_close(xt.grad.cpu(), xr.grad)
    torch.testing.assert_close(dt.grad.cpu(), dr.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_bits=4, fmt="fp8_e4m3"), "is an 8-bit format: set n_bits=8"),
    (dict(n_bits=8, symmetric=False, fmt="fp8_e4m3"), "has no zero point: set symmetric=True"),
    (dict(n_bits=8, fmt="fp8_e5m2", group_size=32), "group-wise scales are for fmt='int'"),
    (dict(n_bits=8, fmt="fp8_e4m3", range_estimator=tquant.RangeEstimators.MSE), "searches integer grids"),
])
def test_config_errors_name_the_field(kwargs, match):
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(**kwargs)
    tquant.append_default_conversions(qmap)
    with pytest.raises(tquant.QuantizationConfigError, match=rf"converting layer '0'.*WeightQuantConfig.*{match}"):
        tquant.convert_to_quantized(nn.Sequential(nn.Linear(8, 4)), qmap)
    with pytest.raises(tquant.QuantizationConfigError, match="fmt: unknown format 'fp4'"):
        tquant.ActivationQuantConfig(8, fmt="fp4")


def test_fp8_layers():
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, per_channel=True, fmt="fp8_e4m3")
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8, fmt="fp8_e5m2")
    tquant.append_default_conversions(qmap)
    qnet = tquant.convert_to_quantized(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), qmap)
    with pytest.raises(tquant.QuantizerNotInitializedError, match="0.weight_quantizer"):
        qnet.eval()(torch.randn(2, 16))
    qnet.train()
    x = torch.randn(32, 16)
    y0 = qnet[0](x)  # a second training forward would move the running range
    y = qnet[2](qnet[1](y0))
    wq, aq = qnet[0].weight_quantizer.quantizer, qnet[0].activation_quantizer.quantizer
    assert wq._delta.shape == (8,) and aq._delta.shape == (1,)  # [1]: FSDP2 takes no 0-dim parameter
    assert torch.equal(wq._delta, qnet[0].weight.detach().abs().amax(dim=1) / 448)
    assert torch.equal(wq.x_max, wq.scale * 448) and wq.int_min == -448
    w = FR.fp8_fake_quant_reference(qnet[0].weight, wq._delta, "fp8_e4m3", 0)
    h = FR.fp8_fake_quant_reference(nn.functional.linear(x, w, qnet[0].bias), aq._delta, "fp8_e5m2")
    assert torch.equal(y0, h)
    y.sum().backward()
    state = qnet.state_dict()
    twin = tquant.convert_to_quantized(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), qmap)
    twin.load_state_dict(state)
    qnet.eval()
    twin.eval()
    assert torch.equal(twin(x), qnet(x))


def test_compiled_qat_matches_eager_with_group_and_fp8_quantizers():
    """One model, both formats: group-wise asymmetric W4 (g16) in the first Linear, FP8 weights (per channel) and
    activations in the second. Compiled training steps (estimating, then learned ranges) equal eager's bits."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    qmap = tquant.QuantizationMap()
    qmap.instance_qconfig_map["0"] = tquant.QuantizedModuleConfig(tquant.QuantLinear, tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(8), tquant.WeightQuantConfig(4, False, group_size=16)))
    qmap.instance_qconfig_map["2"] = tquant.QuantizedModuleConfig(tquant.QuantLinear, tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(8, fmt="fp8_e5m2"), tquant.WeightQuantConfig(8, True, True, fmt="fp8_e4m3")))
    eager = tquant.convert_to_quantized(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)), qmap)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    for step in range(3):
        if step == 2:
            tquant.learn_ranges(eager)
            tquant.learn_ranges(twin)
        x = torch.randn(8, 64)
        twin.load_state_dict(eager.state_dict())
        y_e, y_c = eager(x), compiled(x)
        assert torch.equal(y_e, y_c), f"step {step}"
        y_e.square().mean().backward()
        y_c.square().mean().backward()
        for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, msg=f"step {step}: {name}")
        for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name}"
    assert eager[0].weight_quantizer.quantizer._delta.grad.shape == (48, 4)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kernels_bf16_and_large(dtype):
    """Compiled kernels (GPU numerics: approximate division, FMA contraction, flush to zero would all show)
    on 2^20 values per format, and the group-wise ops in bf16, against the reference on the CPU."""
    from tquant.kernels import group_quant as G
    from tquant.kernels import group_reference as GR

    with K.use_backend("triton"):
        for fmt in FORMATS:
            x = torch.cat([sweep(fmt), torch.randn(1 << 20) * 30]).to(dtype)
            delta = torch.tensor(0.37)
            y, _ = F8.fp8_fake_quant_forward(x.cuda(), delta.cuda(), fmt, -1, False)
            assert_bits_equal(y, FR.fp8_fake_quant_reference(x, delta, fmt), f"{fmt} {dtype}")
        w = (torch.randn(4096, 1000) * 0.05).to(dtype)
        for symmetric in (True, False):
            lo, hi = GR.group_minmax_reference(w, 128)
            d, z, s = R.qparams_from_range(lo, hi, 4, symmetric)
            y, _ = G.group_fake_quant_forward(w.cuda(), d.cuda(), z.cuda(), s.cuda(), 4, symmetric, 128, False)
            assert_bits_equal(y, GR.group_fake_quant_reference(w, d, z, s, 4, symmetric, 128), f"group {dtype}")
            state = [torch.full((4096, 8), float("nan"), device="cuda") for _ in range(2)] + [
                torch.zeros(4096, 8, device="cuda") for _ in range(2)] + [torch.zeros((), dtype=torch.bool,
                                                                                        device="cuda")]
            G.group_update_range(w.cuda(), *state, 4, symmetric, 128, K.ESTIMATOR_RUNNING, 0.9, False)
            for got, want in zip(state, (lo, hi, d, z, s)):
                assert_bits_equal(got, want, f"group state {dtype}")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_launches_per_call(launches):  # noqa: F811 (the imported fixture)
    """Training forward: two launches (the integer range kernel with the FP8 grid, then the fake quant), and
    the state equals the reference's; fixed ranges: one launch."""
    dev = lane_device("triton")
    qm = tquant.QuantizationManager(tquant.QMethods.symmetric_uniform, tquant.RangeEstimators.running_minmax,
                                    per_channel=True, n_channels=6, qparams={"n_bits": 8, "fmt": "fp8_e4m3"}).to(dev)
    x = torch.randn(6, 50, device=dev, requires_grad=True)
    qm(x)
    launches.clear()
    y = qm(x)
    assert launches == ["_update_range_kernel", "_fp8_fake_quant_kernel"], launches
    lo, hi = R.batch_minmax_reference(x.detach().cpu(), 0)  # the same batch twice: its EMA with itself
    delta = FR.fp8_qparams_from_range(R.ema_range(lo, lo, 0.9), R.ema_range(hi, hi, 0.9), "fp8_e4m3")
    assert_bits_equal(qm.quantizer._delta, delta, "delta")
    assert_bits_equal(y, FR.fp8_fake_quant_reference(x.detach().cpu(), delta, "fp8_e4m3", 0), "y")
    qm.fix_ranges()
    launches.clear()
    qm(x)
    assert launches == ["_fp8_fake_quant_kernel"]
