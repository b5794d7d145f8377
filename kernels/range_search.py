"""Range searches: percentiles and the MSE / cross-entropy clipping-range searches.

Pure tensor functions (torch only) behind tquant's ``CurrentMinMaxEstimator`` (percentile
branch), ``MSE_Estimator`` and ``CrossEntropyEstimator``; the estimator modules hold the state
(the search space, the accumulated loss array) and call these. Everything runs on the data's
device. The reference behaviour is aihwkit 1.2.0's ``range_estimators.py``:

- :func:`percentile_range` — numpy-style ``'linear'`` percentiles of the finite values;
- :func:`define_search_space` — aihwkit's ``_define_search_range`` (first batch);
- :func:`grid_losses` — the loss of every grid candidate for one batch (aihwkit's loop over
  candidates in ``_perform_1D_search`` / ``_perform_2D_search``, vectorised over candidates);
  the caller accumulates the arrays across batches by adding them;
- :func:`best_range` — the argmin candidate turned back into a range, as aihwkit does;
- :func:`golden_section_range` — aihwkit's golden-section option (scipy's bounded
  ``minimize_scalar``), as a golden-section search in torch vectorised over channels.

Candidate quantizers use tquant's reference numerics (:func:`qparams_from_range`, then
``scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` in fp32 with a true division),
one range for the whole tensor per candidate as aihwkit's temporary per-tensor quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backend import resolve as resolve_backend
from .reference import batch_minmax_reference, grid_bounds, qparams_from_range, scale_and_zero_point, true_divide

__all__ = [
    "LOSSES",
    "SearchSpace",
    "best_range",
    "define_search_space",
    "golden_section_range",
    "grid_losses",
    "percentile_range",
]

LOSSES = ("mse", "cross_entropy")
"""Loss names accepted by :func:`grid_losses` and :func:`golden_section_range`."""

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
# Elements per temporary of the candidate loop: on the CPU large enough that the per-op
# dispatch cost (a few us per op, 5 ops per chunk) stays small, small enough for the cache
# (measured on a 2-core Xeon, 1M elements x 100 candidates: 2^16 86 ms, 2^18 59 ms, 2^20 273 ms);
# on a GPU large enough to keep the device busy with few launches.
_CPU_BLOCK = 1 << 18
_GPU_BLOCK = 1 << 25
# Per-tensor percentiles of at most this many values are taken from a full sort.
_SORT_MAX = 1 << 18
_SAMPLE = 1 << 16
# Golden section: per-tensor MSE scans of more than twice this many values run on a subsample.
_SCAN_SAMPLE = 1 << 16


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_n_bits(n_bits) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 2 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an int in 2..16, got {n_bits!r}")
    return n_bits


def _check_loss(loss) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def _check_finite_data(data: torch.Tensor) -> None:
    # One host read of a single bool; the searches cost many passes over the data anyway.
    if data.numel() == 0 or not bool(torch.isfinite(data).any()):
        raise ValueError(f"data has no finite value (shape {tuple(data.shape)}): no range to search")


def _check_space(space: SearchSpace, n_bits: int, symmetric: bool | None = None) -> None:
    if not isinstance(space, SearchSpace):
        raise ValueError(f"space must be a SearchSpace from define_search_space, got {type(space).__name__}")
    if n_bits != space.n_bits:
        raise ValueError(f"n_bits={n_bits} differs from the search space's n_bits={space.n_bits}")
    if symmetric is not None and bool(symmetric) != space.symmetric:
        raise ValueError(f"symmetric={symmetric} differs from the search space's symmetric={space.symmetric}")


def _check_data_channels(data: torch.Tensor, space: SearchSpace) -> None:
    if space.per_channel and (data.dim() == 0 or data.shape[0] != space.channels):
        raise ValueError(
            f"data of shape {tuple(data.shape)} does not have the search space's {space.channels} "
            "channels along dim 0"
        )


# --------------------------------------------------------------------------------------------
# percentiles
# --------------------------------------------------------------------------------------------


def _check_percentile(percentile) -> float:
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"percentile must be a number in [0, 50), got {percentile!r}") from None
    if isinstance(percentile, bool) or not 0.0 <= p < 50.0:
        raise ValueError(f"percentile must be a number in [0, 50), got {percentile!r}")
    return p


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite: ``aminmax`` is NaN/inf iff some value is (one fast pass)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(torch.stack([lo, hi])).all())


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """numpy's ``_lerp`` on fp32 samples: ``b - a`` in fp32, the rest in fp64, result fp32."""
    diff = (b - a).double()
    a64, b64 = a.double(), b.double()
    out = torch.where(t >= 0.5, b64 - diff * (1.0 - t), a64 + diff * t)
    return out.float()


def _rank_and_weight(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' virtual index ``(n - 1) * q``: (lower rank, upper rank, weight)."""
    vi = (n - 1) * q
    lo = min(int(math.floor(vi)), n - 1)
    return lo, min(lo + 1, n - 1), vi - math.floor(vi)


def _order_stats_kth(v: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """Values of the 1-D ``v`` at 0-based sorted ranks ``ranks`` via ``kthvalue`` (any size)."""
    return [torch.kthvalue(v, r + 1).values for r in ranks]


def _order_stats_pair(v: torch.Tensor, r0: int, r1: int, sample: torch.Tensor) -> list[torch.Tensor]:
    """Sorted ``v[r0]`` and ``v[r1]`` (``r0 <= r1 <= r0 + 1``) of a large 1-D finite ``v``.

    A sorted strided sample of ``v`` brackets the wanted ranks; one counting pass and one
    selection pass then leave a small slice to sort. If the bracket misses (adversarially
    ordered data), fall back to ``kthvalue``: the answer is exact either way.
    """
    n, s = v.numel(), sample.numel()
    p = r0 / max(n - 1, 1)
    sigma = math.sqrt(s * max(p * (1.0 - p), 1.0 / s))
    margin = int(4.0 * sigma) + 16
    lo_i = int(p * (s - 1)) - margin
    hi_i = int(r1 / max(n - 1, 1) * (s - 1)) + margin
    lo_b = sample[lo_i] if lo_i > 0 else None
    hi_b = sample[hi_i] if hi_i < s - 1 else None
    below = int(torch.count_nonzero(v < lo_b)) if lo_b is not None else 0
    if lo_b is None and hi_b is None:
        return _order_stats_kth(v, [r0, r1])
    if lo_b is not None and hi_b is not None and bool(lo_b == hi_b):
        # A run of equal values (e.g. the zeros of a ReLU output): counting is enough.
        n_in = int(torch.count_nonzero(v == lo_b))
        if below <= r0 and below + n_in > r1:
            return [lo_b, lo_b]
        return _order_stats_kth(v, [r0, r1])
    if lo_b is None:
        keep = v <= hi_b
    elif hi_b is None:
        keep = v >= lo_b
    else:
        keep = (v >= lo_b).logical_and_(v <= hi_b)
    inside = v[keep]
    if not (below <= r0 and below + inside.numel() > r1) or inside.numel() > n // 8:
        return _order_stats_kth(v, [r0, r1])
    srt = torch.sort(inside).values
    return [srt[r0 - below], srt[r1 - below]]


def _percentile_flat(v: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both percentiles of the 1-D finite fp32 ``v`` (0-dim fp32 results)."""
    n = v.numel()
    if n == 0:
        inf = torch.tensor(float("inf"), device=v.device)
        return inf, -inf
    lo0, lo1, t_lo = _rank_and_weight(n, q_lo)
    hi0, hi1, t_hi = _rank_and_weight(n, q_hi)
    if n <= _SORT_MAX:
        srt = torch.sort(v).values
        a_lo, b_lo, a_hi, b_hi = srt[lo0], srt[lo1], srt[hi0], srt[hi1]
    else:
        stride = n // _SAMPLE
        sample = torch.sort(v[::stride]).values
        a_lo, b_lo = _order_stats_pair(v, lo0, lo1, sample)
        a_hi, b_hi = _order_stats_pair(v, hi0, hi1, sample)
    t = torch.tensor([t_lo, t_hi], dtype=torch.float64, device=v.device)
    out = _lerp(torch.stack([a_lo, a_hi]), torch.stack([b_lo, b_hi]), t)
    return out[0], out[1]


def _percentile_rows_finite(x: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row percentiles of an all-finite fp32 ``[C, M]`` (``M >= 1``): ``[C]`` fp32 each."""
    m = x.shape[1]
    lo0, lo1, t_lo = _rank_and_weight(m, q_lo)
    hi0, hi1, t_hi = _rank_and_weight(m, q_hi)
    k_lo, k_hi = lo1 + 1, m - hi0
    if max(k_lo, k_hi) <= max(64, m // 4):
        # Thin tails: the few smallest / largest values of every row, sorted.
        small = torch.topk(x, k_lo, dim=1, largest=False, sorted=True).values
        large = torch.topk(x, k_hi, dim=1, largest=True, sorted=True).values
        a_lo, b_lo = small[:, lo0], small[:, lo1]
        a_hi, b_hi = large[:, m - 1 - hi0], large[:, m - 1 - hi1]
    else:
        a_lo, b_lo = _kth_and_next(x, lo0, lo1)
        a_hi, b_hi = _kth_and_next(x, hi0, hi1)
    t_lo_t = torch.tensor(t_lo, dtype=torch.float64, device=x.device)
    t_hi_t = torch.tensor(t_hi, dtype=torch.float64, device=x.device)
    return _lerp(a_lo, b_lo, t_lo_t), _lerp(a_hi, b_hi, t_hi_t)


def _kth_and_next(x: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sorted values at ranks ``r0`` and ``r1 in {r0, r0 + 1}`` of ``[C, M]``."""
    a = torch.kthvalue(x, r0 + 1, dim=1).values
    if r1 == r0:
        return a, a
    # The next order statistic is ``a`` again if ``a`` occurs often enough, else the
    # smallest value above ``a``: two cheap passes instead of a second selection.
    col = a.unsqueeze(1)
    count = torch.count_nonzero(x <= col, dim=1)
    above = torch.where(x > col, x, torch.full_like(x, float("inf"))).amin(dim=1)
    return a, torch.where(count >= r1 + 1, a, above)


def _percentile_rows_masked(x: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row percentiles of the finite values of ``[C, M]`` (rows differ in their counts)."""
    finite = torch.isfinite(x)
    n = finite.sum(dim=1)
    srt = torch.sort(torch.where(finite, x, torch.full_like(x, float("inf"))), dim=1).values
    last = (n - 1).clamp(min=0)
    outs = []
    for q in (q_lo, q_hi):
        vi = (n - 1).double() * q
        r0 = torch.minimum(torch.floor(vi).long().clamp(min=0), last)
        r1 = torch.minimum(r0 + 1, last)
        a = srt.gather(1, r0.unsqueeze(1)).squeeze(1)
        b = srt.gather(1, r1.unsqueeze(1)).squeeze(1)
        outs.append(_lerp(a, b, vi - torch.floor(vi)))
    inf = torch.full_like(outs[0], float("inf"))
    empty = n == 0
    return torch.where(empty, inf, outs[0]), torch.where(empty, -inf, outs[1])


def percentile_range(x: torch.Tensor, percentile: float, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``percentile``-th and ``(100 - percentile)``-th percentiles of the finite values of ``x``.

    Percentiles follow numpy's default ``'linear'`` method: sorted index
    ``(n - 1) * p / 100``, linear interpolation between its two neighbours, done as numpy does
    it (``b - a`` in fp32, the interpolation in fp64), then rounded to fp32 as aihwkit's
    ``torch.Tensor(np.percentile(...))`` does. Computed on ``x``'s device with torch
    (``kthvalue`` / ``topk`` / sorting a small bracket; never ``torch.quantile``, which refuses
    inputs over 16M elements), so any size works. Host reads: the value count and, for large
    per-tensor inputs, the bracket checks.

    Unlike aihwkit 1.2.0, whose per-tensor branch computes ``np.percentile(x, (p, 100))`` and so
    never clips the upper tail (a bug), both tails are clipped per tensor as well as per channel.

    Args:
        x: any shape, float dtype (computed in fp32). Non-finite values are ignored.
        percentile: ``p`` in ``[0, 50)``; ``p = 0`` gives the finite min and max.
        axis: ``-1`` per tensor, ``0`` per channel along dim 0 (``x.dim() >= 1``).
    Returns:
        ``(x_min, x_max)``: fp32 0-dim tensors (``axis=-1``) or ``[x.shape[0]]`` (``axis=0``).
        A tensor or channel with no finite value gives ``(+inf, -inf)``, the convention of
        ``batch_minmax``, which the range update turns into a safe range.
    Raises:
        ValueError: ``percentile`` outside ``[0, 50)``, ``axis`` not ``-1``/``0``, or a
        per-channel ``x`` with no dimension.
    """
    p = _check_percentile(percentile)
    if axis not in (-1, 0):
        raise ValueError(f"axis must be -1 (per tensor) or 0 (per channel), got {axis!r}")
    if axis == 0 and x.dim() == 0:
        raise ValueError("x: a per-channel percentile (axis=0) needs a tensor with at least one dimension")
    q_lo, q_hi = p / 100.0, (100.0 - p) / 100.0
    xf = x.detach().float()
    with torch.no_grad():
        if axis < 0:
            flat = xf.reshape(-1)
            if not _all_finite(flat):
                flat = flat[torch.isfinite(flat)]
            return _percentile_flat(flat, q_lo, q_hi)
        rows = xf.reshape(x.shape[0], -1)
        if rows.shape[1] == 0 or rows.shape[0] == 0:
            inf = torch.full((rows.shape[0],), float("inf"), device=x.device)
            return inf, -inf
        if _all_finite(rows):
            return _percentile_rows_finite(rows, q_lo, q_hi)
        return _percentile_rows_masked(rows, q_lo, q_hi)


# --------------------------------------------------------------------------------------------
# MSE / cross-entropy search space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """aihwkit's MSE search state fixed on the first batch (``_define_search_range``).

    Attributes:
        n_bits, symmetric, per_channel: the quantizer the search is for.
        one_sided: ``data.min() >= 0`` on the first batch (finite values).
        channels: rows of the loss array (``data.shape[0]`` per channel, else 1).
        num_candidates: ``N``; candidate ``i`` in ``1..N`` is the range ``step * i``.
        max_pos_thr, max_neg_thr: the clamp of the 2-D candidates' ends (and the search bounds).
        max_search_range: ``R``; ``step = R / N``; golden section searches ``[0.01 R, R]``.
        max_int_skew: ``2**n_bits // 4``, the asymmetry shifts of the 2-D search.
        two_d: the grid is 2-D (asymmetric and not one-sided), else 1-D.
    """

    n_bits: int
    symmetric: bool
    per_channel: bool
    one_sided: bool
    channels: int
    num_candidates: int
    max_pos_thr: float
    max_neg_thr: float
    max_search_range: float
    step: float
    max_int_skew: int
    two_d: bool

    @property
    def loss_shape(self) -> tuple[int, ...]:
        """Shape of the loss array: ``(C, N + 1)`` (1-D) or ``(C, N + 1, max_int_skew, 2)`` (2-D)."""
        if self.two_d:
            return (self.channels, self.num_candidates + 1, self.max_int_skew, 2)
        return (self.channels, self.num_candidates + 1)


def define_search_space(
    data: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    per_channel: bool,
    num_candidates: int = 100,
    range_margin: float = 0.5,
) -> SearchSpace:
    """The search space of aihwkit's ``MSE_Estimator`` from the first batch ``data``.

    1-D search (symmetric, or one-sided data): ``max_pos_thr = max(|min|, max) + margin``,
    ``max_neg_thr = -max_pos_thr``, ``R = max_pos_thr``. 2-D search (asymmetric, data with
    negative values): ``max_pos_thr = max + margin``, ``max_neg_thr = min - margin``,
    ``R = max(|max_pos_thr|, |max_neg_thr|)``. ``step = R / num_candidates`` (fp64, as
    aihwkit's Python floats). ``min``/``max`` are over the finite values (one host read).

    Args:
        data: the first batch, any shape and float dtype; per channel along dim 0.
        n_bits: 2..16. symmetric, per_channel: the quantizer's.
        num_candidates: ``N >= 1``. range_margin: finite, ``>= 0``.
    Raises:
        ValueError: bad ``n_bits``, ``num_candidates`` or ``range_margin``, per-channel data
        without a dimension, or ``data`` without a finite value.
    """
    n_bits = _check_n_bits(n_bits)
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
    margin = float(range_margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"range_margin must be a finite number >= 0, got {range_margin!r}")
    if per_channel and data.dim() == 0:
        raise ValueError("data: per-channel search needs a tensor with at least one dimension")
    dmin_t, dmax_t = batch_minmax_reference(data.detach(), -1)
    dmin, dmax = torch.stack([dmin_t, dmax_t]).tolist()
    if not (math.isfinite(dmin) and math.isfinite(dmax)):
        raise ValueError(f"data has no finite value (shape {tuple(data.shape)}): no range to search")
    one_sided = dmin >= 0
    two_d = not (one_sided or symmetric)
    if two_d:
        max_pos = dmax + margin
        max_neg = dmin - margin
        search = max(abs(max_pos), abs(max_neg))
    else:
        max_pos = max(abs(dmin), dmax) + margin
        max_neg = -max_pos
        search = max_pos
    return SearchSpace(
        n_bits=n_bits,
        symmetric=bool(symmetric),
        per_channel=bool(per_channel),
        one_sided=one_sided,
        channels=int(data.shape[0]) if per_channel else 1,
        num_candidates=num_candidates,
        max_pos_thr=max_pos,
        max_neg_thr=max_neg,
        max_search_range=search,
        step=search / num_candidates,
        max_int_skew=2**n_bits // 4,
        two_d=two_d,
    )


# --------------------------------------------------------------------------------------------
# candidate losses
# --------------------------------------------------------------------------------------------


def _quant_bounds(neg: torch.Tensor, pos: torch.Tensor, n_bits: int, symmetric: bool):
    """Per-candidate ``(scale, lo, hi)`` (fp32, shapes of ``neg``) of the quantizer set to
    ``[neg, pos]`` (fp64 thresholds rounded to fp32, as aihwkit's ``torch.tensor(float).float()``).

    ``clamp(round(x / s) + zp, qmin, qmax) - zp == clamp(round(x / s), qmin - zp, qmax - zp)``
    exactly (all integers below 2^24), which saves two passes per candidate.
    """
    delta, zero_float, signed = qparams_from_range(neg.float(), pos.float(), n_bits, symmetric)
    scale, zp = scale_and_zero_point(delta, zero_float, n_bits, symmetric)
    qmin, qmax = grid_bounds(n_bits, symmetric, signed)
    if symmetric:
        # zp = 0 and one grid for all candidates: 0-dim bounds (``signed`` is one flag).
        return scale, qmin, qmax
    return scale, qmin - zp, qmax - zp


class _Evaluator:
    """The loss of quantizing ``data`` with given per-candidate (and per-row) parameters.

    MSE: ``data`` as rows ``[R, M]`` (``R = C`` per channel, else 1), squared error summed per
    row. Cross entropy: ``data`` as ``[A, S, B]`` (softmax over dim 1 of ``data``), the terms
    ``-softmax(data) * log_softmax(q)`` summed per ``data.shape[0]`` row (per channel) or in
    total. Non-finite values of ``data`` are left out of either loss.
    """

    def __init__(self, data: torch.Tensor, loss: str, per_channel: bool, block: int | None):
        self.loss = loss
        self.per_channel = per_channel
        x = data.detach().float()
        self.out_dtype = data.dtype
        if block is None:
            block = _CPU_BLOCK if data.device.type == "cpu" else _GPU_BLOCK
        self.block = max(1, int(block))
        self.backend = resolve_backend(data)
        if loss == "mse" and self.backend == "triton":
            # The kernel reads the data as it is (any float dtype, non-finite values skipped).
            self.x = data.detach().reshape(data.shape[0], -1) if per_channel else data.detach().reshape(1, -1)
            return
        finite = torch.isfinite(x)
        # A zero quantizes to exactly zero on every grid: zeroing the non-finite values
        # removes them from the squared error at no cost per candidate.
        xz = torch.where(finite, x, torch.zeros_like(x))
        if loss == "mse":
            self.x = xz.reshape(x.shape[0], -1) if per_channel else xz.reshape(1, -1)
            return
        if data.dim() < 2:
            raise ValueError(
                f"data of shape {tuple(data.shape)}: the cross-entropy loss is a softmax over dim 1 "
                "and needs at least 2 dimensions"
            )
        shape3 = (x.shape[0], x.shape[1], -1)
        self.x = xz.reshape(shape3)
        self.finite = finite.reshape(shape3)
        p = torch.softmax(torch.where(self.finite, self.x, torch.full_like(self.x, float("-inf"))), dim=1)
        # A softmax slice without any finite value is NaN: it takes no part in the loss.
        self.p = torch.where(self.finite, p, torch.zeros_like(p))
        # All finite (checked on the CPU only, where reading a flag back costs nothing): no masks.
        self.all_finite = x.device.type == "cpu" and bool(finite.all())

    @property
    def rows(self) -> int:
        return self.x.shape[0] if self.per_channel else 1

    def __call__(self, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Losses ``[K, rows]`` fp64 for ``scale [K, P]`` (``P`` 1 or ``rows``), bounds alike or 0-dim."""
        if self.loss == "mse":
            return self._mse(scale, lo, hi)
        return self._cross_entropy(scale, lo, hi)

    def _dequant(self, xb: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        v = torch.div(xb.unsqueeze(0), s)
        v.round_()
        # Two broadcast binary ops: several times faster than clamp with tensor bounds.
        torch.maximum(v, lo, out=v)
        torch.minimum(v, hi, out=v)
        v.mul_(s)
        if self.out_dtype != torch.float32:
            # The quantizer hands back the input dtype: measure the loss of what it outputs.
            v = v.to(self.out_dtype).float()
        return v

    def _mse(self, scale, lo, hi):
        x = self.x
        if self.backend == "triton":
            from ._triton_range_search import grid_mse_triton

            return grid_mse_triton(x, scale, lo, hi)
        k_all, (r, m) = scale.shape[0], x.shape
        out = torch.zeros((k_all, r), dtype=torch.float64, device=x.device)
        mb = max(1, min(m, self.block // max(r, 1)))
        kc = max(1, self.block // (r * mb))
        s3, lo3, hi3 = _param_views(scale, lo, hi, 1)
        scaled = self.out_dtype == torch.float32
        if scaled and lo3.dim() == 0 and x.device.type == "cpu":
            # One grid for every candidate: Python bounds make the clamp a single pass.
            lo3, hi3 = float(lo3), float(hi3)
        for j in range(0, m, mb):
            xb = x[:, j : j + mb]
            for k in range(0, k_all, kc):
                s, lo_k, hi_k = s3[k : k + kc], _rows(lo3, k, kc), _rows(hi3, k, kc)
                if scaled:
                    out[k : k + kc] += self._scaled_sq_error(xb, s, lo_k, hi_k)
                    continue
                v = self._dequant(xb, s, lo_k, hi_k)
                v.sub_(xb)
                out[k : k + kc] += torch.linalg.vecdot(v, v).double()
        return out

    @staticmethod
    def _scaled_sq_error(xb, s, lo, hi):
        """``sum((x - s * clamp(round(x / s), lo, hi))^2)`` per candidate and row, as
        ``s^2 * sum((u - round(clamp(u, lo, hi)))^2)`` with ``u = x / s`` (clamping before
        rounding is the same for integer bounds): 5 passes instead of 7. Equal to the
        reference loss up to fp32 rounding of the terms (the Triton path computes the
        reference form)."""
        u = torch.div(xb.unsqueeze(0), s)
        if isinstance(lo, float):
            c = torch.clamp(u, lo, hi)
        else:
            c = torch.maximum(u, lo)
            torch.minimum(c, hi, out=c)
        c.round_()
        u.sub_(c)
        s64 = s.reshape(s.shape[0], -1).double()
        return torch.linalg.vecdot(u, u).double() * (s64 * s64)

    def _cross_entropy(self, scale, lo, hi):
        x, finite, p = self.x, self.finite, self.p
        k_all = scale.shape[0]
        out = torch.zeros((k_all, self.rows), dtype=torch.float64, device=x.device)
        kc = max(1, self.block // max(x.numel(), 1))
        s4, lo4, hi4 = _param_views(scale, lo, hi, 2)
        neg_inf = torch.tensor(float("-inf"), device=x.device)
        zero = torch.tensor(0.0, device=x.device)
        p_rows = p.reshape(p.shape[0], -1)
        for k in range(0, k_all, kc):
            q = self._dequant(x, s4[k : k + kc], _rows(lo4, k, kc), _rows(hi4, k, kc))
            if self.all_finite:
                # One fused multiply-and-sum per row (fp32 sums of each row, fp64 across rows).
                # softmax over a non-last dim takes a slow strided kernel: drop a trailing 1
                logq = torch.log_softmax(q.squeeze(3), dim=2) if q.shape[3] == 1 else torch.log_softmax(q, dim=2)
                per_row = -torch.linalg.vecdot(logq.reshape(q.shape[0], p.shape[0], -1), p_rows).double()
                out[k : k + kc] = per_row if self.per_channel else per_row.sum(dim=1, keepdim=True)
                continue
            logq = torch.log_softmax(torch.where(finite, q, neg_inf), dim=2)
            term = torch.where(finite, -p * logq, zero)
            per_row = term.sum(dim=(2, 3), dtype=torch.float64)
            out[k : k + kc] = per_row if self.per_channel else per_row.sum(dim=1, keepdim=True)
        return out


def _param_views(scale, lo, hi, extra: int):
    """``[K, P]`` parameters viewed as ``[K, P, 1 * extra]``; 0-dim bounds stay 0-dim."""
    view = (-1, scale.shape[1]) + (1,) * extra
    return (scale.reshape(view),) + tuple(t if t.dim() == 0 else t.reshape(view) for t in (lo, hi))


def _rows(t, k: int, kc: int):
    return t if isinstance(t, float) or t.dim() == 0 else t[k : k + kc]


def _grid_thresholds(space: SearchSpace, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 candidate ends ``(neg, pos)``, shaped ``[N]`` (1-D) or ``[N, max_int_skew, 2]`` (2-D).

    Same fp64 operations, in the same order, as aihwkit's Python-float loop.
    """
    f64 = torch.float64
    cand = torch.arange(1, space.num_candidates + 1, dtype=f64, device=device)
    if not space.two_d:
        pos = space.step * cand
        neg = torch.zeros_like(pos) if space.one_sided else -space.step * cand
        return neg, pos
    return _skewed_range(space, cand.view(-1, 1, 1),
                         torch.arange(space.max_int_skew, dtype=f64, device=device).view(1, -1, 1),
                         torch.tensor([1.0, -1.0], dtype=f64, device=device).view(1, 1, 2))


def _skewed_range(space: SearchSpace, cand, shift, sign):
    """aihwkit's 2-D candidate: ``[-step*i, step*i]`` shifted by ``±shift`` codes, clamped."""
    start = -space.step * cand
    finish = space.step * cand
    delta = true_divide(finish - start, float(2**space.n_bits - 1))
    skew = (sign * shift) * delta
    neg = torch.clamp(start + skew, min=space.max_neg_thr)
    pos = torch.clamp(finish + skew, max=space.max_pos_thr)
    return neg, pos


def grid_losses(
    data: torch.Tensor,
    space: SearchSpace,
    n_bits: int,
    symmetric: bool,
    loss: str = "mse",
    *,
    block: int | None = None,
) -> torch.Tensor:
    """The loss of every grid candidate on this batch, shaped like aihwkit's ``loss_array``.

    Candidate ``i`` (1..N) of the 1-D search is ``[-step*i, step*i]`` (``[0, step*i]`` for
    one-sided data; a symmetric quantizer then gets an unsigned grid, as aihwkit's
    ``set_quant_range`` gives it). The 2-D search adds ``shift`` in ``0..max_int_skew-1``
    codes of ``delta = 2*step*i / (2^b - 1)`` to both ends, positive (``[..., 0]``) or
    negative (``[..., 1]``), then clamps the ends to ``[max_neg_thr, max_pos_thr]``. Each
    candidate quantizes the whole ``data`` with one range (aihwkit's temporary per-tensor
    quantizer), in fp32 with tquant's reference numerics.

    Losses: ``"mse"`` is the squared error summed per row ``data.view(len(data), -1)``, then
    over rows per tensor; ``"cross_entropy"`` is ``sum(-softmax(data, 1) * log_softmax(q, 1))``
    (``data.dim() >= 2``). Per channel, tquant's cross entropy sums the terms of each
    ``data.shape[0]`` row separately, so each channel gets its own range; aihwkit adds the
    total to every channel, which gives every channel the same range (per-channel cross
    entropy is not really supported there). Non-finite values of ``data`` are left out of
    both losses (aihwkit would get NaN for every candidate). Vectorised over candidates in
    chunks of about ``block`` elements; equal to aihwkit's loop up to fp32 rounding (the CPU path
    sums ``scale^2 * (x / scale - code)^2``, the Triton kernel the reference form) and summation order.

    Args:
        data: this batch, any shape and float dtype; per channel: ``data.shape[0] == C``.
        space: from :func:`define_search_space`; ``n_bits``/``symmetric`` must match it.
        loss: ``"mse"`` or ``"cross_entropy"``.
        block: elements per temporary (default: sized for the device).
    Returns:
        float64 ``[C, N+1]`` (1-D) or ``[C, N+1, max_int_skew, 2]`` (2-D) on ``data``'s device,
        candidate 0 (the empty range) set to ``+inf``; add the arrays of later batches.
    Raises:
        ValueError: unknown ``loss``, mismatched ``space``.

    No host synchronisation (the search space, fixed on the first batch, already holds every
    host value needed): a batch without any finite value (empty, all NaN/inf) adds zero to
    every candidate's loss.
    """
    n_bits = _check_n_bits(n_bits)
    loss = _check_loss(loss)
    _check_space(space, n_bits, symmetric)
    _check_data_channels(data, space)
    with torch.no_grad():
        neg, pos = _grid_thresholds(space, data.device)
        scale, lo, hi = _quant_bounds(neg.reshape(-1), pos.reshape(-1), n_bits, space.symmetric)
        evaluator = _Evaluator(data, loss, space.per_channel, block)
        losses = evaluator(scale.unsqueeze(1), *(t.unsqueeze(1) if t.dim() else t for t in (lo, hi)))
        out = torch.full(space.loss_shape, float("inf"), dtype=torch.float64, device=data.device)
        out[:, 1:] = losses.t().reshape((space.channels,) + tuple(neg.shape))
    return out


def best_range(
    loss_array: torch.Tensor, space: SearchSpace, n_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmin candidate of ``loss_array`` turned back into a range, per channel.

    As aihwkit's ``_perform_1D_search`` (``[-step*i, step*i]``, ``[0, step*i]`` one-sided) and
    ``_perform_2D_search`` (first minimum in C order over ``(i, shift, reverse)``, the skewed
    ends clamped to ``[max_neg_thr, max_pos_thr]``), computed in fp64 then rounded to fp32.

    Args:
        loss_array: float ``space.loss_shape`` (the sum of :func:`grid_losses` over batches).
    Returns:
        ``(x_min, x_max)``: fp32 ``[C]`` (``[1]`` per tensor) on ``loss_array``'s device.
    Raises:
        ValueError: ``loss_array`` of the wrong shape, mismatched ``space``/``n_bits``.
    """
    n_bits = _check_n_bits(n_bits)
    _check_space(space, n_bits)
    if tuple(loss_array.shape) != space.loss_shape:
        raise ValueError(f"loss_array has shape {tuple(loss_array.shape)}, the search space needs "
                         f"{space.loss_shape}")
    with torch.no_grad():
        flat = loss_array.reshape(space.channels, -1).argmin(dim=1)
        if not space.two_d:
            cand = flat.double()
            x_max = space.step * cand
            x_min = torch.zeros_like(x_max) if space.one_sided else -space.step * cand
            return x_min.float(), x_max.float()
        per_cand = space.max_int_skew * 2
        cand = torch.div(flat, per_cand, rounding_mode="floor").double()
        shift = torch.div(flat % per_cand, 2, rounding_mode="floor").double()
        sign = 1.0 - 2.0 * (flat % 2).double()
        x_min, x_max = _skewed_range(space, cand, shift, sign)
        return x_min.float(), x_max.float()


# --------------------------------------------------------------------------------------------
# golden section
# --------------------------------------------------------------------------------------------


def _golden_iters(width: float, xatol: float) -> int:
    """Golden-section steps until a bracket ``width`` wide is at most ``xatol`` wide."""
    if not width > xatol:
        return 1
    return max(1, min(200, math.ceil(math.log(width / xatol) / math.log(1.0 / _INV_PHI))))


def _golden(f, a: torch.Tensor, b: torch.Tensor, iters: int):
    """Golden-section minimisation of ``f`` over ``[a, b]``, elementwise over any shape (fp64).

    ``f(x) -> (loss, aux)``, both shaped like ``x`` (``aux`` may be None). Returns the best
    evaluated point, its loss and its ``aux``.
    """
    c = b - _INV_PHI * (b - a)
    d = a + _INV_PHI * (b - a)
    fc, ac = f(c)
    fd, ad = f(d)
    take_c = fc <= fd
    best_x, best_f = torch.where(take_c, c, d), torch.where(take_c, fc, fd)
    best_a = None if ac is None else torch.where(take_c, ac, ad)
    for _ in range(iters):
        left = fc <= fd  # the minimum is in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        x = torch.where(left, b - _INV_PHI * (b - a), a + _INV_PHI * (b - a))
        fx, ax = f(x)
        c, d = torch.where(left, x, d), torch.where(left, c, x)
        fc, fd = torch.where(left, fx, fd), torch.where(left, fc, fx)
        better = fx < best_f
        best_x, best_f = torch.where(better, x, best_x), torch.where(better, fx, best_f)
        if best_a is not None:
            best_a = torch.where(better, ax, best_a)
    return best_x, best_f, best_a


def _scan_golden(f, a: torch.Tensor, b: torch.Tensor, scan: int, iters: int | None, xatol: float, width: float,
                 f_scan=None):
    """Minimise ``f`` over ``[a, b]`` (fp64, any shape ``S``): a batched scan, then golden section.

    The quantization losses are rough (piecewise in the range, with local minima that trap a
    plain golden-section or Brent search); ``scan`` equally spaced points, evaluated in one
    batched call of ``f`` on ``[scan, *S]``, pick the bracket between the neighbours of the best
    one, where golden section refines it. ``width`` is the widest ``b - a`` (a host float) and
    sets the default step count. ``f_scan`` (optional) is a cheaper stand-in of ``f`` for the
    scan (the loss on a subsample of the data): the bracket then spans two scan points on each
    side of its best one, and that point is re-evaluated with ``f``. Returns ``(x, loss, aux)``
    of the best point evaluated with ``f``.
    """
    best_x = best_f = best_a = None
    if scan >= 3:
        t = torch.linspace(0.0, 1.0, scan, dtype=torch.float64, device=a.device).view((-1,) + (1,) * a.dim())
        xs = a + (b - a) * t
        fs, aux = (f_scan or f)(xs)
        idx = fs.argmin(dim=0, keepdim=True)
        best_x = xs.gather(0, idx)[0]
        if f_scan is None:
            reach = 1
            best_f = fs.gather(0, idx)[0]
            best_a = None if aux is None else aux.gather(0, idx)[0]
        else:
            reach = 2
            best_f, best_a = f(best_x)
        a = xs.gather(0, (idx - reach).clamp(min=0))[0]
        b = xs.gather(0, (idx + reach).clamp(max=scan - 1))[0]
        width = width * 2.0 * reach / (scan - 1)
    n = iters if iters is not None else _golden_iters(width, xatol)
    x, fx, ax = _golden(f, a, b, n)
    if best_x is None:
        return x, fx, ax
    better = fx < best_f
    out_a = None if ax is None else torch.where(better, ax, best_a)
    return torch.where(better, x, best_x), torch.where(better, fx, best_f), out_a


class _ScanSample:
    """A cheap stand-in for the MSE of a large per-tensor ``data`` in the golden-section scans.

    The squared error of heavy-tailed data is dominated by its few largest values, which a
    plain subsample misses. So the values above the ``1 - 1/stride`` quantile of ``|x|`` (taken
    on a strided sample) are all kept (their loss exactly), and the rest is a strided sample
    of the data with those values zeroed (zeros cost nothing), weighted by the stride:
    ``loss ~ stride * loss(bulk sample) + loss(tail)``. Built on the device, no host sync.
    Returns None (use all the data) for per-channel searches, cross entropy, or rows shorter
    than ``2 * _SCAN_SAMPLE``.
    """

    def __init__(self, bulk: torch.Tensor, tail: torch.Tensor, stride: int):
        self.bulk = _Evaluator(bulk, "mse", False, None)
        self.tail = _Evaluator(tail, "mse", False, None)
        self.stride = float(stride)
        self.rows = 1

    @classmethod
    def build(cls, data: torch.Tensor, loss: str, per_channel: bool):
        if loss != "mse" or per_channel:
            return None
        flat = data.detach().reshape(-1)
        stride = flat.numel() // _SCAN_SAMPLE
        if stride < 2:
            return None
        mag = flat.float().abs().nan_to_num(nan=0.0, posinf=0.0)
        sample = mag[::stride]
        thr = torch.kthvalue(sample, max(1, sample.numel() - sample.numel() // stride)).values
        is_tail = mag > thr
        bulk = torch.where(is_tail, torch.zeros_like(flat), flat)[::stride]
        return cls(bulk, flat[is_tail], stride)

    def __call__(self, scale, lo, hi):
        return self.bulk(scale, lo, hi) * self.stride + self.tail(scale, lo, hi)


def golden_section_range(
    data: torch.Tensor,
    space: SearchSpace,
    n_bits: int,
    symmetric: bool,
    loss: str = "mse",
    iters: int | None = None,
    xatol: float = 1e-5,
    scan: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """aihwkit's golden-section range search on this batch, vectorised over channels.

    aihwkit minimises with scipy's bounded ``minimize_scalar`` (Brent, ``xatol=1e-5``):
    symmetric or one-sided, the loss of ``[-r, r]`` (``[0, r]`` one-sided) over
    ``r in [0.01 R, R]``; asymmetric, an outer search over ``r`` whose loss is the minimum of
    an inner search over the shift ``s in [-m(r), m(r)]``, ``m(r) = 2r / (2^b - 1) *
    max_int_skew``, of the loss of ``[-r + s, r + s]`` (no clamp), then ``s`` at the best ``r``.

    Here each (outer and inner) search first evaluates ``scan`` equally spaced points in one
    batched call, then runs a golden-section search with a fixed step count (``iters``;
    default: until the bracket is ``xatol`` wide) between the neighbours of the best one, and
    returns the best point evaluated. The scan is a tquant addition: the loss is rough in the
    range and a bare golden-section or Brent search stops in a local minimum (scipy's result
    can be several % worse than the best range); ``scan=0`` gives a bare golden-section search
    over the whole interval. No host synchronisation inside. Results are close to scipy's
    optimum or better, not equal bit for bit.

    Per channel each channel searches its own range on its own row(s) (aihwkit's
    ``data[c]``); for cross entropy the softmax stays over dim 1 of ``data`` (aihwkit's
    per-channel golden section takes it over dim 1 of ``data[c]``, i.e. dim 2 of ``data``,
    inconsistent with its grid search). Losses and non-finite handling as :func:`grid_losses`.

    Args:
        data: this batch (aihwkit re-runs the search on every batch: no accumulation).
        space: from :func:`define_search_space` (its ``R``, ``one_sided``, ``max_int_skew``).
        loss: ``"mse"`` or ``"cross_entropy"``.
        iters: golden-section steps per search (outer and inner), ``>= 1``; None: from ``xatol``.
        xatol: target final bracket width (absolute, as scipy's) when ``iters`` is None.
        scan: points of the initial scan, 0 (none) or ``>= 3``; the inner (shift) search of the
            asymmetric case scans ``max(3, scan // 4)`` points. Per-tensor MSE searches of more
            than ``2 * _SCAN_SAMPLE`` values scan a subsample (every largest value, a strided
            sample of the rest; see ``_ScanSample``) and widen the bracket to two scan points
            each side of the best; golden section itself always uses all the data.
    Returns:
        ``(x_min, x_max)``: fp32 ``[C]`` (``[1]`` per tensor) on ``data``'s device.
    Raises:
        ValueError: unknown ``loss``, bad ``iters``/``xatol``/``scan``, mismatched ``space``,
        data without a finite value.
    """
    n_bits = _check_n_bits(n_bits)
    loss = _check_loss(loss)
    _check_space(space, n_bits, symmetric)
    _check_data_channels(data, space)
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be an int >= 1 or None, got {iters!r}")
    if isinstance(xatol, bool) or not (isinstance(xatol, (int, float)) and xatol > 0 and math.isfinite(xatol)):
        raise ValueError(f"xatol must be a finite number > 0, got {xatol!r}")
    if isinstance(scan, bool) or not isinstance(scan, int) or scan < 0 or scan in (1, 2):
        raise ValueError(f"scan must be 0 or an int >= 3, got {scan!r}")
    _check_finite_data(data)
    big_r = space.max_search_range
    levels = float(2**n_bits - 1)
    device = data.device
    with torch.no_grad():
        evaluator = _Evaluator(data, loss, space.per_channel, None)
        channels = evaluator.rows
        # Large MSE inputs: the scans (most of the evaluations) run on a strided subsample.
        sub_evaluator = _ScanSample.build(data, loss, space.per_channel) if scan >= 3 else None

        def loss_of(neg: torch.Tensor, pos: torch.Tensor, ev=evaluator) -> torch.Tensor:
            # neg, pos: fp64 [..., C] -> loss [..., C]; leading dims are candidates.
            shape = neg.shape
            scale, lo, hi = _quant_bounds(neg.reshape(-1, channels), pos.reshape(-1, channels), n_bits,
                                          space.symmetric)
            return ev(scale, lo, hi).reshape(shape)

        a = torch.full((channels,), 0.01 * big_r, dtype=torch.float64, device=device)
        b = torch.full((channels,), big_r, dtype=torch.float64, device=device)
        if not space.two_d:
            def sym_loss(r, ev=evaluator):
                neg = torch.zeros_like(r) if space.one_sided else -r
                return loss_of(neg, r, ev), None

            sym_scan = None if sub_evaluator is None else (lambda r: sym_loss(r, sub_evaluator))
            r, _, _ = _scan_golden(sym_loss, a, b, scan, iters, xatol, 0.99 * big_r, sym_scan)
            x_min = torch.zeros_like(r) if space.one_sided else -r
            return x_min.float(), r.float()

        # The inner search runs once per outer point: a 4x coarser scan keeps its cost down.
        inner_scan = 0 if scan == 0 else max(3, scan // 4)

        def range_loss(r, ev=evaluator, ev_scan=sub_evaluator):
            max_shift = 2.0 * r / levels * space.max_int_skew

            def shift_loss(s, e=ev):
                return loss_of(-r + s, r + s, e), None

            shift_scan = None if ev_scan is None else (lambda s: shift_loss(s, ev_scan))
            width = 4.0 * big_r / levels * space.max_int_skew
            s, fs, _ = _scan_golden(shift_loss, -max_shift, max_shift, inner_scan, iters, xatol, width, shift_scan)
            return fs, s

        range_scan = None if sub_evaluator is None else (lambda r: range_loss(r, sub_evaluator, None))
        r, _, s = _scan_golden(range_loss, a, b, scan, iters, xatol, 0.99 * big_r, range_scan)
        return (-r + s).float(), (r + s).float()
