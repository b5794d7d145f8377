"""The planned quantizer call (``tquant.kernels.quantizer_call``) against the eager reference.

Every lane — ``numba`` (small contiguous fp32 CPU tensors, per tensor, when numba is installed),
``host`` (the numpy lane for those and fp16 ones), ``torch`` (everything else on the torch path)
and, where Triton is present, ``triton`` (interpreter on CPU tensors) — must give the reference
backend's outputs and quantizer state bit for bit, over several steps of each estimator,
including batches with NaN/inf and the first, initialising step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tquant
import tquant.kernels as K
from tquant.kernels import quantizer_call as QC
from tquant.kernels import reference as R
from tquant.kernels._triton import HAS_TRITON, INTERPRET
from tquant.kernels.host_math import F32, qparams_f32, update_range_f32
from tquant.kernels.quantizer_call import HOST_MAX_NUMEL

from helpers import assert_bits_equal

ESTIMATORS = [tquant.RangeEstimators.current_minmax, tquant.RangeEstimators.allminmax,
              tquant.RangeEstimators.running_minmax]
HAS_NUMBA = QC.numba_lane_ready()
"""numba imports and compiles the host kernels here (else its tests skip, and the numpy lane runs)."""
STATE_NAMES = ("delta", "zero_float", "signed", "range_min", "range_max")
HOST_LANES = (["numba"] if HAS_NUMBA else []) + ["host"]
LANES = HOST_LANES + ["torch"] + (["triton"] if HAS_TRITON and (INTERPRET or torch.cuda.is_available()) else [])


@pytest.fixture
def lane_switch(monkeypatch):
    """``lane_switch(lane)``: plans made after it take the numpy ``host`` lane rather than ``numba``
    when ``lane`` is ``"host"`` (``TQUANT_NUMBA=0``)."""
    return lambda lane: monkeypatch.setattr(QC, "USE_NUMBA", lane != "host")


def expected_lane(lane: str, x: torch.Tensor) -> str:
    """The numba lane takes fp32 only: its fp16 inputs take the numpy host lane."""
    return "host" if lane == "numba" and x.dtype != torch.float32 else lane


def manager(symmetric, estimator, per_channel, n_bits=8):
    qmethod = tquant.QMethods.symmetric_uniform if symmetric else tquant.QMethods.asymmetric_uniform
    return tquant.QuantizationManager(qmethod, estimator, per_channel=per_channel, qparams={"n_bits": n_bits}).train()


def batches(lane: str, per_channel: bool):
    """Inputs for ``lane``: the host lane takes small contiguous fp32/fp16 tensors per tensor."""
    torch.manual_seed(0)
    shape = (6, 35)
    make = {
        "host": lambda s: torch.randn(shape) * s,
        "numba": lambda s: torch.randn(shape) * s,
        "torch": lambda s: (torch.randn(shape[1], shape[0]) * s).t(),  # strided: never the host lane
        "triton": lambda s: torch.randn(shape) * s,
    }[lane]
    xs = [make(1.0), make(3.0) + 1.0, make(0.5).abs()]
    bad = make(2.0)
    bad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    xs.append(bad)
    if lane in HOST_LANES and not per_channel:
        xs.append(make(1.5).half())
    return [x.cuda() if lane == "triton" and torch.cuda.is_available() else x for x in xs]


def state(qm):
    q, est = qm.quantizer, qm.range_estimator
    return [q._delta, q._zero_float, q._signed, est.current_xmin, est.current_xmax]


LANE_CASES = [pytest.param(lane, pc, id=f"{lane}-{'channel' if pc else 'tensor'}")
              for lane in LANES for pc in (False, True) if not (lane in HOST_LANES and pc)]  # per tensor only


@pytest.mark.parametrize("lane, per_channel", LANE_CASES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_lane_matches_reference(lane, per_channel, symmetric, estimator, lane_switch):
    lane_switch(lane)
    qm, ref = manager(symmetric, estimator, per_channel), manager(symmetric, estimator, per_channel)
    for step, x in enumerate(batches(lane, per_channel)):
        xr = x.detach().clone().requires_grad_(True)
        xq = x.detach().clone().requires_grad_(True)
        with K.use_backend("triton" if lane == "triton" else "torch"):
            y = qm(xq)
        call = next(c for k, c in qm._calls.items() if k[0] == x.shape and k[1] == x.stride() and k[2] == x.dtype)
        assert call.lane == expected_lane(lane, x), (call.lane, lane)
        with K.use_backend("reference"):
            y_ref = ref(xr.to(ref.quantizer._delta.device))
        assert_bits_equal(y, y_ref, f"step {step}: y")
        for name, a, b in zip(("delta", "zero_float", "signed", "range_min", "range_max"), state(qm), state(ref)):
            assert_bits_equal(a, b, f"step {step}: {name}")
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g.to(y_ref.device))
        torch.testing.assert_close(xq.grad.cpu(), xr.grad.cpu(), rtol=1e-6, atol=1e-6)  # grad * mask vs (g * s) / s


def test_each_input_takes_its_lane():
    qm = manager(True, tquant.RangeEstimators.running_minmax, False)
    qm(torch.randn(HOST_MAX_NUMEL + 1))
    qm(torch.randn(8, 8).bfloat16())
    qm(torch.randn(8, 8).half())
    with K.use_backend("torch"):
        qm(torch.randn(8, 8))
    lanes = {(tuple(key[0]), key[2]): call.lane for key, call in qm._calls.items()}
    assert lanes == {((HOST_MAX_NUMEL + 1,), torch.float32): "torch", ((8, 8), torch.bfloat16): "torch",
                     ((8, 8), torch.float16): "host", ((8, 8), torch.float32): HOST_LANES[0]}


@pytest.mark.parametrize("lane", HOST_LANES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_host_lanes_match_reference_in_every_state(lane, symmetric, lane_switch):
    """Training forwards with and without autograd, eval, ``fix_ranges`` and ``learn_ranges`` (the
    gradients of ``delta`` and ``zero_float`` too): the host lanes give the reference's bits."""
    lane_switch(lane)
    est = tquant.RangeEstimators.running_minmax
    qm, ref = manager(symmetric, est, False, n_bits=4), manager(symmetric, est, False, n_bits=4)
    steps = [("train", True), ("train", False), ("eval", False), ("fix", True), ("learn", True), ("eval", True)]
    for step, (mode, grad) in enumerate(steps):
        x = torch.randn(5, 7) * (step + 1) - 0.5
        x[0, 0] = 0.5 * float(qm.quantizer._delta.detach()) if qm.is_initialized else 0.0  # a tie, once there is a grid
        for m in (qm, ref):
            {"train": m.train, "eval": m.eval, "fix": m.fix_ranges, "learn": m.learn_ranges}[mode]()
        outs = []
        for m, backend in ((qm, "torch"), (ref, "reference")):
            xi = x.clone().requires_grad_(grad)
            with K.use_backend(backend), torch.set_grad_enabled(grad):
                y = m(xi)
            if grad:
                y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
            outs.append((y, xi.grad, m.quantizer._delta.grad, m.quantizer._zero_float.grad))
        assert next(iter(qm._calls.values())).lane == lane
        assert_bits_equal(outs[0][0], outs[1][0], f"{mode}: y")
        for name, a, b in zip(("x", "delta", "zero_float"), outs[0][1:], outs[1][1:]):
            assert (a is None) == (b is None), f"{mode}: grad of {name}"
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{mode}: grad of {name}")
        for name, a, b in zip(("delta", "zero_float", "signed", "range_min", "range_max"), state(qm), state(ref)):
            assert_bits_equal(a.detach(), b.detach(), f"{mode}: {name}")
        for m in (qm, ref):
            m.quantizer.zero_grad()


float32s = st.floats(width=32)
"""Any float32, NaN and infinities included."""


def in_grid(x, delta, zero_float, signed, n_bits, symmetric):
    """The reference's in-range mask: ``round(x / scale) + zp`` within ``[qmin, qmax]`` (NaN: False)."""
    scale, zp = R.scale_and_zero_point(delta, zero_float, n_bits, symmetric)
    qmin, qmax = R.grid_bounds(n_bits, symmetric, signed)
    v = torch.round(x / scale) + zp
    return (v >= qmin) & (v <= qmax)


@pytest.mark.skipif(not HAS_NUMBA, reason="the numba lane is off here (numba missing, or TQUANT_NUMBA=0)")
@settings(max_examples=300, deadline=None)
@given(values=st.lists(float32s, max_size=40), ties=st.lists(st.integers(-300, 300), max_size=8),
       old=st.one_of(st.just((math.nan, math.nan)), st.tuples(float32s, float32s)),
       estimator=st.sampled_from([0, 1, 2]), momentum=st.sampled_from([0.9, 0.37, 0.0]),
       n_bits=st.sampled_from([2, 4, 8, 16]), symmetric=st.booleans())
def test_numba_kernels_are_the_reference_bit_for_bit(values, ties, old, estimator, momentum, n_bits, symmetric):
    """``host_jit.train_kernel`` (range, parameters, values, mask) on any float32 input, and
    ``fake_quant_kernel`` on it plus the half-way cases of the new grid, against the reference."""
    from tquant.kernels import host_jit

    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    x, old_min, old_max = f32(values), f32(old[0]), f32(old[1])
    new_min, new_max = R.update_range_reference(*R.batch_minmax_reference(x), old_min, old_max, estimator, momentum)
    params = R.qparams_from_range(new_min, new_max, n_bits, symmetric)
    state = [torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.bool), old_min.clone(), old_max.clone()]
    y, mask = torch.empty_like(x), torch.empty_like(x)
    host_jit.train_kernel(x.numpy(), y.numpy(), mask.numpy(), *(t.numpy() for t in state), n_bits, symmetric,
                          estimator, momentum)
    for name, got, want in zip(STATE_NAMES, state, (*params, new_min, new_max)):
        assert_bits_equal(got, want, name)
    xt = torch.cat([x, (f32(ties) + 0.5) * torch.clamp(params[0], min=R.EPS)])
    yt, mask_t = torch.empty_like(xt), torch.empty(xt.shape, dtype=torch.bool)
    host_jit.fake_quant_kernel(xt.numpy(), yt.numpy(), mask_t.numpy(), *(t.numpy() for t in state[:3]), n_bits,
                               symmetric)
    for what, inp, got, got_mask in (("train", x, y, mask), ("fake quant", xt, yt, mask_t)):
        assert_bits_equal(got, R.fake_quant_reference(inp, *params, n_bits, symmetric), f"{what}: y")
        assert torch.equal(got_mask.bool(), in_grid(inp, *params, n_bits, symmetric)), f"{what}: mask"


def test_numba_that_cannot_compile_leaves_the_numpy_lane(monkeypatch):
    """A numba whose kernels fail to compile warns once; small CPU tensors then take the host lane."""
    pytest.importorskip("numba")
    from tquant.kernels import host_jit

    def broken(*args):
        raise RuntimeError("no LLVM target")

    monkeypatch.setattr(QC, "USE_NUMBA", True)
    monkeypatch.setattr(QC, "_NUMBA_OK", None)
    monkeypatch.setattr(host_jit, "train_kernel", broken)
    with pytest.warns(RuntimeWarning, match="numba cannot compile the host kernels.*no LLVM target"):
        qm = manager(True, tquant.RangeEstimators.running_minmax, False)
        qm(torch.randn(4, 4))
    qm(torch.randn(3, 3))  # no second warning
    assert {call.lane for call in qm._calls.values()} == {"host"}


ZERO_BATCHES = {
    "neg-zero-among-zeros": [1.0] * 37 + [-0.0] + [0.0] * 4,  # torch's amin returns -0.0 here
    "zero-among-neg-zeros": [-0.0] * 20 + [0.0] + [-0.0] * 21,
    "all-neg-zero": [-0.0] * 42,
}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("values", list(ZERO_BATCHES.values()), ids=list(ZERO_BATCHES))
def test_a_zero_batch_extreme_is_positive_zero_on_every_lane(lane, values, lane_switch):
    """Which of -0.0 / +0.0 a min/max reduction returns depends on its order; the reference makes a
    zero extreme +0.0, and every lane gives its state bits (``zero_float``'s sign follows)."""
    lane_switch(lane)
    v = torch.tensor(values)
    x = v.reshape(7, 6).t() if lane == "torch" else v.reshape(6, 7)  # strided: the torch lane
    x = x.cuda() if lane == "triton" and torch.cuda.is_available() else x
    qm, ref = manager(False, tquant.RangeEstimators.current_minmax, False), manager(False, ESTIMATORS[0], False)
    with K.use_backend("triton" if lane == "triton" else "torch"):
        qm(x)
    assert next(iter(qm._calls.values())).lane == lane
    with K.use_backend("reference"):
        ref(x.cpu())
    for name, a, b in zip(STATE_NAMES, state(qm), state(ref)):
        assert_bits_equal(a.detach().cpu(), b.detach(), name)
    assert not torch.signbit(state(qm)[3]) and not torch.signbit(state(qm)[4])


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
ranges = st.one_of(finite32, st.just(math.inf), st.just(-math.inf), st.just(0.0), st.just(-0.0))


@settings(max_examples=300, deadline=None)
@given(lo=ranges, hi=ranges, old_lo=st.one_of(finite32, st.just(math.nan), st.just(math.inf)),
       old_hi=st.one_of(finite32, st.just(math.nan), st.just(-math.inf)), estimator=st.sampled_from([0, 1, 2]),
       momentum=st.sampled_from([0.9, 0.37, 0.0]), n_bits=st.sampled_from([2, 4, 8, 16]), symmetric=st.booleans())
def test_scalar_host_math_is_the_reference(lo, hi, old_lo, old_hi, estimator, momentum, n_bits, symmetric):
    """``update_range_f32`` / ``qparams_f32`` on float32 scalars give the reference's bits (a NaN old
    bound, "no range yet", on either side or both)."""
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    new_min, new_max = R.update_range_reference(t(lo), t(hi), t(old_lo), t(old_hi), estimator, momentum)
    d, z, s = R.qparams_from_range(new_min, new_max, n_bits, symmetric)
    with np.errstate(all="ignore"):
        f_lo, f_hi = update_range_f32(F32(lo), F32(hi), F32(old_lo), F32(old_hi), estimator, momentum)
        fd, fz, fs = qparams_f32(f_lo, f_hi, n_bits, symmetric)
    for name, a, b in (("min", f_lo, new_min), ("max", f_hi, new_max), ("delta", fd, d), ("zero_float", fz, z)):
        assert_bits_equal(torch.tensor(np.float32(a)), b, name)
    assert fs == bool(s)
