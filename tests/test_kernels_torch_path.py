"""The torch fast path of every quantizer op against the eager reference (bit for bit)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tquant.kernels as K
from tquant.kernels import reference as ref

from helpers import GRAD_TOL, state_from_range, tie_values

SHAPES = [pytest.param((0,), id="n0"), pytest.param((1,), id="n1"), pytest.param((7,), id="n7"),
          pytest.param((3, 5), id="3x5"), pytest.param((4, 3, 2, 2), id="4x3x2x2")]
BITS = [2, 4, 8, 16]


def _state(x, n_bits, symmetric, axis):
    bmin, bmax = ref.batch_minmax_reference(x, axis)
    return ref.qparams_from_range(bmin, bmax, n_bits, symmetric)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fake_quant_matches_reference(shape, n_bits, symmetric, axis, dtype):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    d, z, s = _state(x, n_bits, symmetric, axis)
    with K.use_backend("torch"):
        y = K.fake_quant(x, d, z, s, n_bits, symmetric, axis)
    expected = ref.fake_quant_reference(x, d, z, s, n_bits, symmetric, axis)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(torch.signbit(y), torch.signbit(expected)), "same bits, sign of zero included"


@pytest.mark.parametrize("n_bits", BITS)
@pytest.mark.parametrize("signed_range", [(-1.0, 1.0), (0.0, 2.0)], ids=["signed", "unsigned"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_ties_round_half_to_even(n_bits, signed_range, symmetric):
    d, z, s = state_from_range(*signed_range, n_bits, symmetric)
    x = tie_values(float(d), n_bits)
    codes = ref.quantize_reference(x, d, z, s, n_bits, symmetric)
    zp = torch.clamp(torch.round(z), 0, 2**n_bits - 1) if not symmetric else torch.tensor(0.0)
    qmin, qmax = ref.grid_bounds(n_bits, symmetric, s)
    half = x / torch.clamp(d, min=ref.EPS)
    expected = torch.clamp(torch.round(half) + zp, qmin, qmax).to(torch.int64)
    assert torch.equal(codes, expected)
    # a tie goes to the even neighbour (checked where x/scale lands exactly on .5)
    exact_half = (half - torch.floor(half)) == 0.5
    inside = (codes > qmin) & (codes < qmax)
    assert torch.all((codes[exact_half & inside] - zp.long()) % 2 == 0)
    with K.use_backend("torch"):
        y = K.fake_quant(x, d, z, s, n_bits, symmetric)
    assert torch.equal(y, ref.fake_quant_reference(x, d, z, s, n_bits, symmetric))


def test_strided_input_matches_contiguous():
    base = torch.randn(6, 10)
    x = base[:, ::3]
    d, z, s = _state(x, 8, False, 0)
    with K.use_backend("torch"):
        y = K.fake_quant(x, d, z, s, 8, False, 0)
    torch.testing.assert_close(y, ref.fake_quant_reference(x.contiguous(), d, z, s, 8, False, 0), rtol=0, atol=0)


@pytest.mark.parametrize("shape, axis", [((1000,), -1), ((7, 5, 9), -1), ((7, 5, 9), 0), ((300,), 0), ((3, 200), 0)],
                         ids=["flat", "3d-tensor", "3d-channel", "1d-channel", "wide-rows"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_blocked_cpu_passes_match_the_reference(monkeypatch, shape, axis, symmetric, dtype, with_mask):
    """Large CPU tensors run the passes block by block (here blocks of 64 elements, with a ragged
    last block; per channel whole rows, or one row wider than a block): same bits, same mask."""
    import importlib

    fq = importlib.import_module("tquant.kernels.fake_quant")
    monkeypatch.setattr(fq, "BLOCK", 64)
    monkeypatch.setattr(fq, "BLOCKED_MIN_NUMEL", 1)
    x = torch.randn(shape) * 3 + 0.5
    x.view(-1)[::37] = float("nan")
    x.view(-1)[3], x.view(-1)[4], x.view(-1)[5] = float("inf"), -float("inf"), -0.0
    x = x.to(dtype)
    d, z, s = _state(x, 4, symmetric, axis)
    y, mask = fq._fake_quant_torch(x, d, z, s, 4, symmetric, axis, with_mask)
    expected = ref.fake_quant_reference(x, d, z, s, 4, symmetric, axis)
    assert y.dtype == dtype and y.shape == x.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].float().view(torch.int32), expected[~nan].float().view(torch.int32))
    if with_mask:
        codes = torch.round(x.float() / ref.param_view(torch.clamp(d, min=ref.EPS), x, axis))
        if not symmetric:
            codes = codes + ref.param_view(torch.clamp(torch.round(z), 0, 15), x, axis)
        qmin, qmax = ref.grid_bounds(4, symmetric, s)
        assert torch.equal(mask, (codes >= qmin) & (codes <= qmax))
    else:
        assert mask.numel() == 0


@pytest.mark.parametrize("numel", [1000, 64, 65, 1], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_cpu_passes_match_the_reference(monkeypatch, numel, symmetric, dtype, threads):
    """Large per-tensor CPU tensors run range and fake quantization chunk by chunk on threads (here chunks
    of 64 elements, a ragged last one): the reference's range, bits and mask, NaN/inf/zeros of both signs."""
    import importlib

    fq, hc = importlib.import_module("tquant.kernels.fake_quant"), importlib.import_module("tquant.kernels.host_chunks")
    monkeypatch.setattr(hc, "CHUNK", 64)
    monkeypatch.setattr(fq, "CHUNKED_MIN_NUMEL", 1)
    monkeypatch.setattr(fq, "HOST_MAX_NUMEL", 0)
    calls = []
    run_chunks = hc.run_chunks
    monkeypatch.setattr(hc, "run_chunks", lambda n, fn: calls.append(n) or run_chunks(n, fn))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = (torch.randn(numel) * 3 + 0.5).to(dtype)
        if numel > 5:
            x[::37], x[3], x[4], x[5] = float("nan"), float("inf"), -float("inf"), -0.0
        state = [torch.full((), math.nan) for _ in range(4)] + [torch.zeros((), dtype=torch.bool)]
        with K.use_backend("torch"):
            K.update_range(x, *state, 4, symmetric, -1, K.ESTIMATOR_RUNNING, 0.9, False)
        bmin, bmax = ref.batch_minmax_reference(x)
        expected = ref.qparams_from_range(bmin, bmax, 4, symmetric)
        assert [float(t) for t in state[:2]] == [float(bmin), float(bmax)] and not torch.signbit(state[1])
        assert all(torch.equal(a, b) for a, b in zip(state[2:], expected))
        y, mask = fq._fake_quant_torch(x, *state[2:], 4, symmetric, -1, True)
    finally:
        torch.set_num_threads(previous)
    assert calls == [numel, numel], "the range and the fake quantization both ran chunk by chunk"
    want = ref.fake_quant_reference(x, *state[2:], 4, symmetric)
    nan = torch.isnan(want)
    assert y.dtype == dtype and torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].float().view(torch.int32), want[~nan].float().view(torch.int32))
    codes = torch.round(x.float() / torch.clamp(state[2], min=ref.EPS))
    if not symmetric:
        codes = codes + torch.clamp(torch.round(state[3]), 0, 15)
    qmin, qmax = ref.grid_bounds(4, symmetric, state[4])
    assert torch.equal(mask, (codes >= qmin) & (codes <= qmax))


LAYOUTS = {
    "nhwc": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted": lambda x: x.permute(2, 0, 3, 1),
    "sliced": lambda x: x[:, ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("numel_scale", [1, 64], ids=["host-size", "torch-size"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ops_keep_the_input_layout(layout, numel_scale, axis, dtype):
    """The ops are tagged ``flexible_layout`` for inductor: y and the mask have ``empty_like(x)``'s
    strides (what the fake kernels promise) and the range comes from any strides without error."""
    x = LAYOUTS[layout](torch.randn(4, 6, 5 * numel_scale, 7).to(dtype))
    assert torch.Tag.flexible_layout in torch.ops.tquant.fake_quant.default.tags
    assert torch.Tag.flexible_layout in torch.ops.tquant.update_range.default.tags
    shape = () if axis < 0 else (x.shape[0],)
    state = [torch.full(shape, float("nan")), torch.full(shape, float("nan")), torch.zeros(shape),
             torch.zeros(shape), torch.zeros((), dtype=torch.bool)]
    with K.use_backend("torch"):
        torch.ops.tquant.update_range.default(x, *state, 8, True, axis, K.ESTIMATOR_CURRENT, 0.0, False)
        y, mask = torch.ops.tquant.fake_quant.default(x, *state[2:], 8, True, axis, True)
    bmin, bmax = ref.batch_minmax_reference(x, axis)
    assert torch.equal(state[0], bmin) and torch.equal(state[1], bmax)
    layout_strides = torch.empty_like(x).stride()
    assert y.stride() == layout_strides and mask.stride() == layout_strides, (y.stride(), mask.stride())
    expected = ref.fake_quant_reference(x, *state[2:], 8, True, axis)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
def test_ste_and_learned_range_gradients_match_autograd_of_reference(symmetric, axis):
    x = torch.randn(6, 9) * 2 + 0.3
    d, z, s = _state(x, 4, symmetric, axis)
    d = (d * 0.7).detach()  # a range narrower than the data: some values clamp
    grad = torch.randn_like(x)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        dd = d.clone().requires_grad_(True)
        zz = z.clone().requires_grad_(not symmetric)
        fn(xx, dd, zz, s, 4, symmetric, axis).backward(grad)
        return xx.grad, dd.grad, zz.grad

    with K.use_backend("torch"):
        got = run(K.fake_quant)
    want = run(ref.fake_quant_reference)
    torch.testing.assert_close(got[0], want[0], **GRAD_TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **GRAD_TOL[torch.float32])
    if not symmetric:
        torch.testing.assert_close(got[2], want[2], **GRAD_TOL[torch.float32])
    assert (got[0] == 0).any(), "some values must fall outside the grid in this case"


@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
@pytest.mark.parametrize("estimator", [K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING],
                         ids=["current", "all", "running"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_update_range_matches_reference(axis, estimator, symmetric):
    shape = () if axis < 0 else (4,)
    state = [torch.empty(shape), torch.empty(shape), torch.empty(shape), torch.empty(shape),
             torch.zeros((), dtype=torch.bool)]
    old_min = old_max = None
    for step in range(3):
        x = torch.randn(4, 6) * (step + 1) + step
        with K.use_backend("torch"):
            K.update_range(x, *state, 8, symmetric, axis, estimator, 0.9, step == 0)
        bmin, bmax = ref.batch_minmax_reference(x, axis)
        old_min, old_max = ref.update_range_reference(bmin, bmax, old_min, old_max, estimator, 0.9, step == 0)
        d, z, s = ref.qparams_from_range(old_min, old_max, 8, symmetric)
        for got, want in zip(state, (old_min, old_max, d, z, s)):
            assert torch.equal(got, want)


def test_running_average_formula_and_signed_flag():
    state = [torch.empty(()) for _ in range(4)] + [torch.zeros((), dtype=torch.bool)]
    K.update_range(torch.tensor([0.0, 2.0]), *state, 8, True, -1, K.ESTIMATOR_RUNNING, 0.9, True)
    assert not state[4] and state[1] == 2.0
    K.update_range(torch.tensor([-1.0, 4.0]), *state, 8, True, -1, K.ESTIMATOR_RUNNING, 0.9, False)
    assert state[0] == (1 - 0.9) * torch.tensor(-1.0) + 0.9 * torch.tensor(0.0)
    assert state[1] == (1 - 0.9) * torch.tensor(4.0) + 0.9 * torch.tensor(2.0)
    assert state[4], "a range below zero makes the symmetric grid signed"
    assert state[2] == torch.maximum(state[0].abs(), state[1]) / 127


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_never_reach_the_scale(backend, bad):
    state = [torch.empty(()) for _ in range(4)] + [torch.zeros((), dtype=torch.bool)]
    x = torch.tensor([-1.0, 0.5, bad, 3.0])
    with K.use_backend(backend):
        K.update_range(x, *state, 8, False, -1, K.ESTIMATOR_RUNNING, 0.9, True)
        assert state[0] == -1.0 and state[1] == 3.0
        K.update_range(torch.full((3,), bad), *state, 8, False, -1, K.ESTIMATOR_RUNNING, 0.9, False)
    assert state[0] == -1.0 and state[1] == 3.0, "a batch without finite values keeps the old range"
    assert torch.isfinite(state[2]) and torch.isfinite(state[3])


NO_FINITE = {"empty": lambda: torch.empty(0, 3), "all-nan": lambda: torch.full((2, 3), math.nan),
             "all-inf": lambda: torch.tensor([[math.inf, -math.inf, math.nan]])}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("estimator", [K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING],
                         ids=["current", "all", "running"])
@pytest.mark.parametrize("make", list(NO_FINITE.values()), ids=list(NO_FINITE))
def test_a_batch_without_finite_values_sets_no_range(backend, estimator, make):
    """No finite value seen: the range stays NaN ("no range yet", not the tiny [0, eps] grid that
    outputs zeros); a real batch then sets it, and a later batch without finite values keeps it."""
    state = [torch.full((), math.nan) for _ in range(4)] + [torch.zeros((), dtype=torch.bool)]
    with K.use_backend(backend):
        for first in (False, True):
            K.update_range(make(), *state, 8, False, -1, estimator, 0.9, first)
            assert all(torch.isnan(t) for t in state[:4]), f"first={first}: {state}"
            assert K.fake_quant(make(), *state[2:], 8, False).shape == make().shape
        K.update_range(torch.tensor([-1.0, 3.0]), *state, 8, False, -1, estimator, 0.9, False)
        assert state[0] == -1.0 and state[1] == 3.0 and state[2] == 4.0 / 255
        K.update_range(make(), *state, 8, False, -1, estimator, 0.9, False)
    assert state[0] == -1.0 and state[1] == 3.0 and state[2] == 4.0 / 255, "kept, whatever the estimator"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_channel_without_finite_values_gets_no_range(backend):
    x = torch.randn(3, 5)
    x[1] = math.nan
    state = [torch.full((3,), math.nan) for _ in range(4)] + [torch.zeros((), dtype=torch.bool)]
    with K.use_backend(backend):
        K.update_range(x, *state, 8, True, 0, K.ESTIMATOR_RUNNING, 0.9, False)
    assert torch.isnan(state[0]).tolist() == [False, True, False] == torch.isnan(state[2]).tolist()


def test_backend_switch_validates_names():
    with pytest.raises(ValueError, match="TQUANT_BACKEND"):
        K.set_backend("cuda-magic")


@settings(max_examples=150, deadline=None)
@given(
    lo=st.floats(-1e4, 1e4, width=32), hi=st.floats(-1e4, 1e4, width=32),
    old_lo=st.floats(-1e4, 1e4, width=32), old_hi=st.floats(-1e4, 1e4, width=32),
    momentum=st.floats(0.0, 0.99), n_bits=st.integers(2, 16), symmetric=st.booleans(),
    estimator=st.sampled_from([K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING]),
)
def test_host_scalar_math_is_the_reference_bit_for_bit(lo, hi, old_lo, old_hi, momentum, n_bits, symmetric,
                                                        estimator):
    x = torch.tensor([lo, hi])
    state = [torch.tensor(old_lo), torch.tensor(old_hi), torch.empty(()), torch.empty(()),
             torch.zeros((), dtype=torch.bool)]
    expected = ref.update_range_reference(*ref.batch_minmax_reference(x), state[0].clone(), state[1].clone(),
                                          estimator, momentum, False)
    expected = (*expected, *ref.qparams_from_range(*expected, n_bits, symmetric))
    with K.use_backend("torch"):
        K.update_range(x, *state, n_bits, symmetric, -1, estimator, momentum, False)
        y = K.fake_quant(x, state[2], state[3], state[4], n_bits, symmetric)
    for got, want in zip(state, expected):
        assert torch.equal(got, want)
    want_y = ref.fake_quant_reference(x, *expected[2:], n_bits, symmetric)
    assert torch.equal(y, want_y) and torch.equal(torch.signbit(y), torch.signbit(want_y))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32),
                            st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32)), min_size=1, max_size=5),
    momentum=st.floats(0.0, 0.99), n_bits=st.integers(2, 16), symmetric=st.booleans(),
    estimator=st.sampled_from([K.ESTIMATOR_CURRENT, K.ESTIMATOR_ALL, K.ESTIMATOR_RUNNING]),
)
def test_host_channel_math_is_the_reference_bit_for_bit(rows, momentum, n_bits, symmetric, estimator):
    t = torch.tensor(rows)
    x, old_lo, old_hi = t[:, :2], t[:, 2].clone(), t[:, 3].clone()
    c = x.shape[0]
    state = [old_lo.clone(), old_hi.clone(), torch.empty(c), torch.empty(c), torch.zeros((), dtype=torch.bool)]
    expected = ref.update_range_reference(*ref.batch_minmax_reference(x, 0), old_lo, old_hi, estimator, momentum,
                                          False)
    expected = (*expected, *ref.qparams_from_range(*expected, n_bits, symmetric))
    with K.use_backend("torch"):
        K.update_range(x, *state, n_bits, symmetric, 0, estimator, momentum, False)
    for got, want in zip(state, expected):
        assert torch.equal(got, want)
