"""Tests of ``tquant.kernels.range_search``: percentiles and the MSE / cross-entropy searches.

The grid searches are checked against a plain loop over candidates written here the way
aihwkit 1.2.0's ``MSE_Estimator`` / ``CrossEntropyEstimator`` loop (Python-float thresholds,
one temporary per-tensor quantizer per candidate), built on ``tquant.kernels.reference``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tquant.kernels as K
from tquant.kernels.range_search import (
    SearchSpace,
    best_range,
    define_search_space,
    golden_section_range,
    grid_losses,
    percentile_range,
)
from tquant.kernels.reference import fake_quant_reference, qparams_from_range

from helpers import gpu, needs_triton


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: intra-op threads only add wake-up latency (large on a busy 2-core box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------
# percentiles
# ------------------------------------------------------------------------------------------


def np_percentile(x: torch.Tensor, p: float, axis=None):
    """aihwkit's computation, both tails: ``torch.Tensor(np.percentile(x, (p, 100 - p)))``."""
    lo, hi = np.percentile(x.numpy(), (p, 100 - p), axis=axis)
    return torch.from_numpy(np.asarray(lo, dtype=np.float32)), torch.from_numpy(np.asarray(hi, dtype=np.float32))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001])
@pytest.mark.parametrize("p", [0, 0.5, 1, 10, 33.3, 49.99])
def test_percentile_per_tensor_matches_numpy(n, p):
    x = torch.randn(n) * 3 + 1
    lo, hi = percentile_range(x, p)
    ref_lo, ref_hi = np_percentile(x, p)
    assert lo.dtype == torch.float32 and lo.shape == () and hi.shape == ()
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@pytest.mark.parametrize("shape", [(1,), (3, 1), (5, 7), (4, 3, 11), (2, 301)])
@pytest.mark.parametrize("p", [0, 1, 10, 25, 49])
def test_percentile_per_channel_matches_numpy(shape, p):
    x = torch.randn(shape)
    lo, hi = percentile_range(x, p, axis=0)
    ref_lo, ref_hi = np_percentile(x.reshape(shape[0], -1), p, axis=-1)
    assert lo.shape == (shape[0],) and lo.dtype == torch.float32
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: torch.randn(n),
        lambda n: torch.relu(torch.randn(n)),  # a long run of equal values
        lambda n: torch.sort(torch.randn(n)).values,  # sorted: the strided sample is biased
        lambda n: torch.randint(-3, 4, (n,)).float(),  # few distinct values
    ],
    ids=["normal", "relu", "sorted", "integers"],
)
@pytest.mark.parametrize("p", [0.01, 1, 20])
def test_percentile_large_per_tensor(make, p):
    # Above the full-sort size: the sampled bracket (and its fallbacks) must stay exact.
    x = make(300_001)
    lo, hi = percentile_range(x, p)
    ref_lo, ref_hi = np_percentile(x, p)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


def test_percentile_clips_both_tails_per_tensor():
    # aihwkit's per-tensor branch used (p, 100): the max was never clipped.
    x = torch.arange(101.0)
    lo, hi = percentile_range(x, 10)
    assert lo.item() == 10.0 and hi.item() == 90.0
    lo, hi = percentile_range(x, 0)
    assert lo.item() == 0.0 and hi.item() == 100.0


def test_percentile_ignores_non_finite():
    x = torch.randn(50)
    y = x.clone()
    y[[3, 7, 11]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    keep = torch.isfinite(y)
    lo, hi = percentile_range(y, 5)
    ref_lo, ref_hi = np_percentile(y[keep], 5)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    # per channel: rows with different finite counts, and one row without any finite value
    w = torch.randn(3, 20)
    w[0, :4] = float("nan")
    w[2, :] = float("inf")
    lo, hi = percentile_range(w, 10, axis=0)
    for c in range(2):
        row = w[c][torch.isfinite(w[c])]
        ref_lo, ref_hi = np_percentile(row, 10)
        assert lo[c] == ref_lo and hi[c] == ref_hi
    assert lo[2].item() == float("inf") and hi[2].item() == float("-inf")
    lo, hi = percentile_range(torch.full((4,), float("nan")), 1)
    assert lo.item() == float("inf") and hi.item() == float("-inf")


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40),
    p=st.floats(0, 49.999),
)
def test_percentile_property(values, p):
    x = torch.tensor(values, dtype=torch.float32)
    lo, hi = percentile_range(x, p)
    ref_lo, ref_hi = np_percentile(x, p)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    assert x.min() <= lo <= hi <= x.max()


@pytest.mark.parametrize("p", [-1, 50, 60, float("nan"), "a", None])
def test_percentile_bad_percentile(p):
    with pytest.raises(ValueError, match="percentile"):
        percentile_range(torch.randn(10), p)


def test_percentile_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        percentile_range(torch.randn(4, 4), 1, axis=1)
    with pytest.raises(ValueError, match="x"):
        percentile_range(torch.tensor(1.0), 1, axis=0)


# ------------------------------------------------------------------------------------------
# the aihwkit-style loop the vectorised search must reproduce
# ------------------------------------------------------------------------------------------


def temp_quantize(data, neg_thr, pos_thr, n_bits, symmetric):
    """aihwkit's ``quantize``: a per-tensor quantizer set to Python-float thresholds."""
    d, z, s = qparams_from_range(torch.tensor(float(neg_thr)), torch.tensor(float(pos_thr)), n_bits, symmetric)
    return fake_quant_reference(data, d, z, s, n_bits, symmetric)


def loop_loss(data, neg_thr, pos_thr, n_bits, symmetric, loss, per_channel):
    q = temp_quantize(data, neg_thr, pos_thr, n_bits, symmetric)
    if loss == "mse":
        per_row = ((data - q) ** 2).reshape(len(data), -1).sum(dim=1).double()
        return per_row if per_channel else per_row.sum()
    terms = -torch.softmax(data, dim=1) * torch.log_softmax(q, dim=1)
    if per_channel:  # tquant's decision: each channel its own rows (aihwkit: the total)
        return terms.reshape(len(data), -1).sum(dim=1).double()
    return terms.sum().double()


def loop_space(data, n_bits, symmetric, per_channel, num_candidates, margin):
    one_sided = bool(data.min() >= 0)
    if one_sided or symmetric:
        max_pos = max(abs(float(data.min())), float(data.max())) + margin
        max_neg, search = -max_pos, max_pos
    else:
        max_pos, max_neg = float(data.max()) + margin, float(data.min()) - margin
        search = max(abs(max_pos), abs(max_neg))
    return dict(one_sided=one_sided, max_pos=max_pos, max_neg=max_neg, step=search / num_candidates,
                skew=2**n_bits // 4, channels=len(data) if per_channel else 1, search=search)


def loop_grid(data, sp, n_bits, symmetric, loss, per_channel, num_candidates):
    """aihwkit's ``_perform_1D_search`` / ``_perform_2D_search`` loss accumulation, one batch."""
    step = sp["step"]
    if sp["one_sided"] or symmetric:
        arr = np.zeros((sp["channels"], num_candidates + 1))
        arr[:, 0] = np.inf
        for i in range(1, num_candidates + 1):
            neg = 0 if sp["one_sided"] else -step * i
            arr[:, i] += loop_loss(data, neg, step * i, n_bits, symmetric, loss, per_channel).numpy()
        return arr
    arr = np.zeros((sp["channels"], num_candidates + 1, sp["skew"], 2))
    arr[:, 0] = np.inf
    for i in range(1, num_candidates + 1):
        start, finish = -step * i, step * i
        delta = float(finish - start) / (2**n_bits - 1)
        for shift in range(sp["skew"]):
            for reverse in range(2):
                skew = ((-1) ** reverse) * shift * delta
                neg, pos = max(start + skew, sp["max_neg"]), min(finish + skew, sp["max_pos"])
                arr[:, i, shift, reverse] += loop_loss(data, neg, pos, n_bits, symmetric, loss,
                                                       per_channel).numpy()
    return arr


def loop_best(arr, sp, n_bits, two_d):
    step = sp["step"]
    if not two_d:
        cand = arr.argmin(axis=1)
        xmin = np.zeros(len(cand)) if sp["one_sided"] else -step * cand
        return xmin.astype(np.float32), (step * cand).astype(np.float32)
    xmins, xmaxs = [], []
    for c in range(len(arr)):
        i, shift, rev = np.unravel_index(np.argmin(arr[c]), arr[c].shape)
        start, finish = -step * i, step * i
        delta = float(finish - start) / (2**n_bits - 1)
        skew = ((-1) ** rev) * shift * delta
        xmins.append(max(start + skew, sp["max_neg"]))
        xmaxs.append(min(finish + skew, sp["max_pos"]))
    return np.array(xmins, dtype=np.float32), np.array(xmaxs, dtype=np.float32)


def check_against_loop(data, n_bits, symmetric, per_channel, loss="mse", num_candidates=12, margin=0.5):
    space = define_search_space(data, n_bits, symmetric, per_channel, num_candidates, margin)
    got = grid_losses(data, space, n_bits, symmetric, loss)
    sp = loop_space(data, n_bits, symmetric, per_channel, num_candidates, margin)
    ref = loop_grid(data, sp, n_bits, symmetric, loss, per_channel, num_candidates)
    assert got.dtype == torch.float64 and tuple(got.shape) == ref.shape == space.loss_shape
    ref_t = torch.from_numpy(ref)
    assert torch.isinf(got[:, 0]).all()
    torch.testing.assert_close(got[:, 1:], ref_t[:, 1:], rtol=1e-5, atol=1e-9)
    # the pick of the loop's own array, turned back into a range as aihwkit does
    x_min, x_max = best_range(ref_t, space, n_bits)
    ref_min, ref_max = loop_best(ref, sp, n_bits, space.two_d)
    assert x_min.dtype == torch.float32 and x_min.shape == (space.channels,)
    assert torch.equal(x_min, torch.from_numpy(ref_min)) and torch.equal(x_max, torch.from_numpy(ref_max))
    return space, got, ref_t


# ------------------------------------------------------------------------------------------
# search space, grid losses, best range
# ------------------------------------------------------------------------------------------


def test_search_space_fields():
    data = torch.tensor([[-1.5, 0.25], [2.0, -0.5]])
    sp = define_search_space(data, 8, True, False, 100, 0.5)
    assert isinstance(sp, SearchSpace)
    assert (sp.one_sided, sp.two_d, sp.channels, sp.max_int_skew) == (False, False, 1, 64)
    assert sp.max_pos_thr == 2.5 and sp.max_neg_thr == -2.5 and sp.max_search_range == 2.5
    assert sp.step == 2.5 / 100 and sp.loss_shape == (1, 101)
    sp = define_search_space(data, 4, False, True, 10, 0.5)
    assert sp.two_d and sp.channels == 2 and sp.max_int_skew == 4
    assert sp.max_pos_thr == 2.5 and sp.max_neg_thr == -2.0 and sp.max_search_range == 2.5
    assert sp.loss_shape == (2, 11, 4, 2)
    sp = define_search_space(data.abs(), 4, False, False, 10, 0.0)
    assert sp.one_sided and not sp.two_d and sp.max_pos_thr == 2.0


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("n_bits", [4, 8])
def test_grid_1d_symmetric(per_channel, n_bits):
    check_against_loop(torch.randn(6, 40) * torch.linspace(0.3, 2, 6)[:, None], n_bits, True, per_channel)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_1d_one_sided(symmetric, per_channel):
    space, got, _ = check_against_loop(torch.rand(5, 30) * 3, 4, symmetric, per_channel)
    assert space.one_sided and not space.two_d


def test_one_sided_symmetric_candidates_use_unsigned_grid():
    # aihwkit's set_quant_range(0, r) on a symmetric quantizer: unsigned [0, 2^b - 1].
    data = torch.rand(64)
    space = define_search_space(data, 4, True, False, 5, 0.0)
    got = grid_losses(data, space, 4, True)
    r = space.step * 3
    q = torch.clamp(torch.round(data / (r / 15)), 0, 15) * (r / 15)
    torch.testing.assert_close(got[0, 3].item(), ((data - q) ** 2).sum().item(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_2d_asymmetric(per_channel):
    data = torch.randn(4, 25) + torch.tensor([0.3, -0.2, 0.8, 0.0])[:, None]
    space, _, _ = check_against_loop(data, 4, False, per_channel, num_candidates=8)
    assert space.two_d


def test_grid_2d_clamps_to_data_range():
    # Skewed data: many 2-D candidates cross max_neg_thr / max_pos_thr and are clamped.
    data = torch.cat([torch.rand(30) * 4, -torch.rand(5) * 0.2]).reshape(5, 7)
    check_against_loop(data, 4, False, False, num_candidates=6, margin=0.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_cross_entropy(symmetric):
    check_against_loop(torch.randn(4, 6, 3) * 2, 4, symmetric, False, loss="cross_entropy", num_candidates=6)


def test_grid_cross_entropy_per_channel_rows():
    # tquant's per-channel cross entropy: each row's own terms; their sum is aihwkit's total.
    data = torch.randn(3, 8)
    check_against_loop(data, 4, True, True, loss="cross_entropy", num_candidates=8)
    sp_c = define_search_space(data, 4, True, True, 8, 0.5)
    sp_t = define_search_space(data, 4, True, False, 8, 0.5)
    per_row = grid_losses(data, sp_c, 4, True, "cross_entropy")
    total = grid_losses(data, sp_t, 4, True, "cross_entropy")
    torch.testing.assert_close(per_row[:, 1:].sum(0), total[0, 1:], rtol=1e-6, atol=1e-9)


def test_grid_chunking_does_not_change_losses():
    data = torch.randn(5, 300)
    space = define_search_space(data, 4, False, True, 10, 0.5)
    a = grid_losses(data, space, 4, False)
    b = grid_losses(data, space, 4, False, block=97)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("symmetric,per_channel", [(True, False), (False, False), (False, True)])
def test_losses_accumulate_over_batches(symmetric, per_channel):
    b1, b2 = torch.randn(4, 50), torch.randn(4, 50) * 1.3
    space = define_search_space(b1, 4, symmetric, per_channel, 10, 0.5)
    acc = grid_losses(b1, space, 4, symmetric) + grid_losses(b2, space, 4, symmetric)
    both = grid_losses(torch.cat([b1, b2], dim=1), space, 4, symmetric)
    torch.testing.assert_close(acc, both, rtol=1e-6, atol=1e-9)
    x_min, x_max = best_range(acc, space, 4)
    assert (x_min <= 0).all() and (x_max > 0).all()


def test_grid_best_range_is_the_min_mse():
    data = torch.randn(2000)
    space = define_search_space(data, 4, True, False, 200, 0.5)
    losses = grid_losses(data, space, 4, True)
    x_min, x_max = best_range(losses, space, 4)
    i = round(x_max.item() / space.step)
    assert losses[0, i] == losses[0].min() and x_min.item() == -x_max.item()
    assert 1.5 < x_max.item() < 3.5  # 4-bit MSE clipping of a unit normal: about 2.5 sigma


def test_grid_ignores_non_finite_values():
    data = torch.randn(6, 20)
    space = define_search_space(data, 4, False, True, 8, 0.5)
    bad = data.clone()
    bad[1, 3], bad[4, 0] = float("nan"), float("inf")
    clean = data.clone()
    clean[1, 3], clean[4, 0] = 0.0, 0.0  # zero is exactly representable: zero error
    torch.testing.assert_close(grid_losses(bad, space, 4, False), grid_losses(clean, space, 4, False))


def test_grid_bf16_data():
    data = torch.randn(4, 30).to(torch.bfloat16)
    space = define_search_space(data, 4, True, False, 8, 0.5)
    got = grid_losses(data, space, 4, True)
    assert torch.isfinite(got[:, 1:]).all()


# ------------------------------------------------------------------------------------------
# golden section
# ------------------------------------------------------------------------------------------


def fine_best(data, space, n_bits, symmetric, per_channel, loss="mse", n_r=600, n_s=61):
    """Brute force over the golden-section domain: per channel, the best loss found."""
    rows = len(data) if per_channel else 1
    rs = np.linspace(0.01 * space.max_search_range, space.max_search_range, n_r)
    best = np.full(rows, np.inf)
    for r in rs:
        if not space.two_d:
            shifts = [0.0]
        else:
            m = 2 * r / (2**n_bits - 1) * space.max_int_skew
            shifts = np.linspace(-m, m, n_s)
        for s in shifts:
            neg = 0.0 if (space.one_sided and not space.two_d) else -r + s
            l_ = per_channel_loss(data, neg, r + s, n_bits, symmetric, loss, per_channel)
            best = np.minimum(best, l_)
    return best


def per_channel_loss(data, neg, pos, n_bits, symmetric, loss, per_channel):
    out = loop_loss(data, neg, pos, n_bits, symmetric, loss, per_channel)
    return np.atleast_1d(out.numpy())


def loss_at(data, x_min, x_max, n_bits, symmetric, per_channel, loss="mse"):
    if not per_channel:
        return per_channel_loss(data, x_min[0].item(), x_max[0].item(), n_bits, symmetric, loss, False)
    return np.array([
        per_channel_loss(data, x_min[c].item(), x_max[c].item(), n_bits, symmetric, loss, True)[c]
        for c in range(len(data))
    ])


@pytest.mark.parametrize(
    "n_bits,symmetric,per_channel,one_sided",
    [(8, True, False, False), (4, True, True, False), (4, False, False, True), (4, False, False, False)],
)
def test_golden_section_quality(n_bits, symmetric, per_channel, one_sided):
    torch.manual_seed(1)
    data = torch.randn(4, 1024) * torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None]
    data = data.abs() if one_sided else data + (0.0 if symmetric else 0.4)
    space = define_search_space(data, n_bits, symmetric, per_channel, 100, 0.5)
    x_min, x_max = golden_section_range(data, space, n_bits, symmetric)
    assert x_min.dtype == torch.float32 and x_min.shape == (space.channels,)
    if symmetric or one_sided:
        assert torch.equal(x_min, torch.zeros_like(x_min) if one_sided else -x_max)
    ours = loss_at(data, x_min, x_max, n_bits, symmetric, per_channel)
    best = fine_best(data, space, n_bits, symmetric, per_channel, n_r=300 if space.two_d else 600)
    assert (ours <= best * 1.01).all(), (ours / best)


@pytest.mark.parametrize("symmetric", [True, False])
def test_golden_section_quality_with_subsampled_scan(monkeypatch, symmetric):
    import tquant.kernels.range_search as rs

    monkeypatch.setattr(rs, "_SCAN_SAMPLE", 256)  # 4096 values: the scans see every 16th + the tail
    torch.manual_seed(3)
    data = torch.distributions.StudentT(3.0).sample((4096,)) + (0.0 if symmetric else 0.3)
    space = define_search_space(data, 4, symmetric, False, 100, 0.5)
    x_min, x_max = golden_section_range(data, space, 4, symmetric)
    ours = loss_at(data.reshape(1, -1), x_min, x_max, 4, symmetric, False)
    best = fine_best(data.reshape(1, -1), space, 4, symmetric, False, n_r=300 if space.two_d else 600)
    assert ours[0] <= best[0] * 1.01, ours / best


def test_golden_section_cross_entropy():
    data = torch.randn(8, 16) * 2
    space = define_search_space(data, 4, True, False, 100, 0.5)
    x_min, x_max = golden_section_range(data, space, 4, True, loss="cross_entropy")
    ours = loss_at(data, x_min, x_max, 4, True, False, "cross_entropy")
    best = fine_best(data, space, 4, True, False, "cross_entropy")
    assert ours[0] <= best[0] * 1.01


def test_golden_section_bare_and_fixed_iters():
    data = torch.randn(2048)
    space = define_search_space(data, 8, True, False, 100, 0.5)
    a = golden_section_range(data, space, 8, True, scan=0)
    b = golden_section_range(data, space, 8, True, iters=40)
    for x_min, x_max in (a, b):
        assert 1.0 < x_max.item() < space.max_search_range and x_min.item() == -x_max.item()


@pytest.mark.parametrize("symmetric", [True, False])
def test_golden_section_vs_scipy(symmetric):
    optimize = pytest.importorskip("scipy.optimize")
    torch.manual_seed(2)
    n_bits = 4
    data = torch.randn(4096) + (0.0 if symmetric else 0.5)
    space = define_search_space(data, n_bits, symmetric, False, 100, 0.5)
    R = space.max_search_range

    def f(neg, pos):
        return float(loop_loss(data, neg, pos, n_bits, symmetric, "mse", False))

    # aihwkit's calls of scipy's bounded minimize_scalar
    if symmetric:
        res = optimize.minimize_scalar(lambda r: f(-r, r), bounds=(0.01 * R, R), method="Bounded")
        ref = res.fun
    else:
        skew = space.max_int_skew

        def inner(r):
            m = 2 * r / (2**n_bits - 1) * skew
            return optimize.minimize_scalar(lambda s: f(-r + s, r + s), bounds=(-m, m), method="Bounded")

        res = optimize.minimize_scalar(lambda r: inner(r).fun, bounds=(0.01 * R, R), method="Bounded")
        sub = inner(res.x)
        ref = f(-res.x + sub.x, res.x + sub.x)
    x_min, x_max = golden_section_range(data, space, n_bits, symmetric)
    ours = f(x_min.item(), x_max.item())
    assert ours <= ref * 1.01


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_errors_name_the_field():
    data = torch.randn(4, 8)
    with pytest.raises(ValueError, match="n_bits"):
        define_search_space(data, 1, True, False)
    with pytest.raises(ValueError, match="n_bits"):
        define_search_space(data, 17, True, False)
    with pytest.raises(ValueError, match="n_bits"):
        define_search_space(data, 8.0, True, False)
    with pytest.raises(ValueError, match="num_candidates"):
        define_search_space(data, 8, True, False, num_candidates=0)
    with pytest.raises(ValueError, match="range_margin"):
        define_search_space(data, 8, True, False, range_margin=float("nan"))
    with pytest.raises(ValueError, match="data"):
        define_search_space(torch.full((3,), float("nan")), 8, True, False)
    with pytest.raises(ValueError, match="data"):
        define_search_space(torch.empty(0), 8, True, False)
    space = define_search_space(data, 4, True, False, 10)
    with pytest.raises(ValueError, match="loss"):
        grid_losses(data, space, 4, True, loss="mae")
    with pytest.raises(ValueError, match="loss"):
        golden_section_range(data, space, 4, True, loss="kl")
    with pytest.raises(ValueError, match="n_bits"):
        grid_losses(data, space, 8, True)
    with pytest.raises(ValueError, match="symmetric"):
        grid_losses(data, space, 4, False)
    # a later batch without a finite value adds nothing (no host sync to check it)
    empty_losses = grid_losses(torch.full((4, 8), float("inf")), space, 4, True)
    assert torch.isinf(empty_losses[:, 0]).all() and (empty_losses[:, 1:] == 0).all()
    assert (grid_losses(torch.empty(0, 8), space, 4, True)[:, 1:] == 0).all()
    with pytest.raises(ValueError, match="data"):
        golden_section_range(torch.full((4, 8), float("nan")), space, 4, True)
    with pytest.raises(ValueError, match="data"):
        grid_losses(torch.randn(8), space, 4, True, loss="cross_entropy")
    with pytest.raises(ValueError, match="loss_array"):
        best_range(torch.zeros(1, 5), space, 4)
    with pytest.raises(ValueError, match="iters"):
        golden_section_range(data, space, 4, True, iters=0)
    with pytest.raises(ValueError, match="scan"):
        golden_section_range(data, space, 4, True, scan=2)
    pc = define_search_space(data, 4, True, True, 10)
    with pytest.raises(ValueError, match="data"):
        grid_losses(torch.randn(5, 8), pc, 4, True)


def test_no_candidate_is_nan_for_constant_data():
    # All-zero data with no margin: every candidate collapses to the [0, EPS] safe range.
    data = torch.zeros(3, 4)
    space = define_search_space(data, 4, True, False, 5, 0.0)
    losses = grid_losses(data, space, 4, True)
    assert not torch.isnan(losses).any()
    x_min, x_max = best_range(losses, space, 4)
    assert math.isfinite(x_min.item()) and math.isfinite(x_max.item())


# ------------------------------------------------------------------------------------------
# the Triton path (interpreter on tiny tensors; compiled on a GPU) against the torch path
# ------------------------------------------------------------------------------------------



def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


TINY_CASES = {
    "gauss-sym": (lambda: torch.randn(3, 37), 4, True, False),
    "gauss-asym-2d": (lambda: torch.randn(3, 37) + 0.3, 3, False, False),
    "relu-asym": (lambda: torch.relu(torch.randn(3, 37)), 4, False, False),
    "heavy-sym-pc": (lambda: torch.distributions.StudentT(2.0).sample((3, 37)), 4, True, True),
    "gauss-asym-pc": (lambda: torch.randn(3, 37) - 0.2, 3, False, True),
}


@needs_triton
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_triton_grid_losses_match_torch_and_loop(case):
    make, n_bits, symmetric, per_channel = TINY_CASES[case]
    data = make()
    space = define_search_space(data, n_bits, symmetric, per_channel, 6, 0.5)
    with K.use_backend("torch"):
        ref = grid_losses(data, space, n_bits, symmetric)
    with K.use_backend("triton"):
        got = grid_losses(data.to(_triton_device()), space, n_bits, symmetric).cpu()
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    # and against aihwkit's loop itself
    sp = loop_space(data, n_bits, symmetric, per_channel, 6, 0.5)
    loop = torch.from_numpy(loop_grid(data, sp, n_bits, symmetric, "mse", per_channel, 6))
    torch.testing.assert_close(got[:, 1:], loop[:, 1:], rtol=1e-5, atol=1e-9)
    assert_same_pick(got, loop, space, n_bits)


@needs_triton
def test_triton_grid_ignores_non_finite_and_fp16():
    data = torch.randn(2, 40)
    space = define_search_space(data, 4, False, True, 5, 0.5)
    bad = data.clone()
    bad[0, 3], bad[1, 7], bad[1, 9] = float("nan"), float("inf"), float("-inf")
    clean = data.clone()
    clean[0, 3] = clean[1, 7] = clean[1, 9] = 0.0
    with K.use_backend("triton"):
        got = grid_losses(bad.to(_triton_device()), space, 4, False).cpu()
    with K.use_backend("torch"):
        ref = grid_losses(clean, space, 4, False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    half = data.half()
    with K.use_backend("triton"):
        got = grid_losses(half.to(_triton_device()), space, 4, False).cpu()
    with K.use_backend("torch"):
        ref = grid_losses(half, space, 4, False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("symmetric,per_channel", [(True, False), (False, False), (True, True)])
def test_triton_golden_section_matches_torch(symmetric, per_channel):
    data = torch.randn(2, 48) * torch.tensor([[0.5], [1.5]]) + (0.0 if symmetric else 0.3)
    space = define_search_space(data, 4, symmetric, per_channel, 100, 0.5)
    with K.use_backend("torch"):
        ref = golden_section_range(data, space, 4, symmetric, iters=6, scan=5)
    with K.use_backend("triton"):
        got = golden_section_range(data.to(_triton_device()), space, 4, symmetric, iters=6, scan=5)
    got = tuple(t.cpu() for t in got)
    # Same steps on the same losses up to fp32 rounding: the same range, or one as good.
    ours = loss_at(data, *got, 4, symmetric, per_channel)
    theirs = loss_at(data, *ref, 4, symmetric, per_channel)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@gpu
@pytest.mark.parametrize("symmetric,per_channel", [(True, False), (False, False), (False, True)])
def test_gpu_grid_search_matches_cpu(symmetric, per_channel):
    data = torch.distributions.StudentT(3.0).sample((64, 4096)) * 0.02
    space = define_search_space(data, 8, symmetric, per_channel, 100, 0.5)
    with K.use_backend("torch"):
        ref = grid_losses(data, space, 8, symmetric)
    got = grid_losses(data.cuda(), space, 8, symmetric)  # auto: Triton on CUDA
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-7)
    assert_same_pick(got.cpu(), ref, space, 8)
    x_min, x_max = golden_section_range(data.cuda(), space, 8, symmetric)
    assert x_min.is_cuda and torch.isfinite(x_min).all() and (x_max > 0).all()


# ------------------------------------------------------------------------------------------
# estimators: chosen ranges against aihwkit's algorithm, bad input, configuration errors
# ------------------------------------------------------------------------------------------


def assert_same_pick(got, ref, space, n_bits, rtol=1e-5):
    """The arg-min of ``got`` is the arg-min of ``ref``, or ties with it within ``rtol``."""
    g_min, g_max = best_range(got, space, n_bits)
    r_min, r_max = best_range(ref, space, n_bits)
    flat_g = got.reshape(space.channels, -1)
    flat_r = ref.reshape(space.channels, -1)
    for c in range(space.channels):
        if g_min[c] == r_min[c] and g_max[c] == r_max[c]:
            continue
        picked = flat_r[c, flat_g[c].argmin()]
        assert picked <= flat_r[c].min() * (1 + rtol), (c, picked, flat_r[c].min())


def _estimator(symmetric, per_channel, opt, loss="mse", n_bits=4, num_candidates=12):
    from tquant.config import OptMethod
    from tquant.quantizers import AsymmetricUniformQuantizer, SymmetricUniformQuantizer
    from tquant.range_estimators import CrossEntropyEstimator, MSE_Estimator

    q = (SymmetricUniformQuantizer if symmetric else AsymmetricUniformQuantizer)(n_bits, per_channel=per_channel)
    cls = MSE_Estimator if loss == "mse" else CrossEntropyEstimator
    return cls(num_candidates, getattr(OptMethod, opt), 0.5, per_channel=per_channel, quantizer=q)


DATA = {
    "gaussian": lambda: torch.randn(6, 50),
    "heavy-tailed": lambda: torch.distributions.StudentT(2.0).sample((6, 50)),
    "relu": lambda: torch.relu(torch.randn(6, 50)),
    "per-channel-scales": lambda: torch.randn(6, 50) * torch.linspace(0.2, 3.0, 6)[:, None] + 0.1,
}


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("symmetric,per_channel", [(True, False), (False, False), (True, True), (False, True)])
def test_estimator_grid_ranges_equal_aihwkit_loop(kind, symmetric, per_channel):
    # Two batches: aihwkit accumulates the loss arrays, then picks the arg-min.
    b1, b2 = DATA[kind](), DATA[kind]()
    if kind == "relu":
        b2 = b2.abs()
    est = _estimator(symmetric, per_channel, "grid")
    est(b1)
    x_min, x_max = est(b2)
    sp = loop_space(b1, 4, symmetric, per_channel, 12, 0.5)
    two_d = not (sp["one_sided"] or symmetric)
    arr = sum(loop_grid(b, sp, 4, symmetric, "mse", per_channel, 12) for b in (b1, b2))
    ref_min, ref_max = loop_best(arr, sp, 4, two_d)
    x_min, x_max = x_min.reshape(-1), x_max.reshape(-1)
    for c in range(len(ref_min)):
        if x_min[c] == ref_min[c] and x_max[c] == ref_max[c]:
            continue
        # a tie in the loss: ours must be as good as aihwkit's pick
        flat = arr[c].reshape(-1)
        assert est.loss_array[c].reshape(-1).argmin() != int(np.argmin(flat))
        assert flat[int(est.loss_array[c].reshape(-1).argmin())] <= flat.min() * (1 + 1e-5)


def test_estimator_cross_entropy_grid_equal_aihwkit_loop():
    data = torch.randn(4, 6, 3) * 2
    est = _estimator(True, False, "grid", loss="cross_entropy", num_candidates=8)
    x_min, x_max = est(data)
    sp = loop_space(data, 4, True, False, 8, 0.5)
    arr = loop_grid(data, sp, 4, True, "cross_entropy", False, 8)
    ref_min, ref_max = loop_best(arr, sp, 4, False)
    assert x_min.item() == ref_min[0] and x_max.item() == ref_max[0]


@pytest.mark.parametrize("opt", ["grid", "golden_section"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "make",
    [lambda: torch.zeros(4, 8), lambda: torch.full((4, 8), 3.0), lambda: torch.full((4, 8), -2.0),
     lambda: torch.tensor([[1.0, float("nan"), -2.0, float("inf")], [0.5, float("-inf"), 0.0, 0.25]])],
    ids=["zeros", "constant", "negative-constant", "nan-inf"],
)
def test_estimator_bad_input_gives_finite_valid_range(opt, symmetric, make):
    from tquant.kernels.reference import qparams_from_range

    est = _estimator(symmetric, False, opt)
    x_min, x_max = est(make())
    # aihwkit's 2-D search may pick a range on one side of zero; the quantizer then widens it
    # to contain zero: finite, ordered, and a positive finite scale.
    assert torch.isfinite(x_min) and torch.isfinite(x_max) and x_min < x_max
    delta, zero_float, _ = qparams_from_range(x_min, x_max, 4, symmetric)
    assert torch.isfinite(delta) and delta > 0 and torch.isfinite(zero_float)


@pytest.mark.parametrize("make", [lambda: torch.empty(0, 8), lambda: torch.full((3, 4), float("nan"))],
                         ids=["empty", "all-nan"])
def test_estimator_no_finite_value_is_a_clear_error(make):
    est = _estimator(True, False, "grid")
    est.quantizer.layer_name = "fc1.weight_quantizer"
    with pytest.raises(ValueError, match=r"fc1\.weight_quantizer: MSE_Estimator: .*no finite value"):
        est(make())


@pytest.mark.parametrize("field,value", [("num_candidates", 1), ("num_candidates", 0), ("num_candidates", 2.5),
                                         ("range_margin", 0.0), ("range_margin", -1.0),
                                         ("range_margin", float("nan"))])
def test_bad_search_configuration_names_the_field(field, value):
    from tquant.config import MSEEstimatorParams, OptMethod
    from tquant.errors import QuantizationConfigError

    kwargs = {"num_candidates": 10, "range_margin": 0.5, field: value}
    with pytest.raises(QuantizationConfigError, match=f"MSEEstimatorParams.{field}"):
        MSEEstimatorParams(OptMethod.grid, **kwargs)
    with pytest.raises(QuantizationConfigError, match=f"MSE_Estimator.{field}"):
        _estimator_kwargs(**kwargs)


def _estimator_kwargs(num_candidates, range_margin):
    from tquant.config import OptMethod
    from tquant.quantizers import SymmetricUniformQuantizer
    from tquant.range_estimators import MSE_Estimator

    return MSE_Estimator(num_candidates, OptMethod.grid, range_margin, quantizer=SymmetricUniformQuantizer(8))



def test_bench_search_quick_runs_and_reports(tmp_path):
    from tquant.benchmarks import bench_search

    argv = ["--quick", "--out", str(tmp_path), "--cases", "grid-sym", "golden-sym", "--providers", "tquant",
            "aihwkit-algo", "--reps", "2", "--warmup", "1", "--num-candidates", "6", "--no-plot", "--devices", "cpu"]
    assert bench_search.main(bench_search.build_parser().parse_args(argv)) == 0
    rows = bench_search.common.read_csv(tmp_path / "search.csv")
    assert {(r["case"], r["provider"]) for r in rows} == {
        (c, p) for c in ("grid-sym", "golden-sym") for p in ("tquant", "aihwkit-algo")}
    grid = {r["provider"]: r for r in rows if r["case"] == "grid-sym"}
    # the same accumulated grid: the same range as aihwkit's algorithm, and a measured ratio
    assert grid["tquant"]["same_range"] == "True" and float(grid["tquant"]["speedup_vs_aihwkit"]) > 0
    assert "grid-sym" in (tmp_path / "search.md").read_text()
