"""The planned quantizer call (``tquant.kernels.quantizer_call``) against the eager reference.

Every lane — ``host`` (small contiguous fp32/fp16 CPU tensors, per tensor: numpy on the host),
``torch`` (everything else on the torch path)
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
from tquant.kernels import reference as R
from tquant.kernels._triton import HAS_TRITON, INTERPRET
from tquant.kernels.host_math import F32, qparams_f32, update_range_f32
from tquant.kernels.quantizer_call import HOST_MAX_NUMEL

from helpers import assert_bits_equal

ESTIMATORS = [tquant.RangeEstimators.current_minmax, tquant.RangeEstimators.allminmax,
              tquant.RangeEstimators.running_minmax]
STATE_NAMES = ("delta", "zero_float", "signed", "range_min", "range_max")
LANES = ["host", "torch"] + (["triton"] if HAS_TRITON and (INTERPRET or torch.cuda.is_available()) else [])


def manager(symmetric, estimator, per_channel, n_bits=8):
    qmethod = tquant.QMethods.symmetric_uniform if symmetric else tquant.QMethods.asymmetric_uniform
    return tquant.QuantizationManager(qmethod, estimator, per_channel=per_channel, qparams={"n_bits": n_bits}).train()


def batches(lane: str, per_channel: bool):
    """Inputs for ``lane``: the host lane takes small contiguous fp32/fp16 tensors per tensor."""
    torch.manual_seed(0)
    shape = (6, 35)
    make = {
        "host": lambda s: torch.randn(shape) * s,
        "torch": lambda s: (torch.randn(shape[1], shape[0]) * s).t(),  # strided: never the host lane
        "triton": lambda s: torch.randn(shape) * s,
    }[lane]
    xs = [make(1.0), make(3.0) + 1.0, make(0.5).abs()]
    bad = make(2.0)
    bad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    xs.append(bad)
    if lane == "host" and not per_channel:
        xs.append(make(1.5).half())
    return [x.cuda() if lane == "triton" and torch.cuda.is_available() else x for x in xs]


def state(qm):
    q, est = qm.quantizer, qm.range_estimator
    return [q._delta, q._zero_float, q._signed, est.current_xmin, est.current_xmax]


LANE_CASES = [pytest.param(lane, pc, id=f"{lane}-{'channel' if pc else 'tensor'}")
              for lane in LANES for pc in (False, True) if not (lane == "host" and pc)]  # per tensor only


@pytest.mark.parametrize("lane, per_channel", LANE_CASES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_lane_matches_reference(lane, per_channel, symmetric, estimator):
    qm, ref = manager(symmetric, estimator, per_channel), manager(symmetric, estimator, per_channel)
    for step, x in enumerate(batches(lane, per_channel)):
        xr = x.detach().clone().requires_grad_(True)
        xq = x.detach().clone().requires_grad_(True)
        with K.use_backend("triton" if lane == "triton" else "torch"):
            y = qm(xq)
        call = next(c for k, c in qm._calls.items() if k[0] == x.shape and k[1] == x.stride() and k[2] == x.dtype)
        assert call.lane == lane, (call.lane, lane)
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
                     ((8, 8), torch.float16): "host", ((8, 8), torch.float32): "host"}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_host_lane_matches_reference_in_every_state(symmetric):
    """Training forwards with and without autograd, eval, ``fix_ranges`` and ``learn_ranges`` (the
    gradients of ``delta`` and ``zero_float`` too): the host lane gives the reference's bits."""
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
        assert next(iter(qm._calls.values())).lane == "host"
        assert_bits_equal(outs[0][0], outs[1][0], f"{mode}: y")
        for name, a, b in zip(("x", "delta", "zero_float"), outs[0][1:], outs[1][1:]):
            assert (a is None) == (b is None), f"{mode}: grad of {name}"
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{mode}: grad of {name}")
        for name, a, b in zip(("delta", "zero_float", "signed", "range_min", "range_max"), state(qm), state(ref)):
            assert_bits_equal(a.detach(), b.detach(), f"{mode}: {name}")
        for m in (qm, ref):
            m.quantizer.zero_grad()


ZERO_BATCHES = {
    "neg-zero-among-zeros": [1.0] * 37 + [-0.0] + [0.0] * 4,  # torch's amin returns -0.0 here
    "zero-among-neg-zeros": [-0.0] * 20 + [0.0] + [-0.0] * 21,
    "all-neg-zero": [-0.0] * 42,
}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("values", list(ZERO_BATCHES.values()), ids=list(ZERO_BATCHES))
def test_a_zero_batch_extreme_is_positive_zero_on_every_lane(lane, values):
    """Which of -0.0 / +0.0 a min/max reduction returns depends on its order; the reference makes a
    zero extreme +0.0, and every lane gives its state bits (``zero_float``'s sign follows)."""
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


@pytest.mark.parametrize("lane, per_channel", LANE_CASES)
def test_no_finite_value_seen_leaves_every_lane_uninitialised(lane, per_channel):
    """Empty and all-NaN/inf training batches set no range on any lane (the reference's NaN state, bit
    for bit): eval and ``fix_ranges`` then raise naming the layer, as for a quantizer that saw nothing;
    the first batch with a finite value initialises it."""
    est = tquant.RangeEstimators.running_minmax
    qm, ref = manager(False, est, per_channel), manager(False, est, per_channel)
    qm.layer_name = "fc1.activation_quantizer"
    good = batches(lane, per_channel)[0]
    inf = good.clone().fill_(math.inf)
    inf[..., ::3] = -math.inf
    empty = good[:, :0] if per_channel else good[:0]
    for x in (empty, torch.full_like(good, math.nan), inf, good):
        with K.use_backend("triton" if lane == "triton" else "torch"):
            y = qm(x)
        with K.use_backend("reference"):
            y_ref = ref(x.cpu())
        assert_bits_equal(y, y_ref, "y")
        for name, a, b in zip(STATE_NAMES, state(qm), state(ref)):
            assert_bits_equal(a.detach(), b.detach(), name)
        if x is good:
            break
        assert not qm.is_initialized and torch.isnan(qm.quantizer._delta).all()
        with pytest.raises(tquant.QuantizerNotInitializedError, match=r"fc1\.activation_quantizer"):
            qm.eval()(good)
        with pytest.raises(tquant.QuantizerNotInitializedError, match=r"fc1\.activation_quantizer"):
            qm.fix_ranges()
        qm.train()
    assert qm.is_initialized and torch.isfinite(qm.quantizer._delta).all()
    qm.eval()(good)
