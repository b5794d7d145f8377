"""Triton kernels vs the eager reference (``tquant.kernels.reference``), bit for bit.

Two tiers:

- interpreter tier (unmarked): tiny fp32/fp16 tensors; on a machine without CUDA the kernels
  run in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1`` from ``conftest.py``);
  on a GPU machine the same cases run compiled on the GPU;
- ``gpu`` tier: larger sizes, bf16, GPU numerics (FMA contraction, approximate division,
  libdevice-free rounding) and CUDA-graph capture; skipped without CUDA.

Every case goes through the public custom ops (``tquant::fake_quant``, ``tquant::update_range``,
...) with ``TQUANT_BACKEND=triton``; the expected values come from the reference functions,
computed on the CPU. Floating results are compared by their bits (NaN positions must agree);
only the gradient sums, whose summation order differs, use a tolerance (``SUM_RTOL``).
"""

from __future__ import annotations

import pytest
import torch

import tquant.kernels as K
from tquant.kernels import reference as R
from tquant.kernels._triton import HAS_TRITON
from tquant.kernels.range_update import _finalize_torch

from helpers import assert_bits_equal

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed"),
    # the interpreter's numpy warns on inf - inf inside the rounding helper (the result is discarded)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

if HAS_TRITON:
    from tquant.kernels import _triton_math as TM
    from tquant.kernels import _triton_plan as TP
    from tquant.kernels._triton import tl, triton

# Gradient sums: |triton - torch| <= SUM_RTOL[dtype] * sum(|terms|) (different summation order).
SUM_RTOL = {torch.float32: 2.0**-18, torch.float16: 2.0**-18, torch.bfloat16: 2.0**-18}


@pytest.fixture(autouse=True)
def _triton_backend():
    K.set_backend("triton")  # conftest's autouse fixture restores the previous backend


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def ref_mask(x, delta, zero_float, signed, n_bits, symmetric, axis):
    """In-range mask of the reference: ``qmin <= round(x / scale) + zp <= qmax``."""
    scale, zp = R.scale_and_zero_point(delta, zero_float, n_bits, symmetric)
    qmin, qmax = R.grid_bounds(n_bits, symmetric, signed)
    v = torch.round(x.float() / R.param_view(scale, x, axis)) + R.param_view(zp, x, axis)
    return (v >= qmin) & (v <= qmax)


def qparams_for(x, n_bits, symmetric, axis, shrink=0.75):
    """Reference qparams from a range a bit narrower than the data (so some values clip)."""
    bmin, bmax = R.batch_minmax_reference(x.cpu(), axis)
    bmin = torch.where(torch.isfinite(bmin), bmin * shrink, torch.zeros_like(bmin))
    bmax = torch.where(torch.isfinite(bmax), bmax * shrink, torch.zeros_like(bmax))
    return R.qparams_from_range(bmin, bmax, n_bits, symmetric)


def make_data(shape, kind, dtype=torch.float32, axis=-1):
    """``signed``: randn; ``unsigned``: all >= 0; per channel, channel 0 is >= 0 and channel 1 <= 0."""
    x = torch.randn(shape) * 3.0
    if kind == "unsigned":
        x = x.abs()
    if axis == 0 and len(shape) >= 1 and shape[0] >= 2 and kind == "signed":
        x[0] = x[0].abs()
        x[1] = -x[1].abs()
    return x.to(dtype)


def poison(x: torch.Tensor, step: int) -> None:
    """Put NaNs into ``x`` in place (every ``step``-th element, or column 1 of a strided view)."""
    if x.is_contiguous():
        x.view(-1)[::step] = float("nan")
    else:
        x[..., 1] = float("nan")


def strided_view(x_base: torch.Tensor, how: str) -> torch.Tensor:
    if how == "slice":
        return x_base[:, ::3]
    if how == "transpose":
        return x_base.t()
    if how == "permute":
        return x_base.permute(0, 2, 3, 1)
    if how == "channels_last":
        return x_base.contiguous(memory_format=torch.channels_last)
    if how == "mid":  # dim 0 in the middle of the memory order: no 2-D view of the output exists
        return x_base.permute(1, 0, 2)
    raise ValueError(how)


# (id, shape, axis, view): the view is applied to a contiguous tensor of ``shape``.
SHAPES = [
    pytest.param((0,), -1, None, id="n0"),
    pytest.param((), -1, None, id="scalar"),
    pytest.param((1,), -1, None, id="n1"),
    pytest.param((257,), -1, None, id="n257"),
    pytest.param((5, 3, 7), -1, None, id="5x3x7"),
    pytest.param((12, 40), -1, "slice", id="12x40-slice"),
    pytest.param((17, 9), -1, "transpose", id="17x9-T"),
    pytest.param((2, 3, 4, 5), -1, "permute", id="2x3x4x5-perm"),
    pytest.param((3, 0), 0, None, id="ch3x0"),
    pytest.param((1,), 0, None, id="ch1"),
    pytest.param((7,), 0, None, id="ch7-1d"),
    pytest.param((5, 3, 7), 0, None, id="ch5x3x7"),
    pytest.param((6, 3, 3, 5), 0, None, id="ch6x3x3x5"),
    pytest.param((12, 40), 0, "slice", id="ch12x40-slice"),
    pytest.param((17, 9), 0, "transpose", id="ch9x17-T"),
    pytest.param((3, 3, 4, 5), 0, "permute", id="ch3x4x5x3-perm"),
    pytest.param((2, 6, 3, 5), -1, "channels_last", id="2x6x3x5-nhwc"),
    pytest.param((6, 4, 3, 3), 0, "channels_last", id="ch6x4x3x3-nhwc"),
    pytest.param((4, 5, 6), 0, "mid", id="ch5x4x6-mid"),
]
BITS = [2, 4, 8, 16]
MODES = [
    pytest.param(True, "signed", id="sym-signed"),
    pytest.param(True, "unsigned", id="sym-unsigned"),
    pytest.param(False, "signed", id="asym"),
    pytest.param(False, "unsigned", id="asym-unsigned"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
ESTIMATORS = [
    pytest.param(K.ESTIMATOR_CURRENT, id="current"),
    pytest.param(K.ESTIMATOR_ALL, id="all"),
    pytest.param(K.ESTIMATOR_RUNNING, id="running"),
]


def build_x(shape, axis, view, kind, dtype):
    x = make_data(shape, kind, dtype, axis=0 if view is None else -1)
    if view is not None:
        x = strided_view(x, view)
        if axis == 0 and x.dim() >= 1 and x.shape[0] >= 2 and kind == "signed":
            x[0] = x[0].abs()  # writes through the view: channel signs still differ
            x[1] = -x[1].abs()
    return x.to(DEV)


def check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, axis, without_mask=True):
    """y bits and the mask of the Triton op vs the reference (computed on the CPU)."""
    args = (delta.to(DEV), zero_float.to(DEV), signed.to(DEV), n_bits, symmetric, axis)
    y, mask = K.fake_quant_forward(x, *args, True)
    layout = torch.empty_like(x).stride()  # what the op's fake implementation promises
    assert y.stride() == layout and mask.stride() == layout, (y.stride(), mask.stride(), layout)
    xc = x.cpu()
    y_ref = R.fake_quant_reference(xc, delta, zero_float, signed, n_bits, symmetric, axis)
    assert_bits_equal(y, y_ref, "y")
    assert_bits_equal(mask, ref_mask(xc, delta, zero_float, signed, n_bits, symmetric, axis), "mask")
    if without_mask:
        y2, empty = K.fake_quant_forward(x, *args, False)
        assert_bits_equal(y2, y_ref, "y without mask")
        assert empty.numel() == 0 and empty.dtype == torch.bool


# --------------------------------------------------------------------------------------
# rounding helper
# --------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_kernel(p_x, p_y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(p_x + offs, mask=offs < n, other=0.0)
        tl.store(p_y + offs, TM._round_half_even(v), mask=offs < n)


def run_round(v: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(v)
    block = 16384
    _round_kernel[(triton.cdiv(v.numel(), block),)](v, y, v.numel(), BLOCK=block)
    return y


def test_round_half_even_every_half_integer_in_grid_range():
    """All half-integers in [-2^15 - 1, 2^16] (every 2..16-bit grid), their fp32 neighbours, specials."""
    half = torch.arange(-(2**15) - 1, 2**16 + 1, dtype=torch.float64) + 0.5
    ties = half.float()
    up = torch.nextafter(ties, torch.full_like(ties, float("inf")))
    down = torch.nextafter(ties, torch.full_like(ties, float("-inf")))
    specials = torch.tensor([0.0, -0.0, 0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, -0.3, 0.3,
                             8388607.5, -8388607.5, 8388608.0, 16777217.0, 1e30, -1e30, 1e-30, -1e-30,
                             float("inf"), float("-inf"), float("nan")])
    v = torch.cat([ties, up, down, specials, torch.randn(4096) * 100]).to(DEV)
    assert_bits_equal(run_round(v), torch.round(v.cpu()), "round")


# --------------------------------------------------------------------------------------
# fake_quant forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bits,dtype", [
    pytest.param(2, torch.float32, id="b2-fp32"),
    pytest.param(4, torch.float32, id="b4-fp32"),
    pytest.param(8, torch.float32, id="b8-fp32"),
    pytest.param(16, torch.float32, id="b16-fp32"),
    pytest.param(4, torch.float16, id="b4-fp16"),
    pytest.param(16, torch.float16, id="b16-fp16"),
])
@pytest.mark.parametrize("symmetric,kind", MODES)
@pytest.mark.parametrize("shape,axis,view", SHAPES)
def test_fake_quant_matches_reference(shape, axis, view, n_bits, symmetric, kind, dtype):
    x = build_x(shape, axis, view, kind, dtype)
    delta, zero_float, signed = qparams_for(x, n_bits, symmetric, axis)
    check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, axis, without_mask=n_bits == 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n_bits", [2, 8, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("scale", [0.25, 0.1, 3.0], ids=lambda s: f"s{s}")
def test_exact_ties(scale, n_bits, symmetric, dtype):
    """x exactly (or as near as fp32 gets to) k + 1/2 steps, positive and negative: half to even."""
    delta = torch.tensor(scale)
    zero_float = torch.tensor(0.0 if symmetric else float(2 ** (n_bits - 1)) - 0.5)  # round -> even zp
    signed = torch.tensor(symmetric)
    k = torch.arange(-(2 ** (n_bits - 1)) - 2, 2 ** (n_bits - 1) + 2, dtype=torch.float32)
    k = k[torch.linspace(0, k.numel() - 1, min(k.numel(), 200)).long()]
    extra = torch.tensor([0.5 * scale, -0.5 * scale, 1.5 * scale])
    x = torch.cat([(k + 0.5) * scale, -(k + 0.5) * scale, extra])
    if dtype == torch.float16:
        x = x[x.abs() < 60000.0]  # stay inside fp16's range
    x = x.to(dtype).to(DEV)
    check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, -1)


def test_per_channel_signed_flag_from_one_negative_channel():
    """Symmetric per-channel: one channel with a negative minimum makes every channel's grid signed."""
    x = torch.rand(4, 9) * 2.0
    x[2, 3] = -0.5
    delta, zero_float, signed = R.qparams_from_range(*R.batch_minmax_reference(x, 0), 4, True)
    assert bool(signed)
    check_fake_quant(x.to(DEV), delta, zero_float, signed, 4, True, 0)


def test_nonfinite_inputs_and_tiny_delta():
    """NaN stays NaN (mask False), +-inf clamps to the grid ends; delta below EPS uses EPS."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-9, -3e-9, 2.0]).to(DEV)
    for symmetric in (True, False):
        for delta in (torch.tensor(0.1), torch.tensor(1e-12), torch.tensor(0.0)):
            zero_float = torch.tensor(0.0 if symmetric else 3.4)
            check_fake_quant(x, delta, zero_float, torch.tensor(True), 8, symmetric, -1)


def test_zero_float_outside_grid_is_clamped():
    x = torch.linspace(-3, 3, 61).to(DEV)
    for zf in (-7.0, 300.0, 254.5, 255.5):
        check_fake_quant(x, torch.tensor(0.05), torch.tensor(zf), torch.tensor(False), 8, False, -1)


# --------------------------------------------------------------------------------------
# range estimation
# --------------------------------------------------------------------------------------

RANGE_SHAPES = [
    pytest.param((0,), -1, None, id="n0"),
    pytest.param((1,), -1, None, id="n1"),
    pytest.param((257,), -1, None, id="n257"),
    pytest.param((12, 40), -1, "slice", id="12x40-slice"),
    pytest.param((3, 0), 0, None, id="ch3x0"),
    pytest.param((0, 4), 0, None, id="ch0x4"),
    pytest.param((5, 3, 7), 0, None, id="ch5x3x7"),
    pytest.param((17, 9), 0, "transpose", id="ch9x17-T"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,view", RANGE_SHAPES)
def test_batch_minmax(shape, axis, view, dtype):
    x = build_x(shape, axis, view, "signed", dtype)
    bmin, bmax = K.batch_minmax(x, axis)
    rmin, rmax = R.batch_minmax_reference(x.cpu(), axis)
    assert_bits_equal(bmin, rmin, "bmin")
    assert_bits_equal(bmax, rmax, "bmax")


def new_state(axis, channels):
    shape = () if axis < 0 else (channels,)
    return [torch.full(shape, 123.0) for _ in range(4)] + [torch.tensor(True)]


def check_update(x, state, n_bits, symmetric, axis, estimator, momentum, first):
    """One update on the device vs ``_finalize_torch(batch_minmax_reference(x))`` on the CPU."""
    expected = [t.clone() for t in state]
    bmin, bmax = R.batch_minmax_reference(x.cpu(), axis)
    _finalize_torch(bmin, bmax, *expected, n_bits, symmetric, estimator, momentum, first)
    actual = [t.to(DEV) for t in state]
    K.update_range(x, *actual, n_bits, symmetric, axis, estimator, momentum, first)
    for name, a, e in zip(("range_min", "range_max", "delta", "zero_float", "signed"), actual, expected):
        assert_bits_equal(a, e, name)
    assert torch.isfinite(actual[2]).all(), "delta must never be NaN/inf"
    return [a.cpu() for a in actual]


@pytest.mark.parametrize("estimator,momentum", [
    pytest.param(K.ESTIMATOR_CURRENT, 0.9, id="current"),
    pytest.param(K.ESTIMATOR_ALL, 0.9, id="all"),
    pytest.param(K.ESTIMATOR_RUNNING, 0.9, id="running-m0.9"),
    pytest.param(K.ESTIMATOR_RUNNING, 0.37, id="running-m0.37"),
])
@pytest.mark.parametrize("symmetric,kind", MODES)
@pytest.mark.parametrize("shape,axis,view", [
    pytest.param((257,), -1, None, id="n257"),
    pytest.param((5, 3, 7), 0, None, id="ch5x3x7"),
    pytest.param((12, 40), 0, "slice", id="ch12x40-slice"),
])
def test_update_range_first_then_next(shape, axis, view, symmetric, kind, estimator, momentum):
    """First batch sets the range; the next two (wider, then narrower) go through the estimator."""
    channels = shape[0]
    state = new_state(axis, channels)
    x1 = build_x(shape, axis, view, kind, torch.float32)
    state = check_update(x1, state, 8, symmetric, axis, estimator, momentum, True)
    for factor in (1.7, 0.4):
        x2 = (build_x(shape, axis, view, kind, torch.float32) * factor)
        state = check_update(x2, state, 8, symmetric, axis, estimator, momentum, False)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
def test_finalize_range_is_one_launch_of_the_reference(axis, symmetric, estimator):
    """The synchronised-ranges half (after the all-reduce): a batch range into the state, as
    ``_finalize_torch`` does, NaN old ranges ("no range yet") and a non-finite batch channel included."""
    channels = 5
    shape = () if axis < 0 else (channels,)
    state = new_state(axis, channels)
    if axis == 0:
        state[0][1] = state[1][1] = float("nan")
    for step, scale in enumerate((1.0, 2.5)):
        bmin, bmax = -torch.rand(shape) * scale, torch.rand(shape) * scale
        if axis == 0:
            bmin[2], bmax[2] = float("inf"), float("-inf")  # no finite value in this channel
        expected = [t.clone() for t in state]
        _finalize_torch(bmin, bmax, *expected, 8, symmetric, estimator, 0.9, step == 0)
        actual = [t.to(DEV) for t in state]
        K.finalize_range(bmin.to(DEV), bmax.to(DEV), *actual, 8, symmetric, estimator, 0.9, step == 0)
        for name, a, e in zip(("range_min", "range_max", "delta", "zero_float", "signed"), actual, expected):
            assert_bits_equal(a, e, f"step {step}: {name}")
        state = expected


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
def test_update_range_nonfinite(axis, symmetric, estimator):
    """NaN/inf never reach the range; an all-non-finite batch (or channel) keeps a safe range."""
    x = torch.randn(4, 33)
    x[0, 3], x[1, 5], x[2, 7] = float("nan"), float("inf"), float("-inf")
    x[3] = float("nan")  # channel 3 has no finite value
    x[3, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("inf")])
    bad = torch.full((4, 33), float("nan"))
    bad[:, ::2] = float("inf")
    state = new_state(axis, 4)
    # first batch entirely non-finite, then a mixed one, then entirely non-finite again
    state = check_update(bad.to(DEV), state, 8, symmetric, axis, estimator, 0.9, True)
    state = check_update(x.to(DEV), state, 8, symmetric, axis, estimator, 0.9, False)
    state = check_update(bad.to(DEV), state, 8, symmetric, axis, estimator, 0.9, False)
    bmin, bmax = K.batch_minmax(x.to(DEV), axis)
    assert_bits_equal(bmin, R.batch_minmax_reference(x, axis)[0], "bmin")
    assert_bits_equal(bmax, R.batch_minmax_reference(x, axis)[1], "bmax")


@pytest.mark.parametrize("n_bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("symmetric,kind", MODES)
def test_training_forward_update_then_fake_quant(n_bits, symmetric, kind):
    """The QAT hot path: update_range, then fake_quant reading the state it wrote (per channel, fp16)."""
    x = build_x((6, 3, 3, 5), 0, None, kind, torch.float16)
    state = [t.to(DEV) for t in new_state(0, 6)]
    K.update_range(x, *state, n_bits, symmetric, 0, K.ESTIMATOR_CURRENT, 0.9, True)
    _, _, delta, zero_float, signed = [t.cpu() for t in state]
    check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, 0)


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------


def reference_grads(x, delta, zero_float, signed, n_bits, symmetric, axis, g):
    """Autograd through the reference on the CPU: grads of x, delta, zero_float."""
    xr = x.detach().cpu().clone().requires_grad_(True)
    dr = delta.detach().cpu().clone().requires_grad_(True)
    zr = zero_float.detach().cpu().clone().requires_grad_(True)
    y = R.fake_quant_reference(xr, dr, zr, signed.cpu(), n_bits, symmetric, axis)
    y.backward(g.cpu())
    return xr.grad, dr.grad, zr.grad if zr.grad is not None else torch.zeros_like(zr)


def sum_tolerance(terms: torch.Tensor, axis: int, dtype) -> torch.Tensor:
    dims = tuple(range(1, terms.dim())) if axis >= 0 else tuple(range(terms.dim()))
    total = terms.abs().sum(dim=dims) if dims else terms.abs()
    return SUM_RTOL[dtype] * total + 1e-30


def check_range_grads(x, delta, zero_float, signed, n_bits, symmetric, axis, g):
    """Triton op vs the torch formula (tight) and vs autograd through the reference."""
    xd, gd = x.to(DEV), g.to(DEV)
    args = (delta.to(DEV), zero_float.to(DEV), signed.to(DEV), n_bits, symmetric, axis)
    g_delta, g_zf = K.fake_quant_range_grads(gd, xd, *args)
    assert g_delta.shape == delta.shape and g_zf.shape == zero_float.shape
    assert g_delta.dtype == torch.float32 and g_zf.dtype == torch.float32
    _, ref_d, ref_z = reference_grads(x, delta, zero_float, signed, n_bits, symmetric, axis, g)
    # Tolerance scale: the sum of the absolute per-element terms.
    scale = R.param_view(torch.clamp(delta, min=R.EPS), x.cpu(), axis)
    gf = g.cpu().float()
    tol_d = sum_tolerance(gf * (x.cpu().float() / scale).abs() + gf.abs() * 2**n_bits, axis, x.dtype)
    tol_z = sum_tolerance(gf * scale, axis, x.dtype)
    assert ((g_delta.cpu() - ref_d).abs() <= tol_d).all(), (g_delta, ref_d)
    assert ((g_zf.cpu() - ref_z).abs() <= tol_z).all(), (g_zf, ref_z)
    if symmetric:
        assert_bits_equal(g_zf.cpu(), torch.zeros_like(zero_float), "symmetric grad_zero_float")
    return g_delta, g_zf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric,kind", MODES)
@pytest.mark.parametrize("shape,axis,view", [
    pytest.param((0,), -1, None, id="n0"),
    pytest.param((1,), -1, None, id="n1"),
    pytest.param((257,), -1, None, id="n257"),
    pytest.param((17, 9), -1, "transpose", id="17x9-T"),
    pytest.param((3, 0), 0, None, id="ch3x0"),
    pytest.param((5, 3, 7), 0, None, id="ch5x3x7"),
    pytest.param((12, 40), 0, "slice", id="ch12x40-slice"),
])
def test_ste_and_learned_range_grads(shape, axis, view, symmetric, kind, dtype):
    """K.fake_quant backward: grad_x = grad * mask; delta / zero_float grads as autograd through the ref."""
    x = build_x(shape, axis, view, kind, dtype)
    delta, zero_float, signed = qparams_for(x, 4, symmetric, axis, shrink=0.6)
    if not symmetric and zero_float.numel():
        zero_float = zero_float + 0.3  # a fractional zero point (learned ranges move it)
    g = torch.randn(x.shape).to(dtype)
    xd = x.detach().clone().requires_grad_(True)
    dd = delta.to(DEV).requires_grad_(True)
    zd = zero_float.to(DEV).requires_grad_(True)
    y = K.fake_quant(xd, dd, zd, signed.to(DEV), 4, symmetric, axis)
    y.backward(g.to(DEV))
    # STE: exactly grad * mask (the reference's autograd divides grad * scale by scale: <= 1 ulp off).
    mask = ref_mask(x.cpu(), delta, zero_float, signed, 4, symmetric, axis)
    assert_bits_equal(xd.grad, g * mask, "grad_x")
    ref_x, _, _ = reference_grads(x, delta, zero_float, signed, 4, symmetric, axis, g)
    torch.testing.assert_close(xd.grad.cpu(), ref_x, rtol=2.0**-10 if dtype == torch.float16 else 2.0**-22,
                               atol=0.0)
    g_delta, g_zf = check_range_grads(x, delta, zero_float, signed, 4, symmetric, axis, g)
    # the op's autograd formula runs the same kernel on the same inputs
    assert_bits_equal(dd.grad, g_delta, "delta.grad")
    assert_bits_equal(zd.grad, g_zf, "zero_float.grad")


def test_range_grads_gates_and_expanded_grad():
    """delta < EPS gives no delta gradient; zp outside [0, 2^b-1] none either; grad may be a stride-0 view."""
    x = torch.linspace(-2, 2, 50)
    g = torch.ones(()).expand(50)
    for delta, zf in ((1e-9, 3.0), (0.05, -4.0), (0.05, 300.0), (0.05, 100.2)):
        check_range_grads(x, torch.tensor(delta), torch.tensor(zf), torch.tensor(False), 8, False, -1, g)


# --------------------------------------------------------------------------------------
# the multi-program paths on tiny tensors (tiles, loops, partials)
# --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Shrink tiles and partial blocks so a few hundred elements need many programs and steps."""
    monkeypatch.setattr(TP, "_MAX_TILE", 32)
    monkeypatch.setattr(TP, "_CPU_PROGRAMS", 16)
    monkeypatch.setattr(TP, "_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(TP, "_FINALIZE_TILE", 8)
    monkeypatch.setattr(TP, "_FINALIZE_BLOCK_P", 2)
    monkeypatch.setattr(TP, "_plans", type(TP._plans)())  # plans made with the usual tiles must not be reused


@pytest.mark.parametrize("symmetric,kind", [
    pytest.param(True, "signed", id="sym-signed"),
    pytest.param(False, "unsigned", id="asym-unsigned"),
])
@pytest.mark.parametrize("shape,axis,view", [
    pytest.param((300,), -1, None, id="n300"),
    pytest.param((12, 40), -1, "slice", id="12x40-slice"),
    pytest.param((5, 70), 0, None, id="ch5x70"),
    pytest.param((21, 3), 0, None, id="ch21x3"),
    pytest.param((17, 9), 0, "transpose", id="ch9x17-T"),
])
def test_many_programs(tiny_tiles, shape, axis, view, symmetric, kind):
    x = build_x(shape, axis, view, kind, torch.float32)
    poison(x, 37)
    bmin, bmax = K.batch_minmax(x, axis)
    rmin, rmax = R.batch_minmax_reference(x.cpu(), axis)
    assert_bits_equal(bmin, rmin, "bmin")
    assert_bits_equal(bmax, rmax, "bmax")
    channels = shape[0] if view != "transpose" else shape[1]
    state = check_update(x, new_state(axis, channels), 8, symmetric, axis, K.ESTIMATOR_RUNNING, 0.9, True)
    state = check_update(x * 1.3, state, 8, symmetric, axis, K.ESTIMATOR_RUNNING, 0.9, False)
    _, _, delta, zero_float, signed = state
    check_fake_quant(x, delta, zero_float, signed, 8, symmetric, axis)
    x = torch.nan_to_num(x.cpu())
    check_range_grads(x, delta, zero_float + 0.3, signed, 8, symmetric, axis, torch.randn(x.shape))


# --------------------------------------------------------------------------------------
# host-side layout and validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    pytest.param(((4, 5, 6), (30, 6, 1), False, (1, 120, [(0, 1)])), id="contiguous"),
    pytest.param(((4, 5, 6), (30, 6, 1), True, (4, 30, [(30, 1)])), id="contiguous-channel"),
    pytest.param(((4, 5), (1, 4), False, (4, 5, [(1, 4)])), id="transposed"),
    pytest.param(((4, 1, 5), (15, 7, 3), True, (4, 5, [(15, 3)])), id="size1-dim"),
    pytest.param(((2, 3, 4), (12, 1, 3), False, None), id="not-2d"),
    pytest.param(((3,), (2,), True, (3, 1, [(2, 1)])), id="1d-channel"),
])
def test_collapse(case):
    shape, strides, keep_dim0, expected = case
    got = TP._collapse(shape, [strides], keep_dim0)
    if expected is None:
        assert got is None
    else:
        assert (got[0], got[1], list(got[2])) == expected


def test_bad_inputs():
    p = torch.tensor(0.1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.fake_quant_forward(torch.arange(4).to(DEV), p, p, torch.tensor(True), 8, True, -1, False)
    with pytest.raises(ValueError, match="does not match"):
        K.fake_quant_forward(torch.randn(3, 4).to(DEV), torch.ones(4), torch.zeros(4), torch.tensor(True),
                             8, True, 0, False)
    with pytest.raises(ValueError, match="contiguous float32"):
        state = [torch.zeros(2)] + [torch.zeros(3) for _ in range(3)] + [torch.tensor(False)]
        K.update_range(torch.randn(3, 4).to(DEV), *state, 8, True, 0, K.ESTIMATOR_CURRENT, 0.9, True)


# --------------------------------------------------------------------------------------
# gpu tier: sizes, bf16 and GPU numerics (skipped without CUDA)
# --------------------------------------------------------------------------------------

GPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("symmetric,kind", MODES)
@pytest.mark.parametrize("n_bits", [4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape,axis,view", [
    pytest.param((1 << 20,), -1, None, id="n2^20"),
    pytest.param((1_000_003,), -1, None, id="n1000003"),
    pytest.param((512, 3000), -1, "slice", id="512x3000-slice"),
    pytest.param((256, 64, 3, 3), 0, None, id="ch256x64x3x3"),
    pytest.param((50_000, 70), 0, None, id="ch50000x70"),
    pytest.param((7, 300_001), 0, None, id="ch7x300001"),
])
@pytest.mark.gpu
@needs_cuda
def test_gpu_training_forward(shape, axis, view, n_bits, symmetric, kind, dtype):
    x = build_x(shape, axis, view, kind, dtype)
    poison(x, 100_003)
    channels = x.shape[0]
    state = new_state(axis, channels)
    state = check_update(x, state, n_bits, symmetric, axis, K.ESTIMATOR_RUNNING, 0.9, True)
    state = check_update(x * 0.7, state, n_bits, symmetric, axis, K.ESTIMATOR_RUNNING, 0.9, False)
    _, _, delta, zero_float, signed = state
    check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, axis)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("symmetric,kind", MODES)
@pytest.mark.parametrize("n_bits", [2, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape,axis", [
    pytest.param((1 << 22,), -1, id="n2^22"),
    pytest.param((1024, 4097), 0, id="ch1024x4097"),
])
@pytest.mark.gpu
@needs_cuda
def test_gpu_fake_quant_bits(shape, axis, n_bits, symmetric, kind, dtype):
    x = build_x(shape, axis, None, kind, dtype)
    delta, zero_float, signed = qparams_for(x, n_bits, symmetric, axis)
    check_fake_quant(x, delta, zero_float, signed, n_bits, symmetric, axis)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["tensor", "channel"])
@pytest.mark.gpu
@needs_cuda
def test_gpu_range_grads(axis, symmetric, dtype):
    x = build_x((64, 4099), axis, None, "signed", dtype)
    delta, zero_float, signed = qparams_for(x, 8, symmetric, axis, shrink=0.6)
    check_range_grads(x.cpu(), delta, zero_float + (0.0 if symmetric else 0.3), signed, 8, symmetric, axis,
                      torch.randn(x.shape).to(dtype))


@pytest.mark.gpu
@needs_cuda
def test_gpu_round_and_ties():
    test_round_half_even_every_half_integer_in_grid_range()
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (0.25, 0.1):
            test_exact_ties(scale, 8, False, dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_capture():
    """update_range + fake_quant replay in a CUDA graph (no host sync) and track new data."""
    x = torch.randn(1 << 16, device="cuda")
    state = [t.cuda() for t in new_state(-1, 1)]
    args = (8, False, -1, K.ESTIMATOR_RUNNING, 0.9, False)
    K.update_range(x, *state, 8, False, -1, K.ESTIMATOR_RUNNING, 0.9, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        K.update_range(x, *state, *args)
        K.fake_quant_forward(x, state[2], state[3], state[4], 8, False, -1, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.update_range(x, *state, *args)
        y, _ = K.fake_quant_forward(x, state[2], state[3], state[4], 8, False, -1, True)
    expected = [t.cpu() for t in state]
    x.copy_(torch.randn_like(x) * 5)
    bmin, bmax = R.batch_minmax_reference(x.cpu())
    _finalize_torch(bmin, bmax, *expected, 8, False, K.ESTIMATOR_RUNNING, 0.9, False)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(state, expected):
        assert_bits_equal(a, e, "state after replay")
    assert_bits_equal(y, R.fake_quant_reference(x.cpu(), *expected[2:], 8, False, -1), "y after replay")
