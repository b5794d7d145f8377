"""Range estimators: how a quantizer's ``[x_min, x_max]`` follows the data.

Each estimator is an ``nn.Module`` with aihwkit's interface: ``forward(x) -> (x_min, x_max)``
updates and returns ``current_xmin`` / ``current_xmax`` (buffers, NaN until the first batch,
saved in ``state_dict``), ``reset()`` forgets them.

The min/max family (``current_minmax`` without percentile, ``allminmax``, ``running_minmax``)
has a ``fused_code``: the quantization manager then estimates the range and writes the
quantizer's parameters in one fused call (``tquant.kernels.quantizer_call``), with no host
synchronisation (two passes in total with the fake quant); ``forward`` is aihwkit's API.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import kernels
from .config import OptMethod, RangeEstimators
from .kernels.group_quant import group_minmax, group_rows
from .kernels.reference import update_range_reference
from .quantizers import Fp32StateMixin
from .registry import register_range_estimator


class RangeEstimatorBase(Fp32StateMixin, nn.Module):
    """Base class. ``per_channel`` ranges are along dim 0; ``quantizer`` gives the search
    estimators the bits and symmetry (it is not registered as a submodule).

    ``current_xmin`` / ``current_xmax`` are fp32 buffers that exist from construction: 0-dim per
    tensor, ``[n_channels]`` per channel when the channel count is given (else sized by the first
    batch), NaN while there is no range yet (aihwkit keeps ``None`` there; a fixed shape lets the
    first, initialising step trace to the same graph as every later one). A group-wise estimator
    (``group_len``, ``state_shape`` ``[C, n_groups]``: tquant's addition) keeps one range per output channel
    and group (:mod:`tquant.kernels.group_reference`).
    """

    fused_code: int | None = None
    """The ``tquant::update_range`` estimator code, or None when this estimator is not fusable."""

    def __init__(self, per_channel: bool = False, quantizer=None, axis=None, n_groups=None,
                 n_channels: int | None = None, *, group_len: int | None = None, state_shape: tuple | None = None):
        super().__init__()
        if axis not in (None, 0):
            raise ValueError(f"{type(self).__name__}.axis: only dim 0 is supported, got {axis!r}")
        if n_groups is not None:
            raise ValueError(f"{type(self).__name__}.n_groups: grouped ranges are not supported")
        if (group_len is None) != (state_shape is None):
            raise ValueError(f"{type(self).__name__}: group_len and state_shape go together")
        self.group_len = group_len
        self.per_channel = per_channel or axis == 0 or group_len is not None
        shape = (n_channels,) if self.per_channel and n_channels is not None else ()
        if state_shape is not None:
            shape = tuple(state_shape)
        self.register_buffer("current_xmin", torch.full(shape, math.nan))
        self.register_buffer("current_xmax", torch.full(shape, math.nan))
        self._register_workspace(shape, None)
        self.axis = axis
        self.n_groups = n_groups
        self.per_group_range_estimation = False
        self._quantizer = (quantizer,)  # a tuple keeps it out of the module tree and the state_dict

    @property
    def quantizer(self):
        return self._quantizer[0]

    @property
    def kernel_axis(self) -> int:
        return 0 if self.per_channel else -1

    @property
    def momentum(self) -> float:
        return 0.0

    @property
    def has_range(self) -> bool:
        """Whether a range was estimated (reads the device)."""
        cur = self.current_xmin
        return cur is not None and cur.numel() > 0 and not bool(torch.isnan(cur).all())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the range, in place (the buffers keep their shape)."""
        for name in ("current_xmin", "current_xmax"):
            cur = getattr(self, name)
            if cur is None:
                setattr(self, name, torch.full((), math.nan))
            else:
                cur.fill_(math.nan)

    def ensure_range_buffers(self, shape: tuple, device: torch.device) -> None:
        """Give the range buffers ``shape`` (NaN: no range yet) if they have another one.

        Only a per-channel estimator built without its channel count changes shape, on its first
        batch; a later change of the channel count is an error for the estimators that keep a range.
        """
        cur = self.current_xmin
        if cur is not None and tuple(cur.shape) == tuple(shape) and cur.device == device:
            return
        if cur is not None and cur.numel() and self.fused_code != kernels.ESTIMATOR_CURRENT and self.has_range:
            raise ValueError(
                f"{type(self).__name__}: the range shape changed from {tuple(cur.shape)} to {tuple(shape)} "
                "(per-channel ranges need the same number of channels in every batch)"
            )
        self.current_xmin = torch.full(shape, math.nan, device=device)
        self.current_xmax = torch.full(shape, math.nan, device=device)
        self._register_workspace(shape, device)

    def _register_workspace(self, shape: tuple, device) -> None:
        """The scratch buffers of the one-launch Triton range update (``kernels.range_workspace``), made
        with the range buffers so they exist before any CUDA-graph capture; not saved in ``state_dict``."""
        if self.group_len is not None:  # the group-wise symmetric range kernel's [sign flag, arrivals] (int32)
            workspace, arrivals = torch.zeros(2, dtype=torch.int32, device=device), None
        else:
            workspace, arrivals = kernels.range_workspace(shape[0] if shape else 1, device)
        self.register_buffer("_workspace", workspace, persistent=False)
        self.register_buffer("_arrivals", arrivals, persistent=False)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of the finite values of ``x``: per tensor, channel or group (no update)."""
        if self.group_len is not None:
            return group_minmax(x.detach(), self.group_len)
        return kernels.batch_minmax(x.detach(), self.kernel_axis)

    def _minmax_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bmin, bmax = self.batch_range(x)
        self.ensure_range_buffers(tuple(bmin.shape), bmin.device)
        new_min, new_max = update_range_reference(
            bmin, bmax, self.current_xmin, self.current_xmax, self.fused_code, self.momentum
        )
        self.current_xmin, self.current_xmax = new_min, new_max
        return new_min, new_max

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("current_xmin", "current_xmax"):
            value, cur = state_dict.get(prefix + name), getattr(self, name)
            if value is None or (cur is not None and tuple(value.shape) == tuple(cur.shape)):
                continue
            if cur is not None and cur.dim() and value.dim() == 0 and torch.isnan(value):
                state_dict[prefix + name] = torch.full(cur.shape, math.nan)  # saved before shapes were fixed
            else:
                setattr(self, name, torch.empty_like(value, device=self._buffer_device(value)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in ("current_xmin", "current_xmax"):  # aihwkit saves none before the first batch
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
                getattr(self, name).fill_(math.nan)

    def _buffer_device(self, fallback: torch.Tensor) -> torch.device:
        q = self.quantizer
        return q._delta.device if q is not None else fallback.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}"


def _all_reduce_range(bmin: torch.Tensor, bmax: torch.Tensor, process_group) -> None:
    """``bmin``/``bmax`` become the minimum / maximum over the process group, in place: one collective
    (a MIN over ``[bmin, -bmax]``; a zero maximum is +0.0, so its negation round-trips)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        packed = torch.cat([bmin.reshape(-1), bmax.reshape(-1).neg()])
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=process_group)
        n = bmin.numel()
        bmin.copy_(packed[:n].view_as(bmin))
        torch.neg(packed[n:], out=packed[n:])
        bmax.copy_(packed[n:].view_as(bmax))


@register_range_estimator(RangeEstimators.current_minmax)
class CurrentMinMaxEstimator(RangeEstimatorBase):
    """The range of the current batch; ``percentile`` p clips the lower and upper p% tails.

    Unlike aihwkit (whose per-tensor percentile ignores the upper tail and runs in numpy on
    the host), both tails are clipped, with exact percentiles computed on the device.
    """

    def __init__(self, percentile: float | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if percentile is not None and not 0 <= percentile < 50:
            raise ValueError(f"CurrentMinMaxEstimator.percentile must be in [0, 50), got {percentile!r}")
        if percentile and self.group_len is not None:
            raise ValueError("CurrentMinMaxEstimator.percentile: group-wise ranges take the plain min/max")
        self.percentile = percentile
        self.fused_code = kernels.ESTIMATOR_CURRENT if not percentile else None

    def forward(self, x):
        if self.percentile:
            from .kernels.range_search import percentile_range

            self.current_xmin, self.current_xmax = percentile_range(x.detach(), self.percentile, self.kernel_axis)
            return self.current_xmin, self.current_xmax
        return self._minmax_forward(x)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, percentile={self.percentile}"


@register_range_estimator(RangeEstimators.allminmax)
class AllMinMaxEstimator(RangeEstimatorBase):
    """The min of the minima and the max of the maxima over every batch seen."""

    fused_code = kernels.ESTIMATOR_ALL

    def forward(self, x):
        return self._minmax_forward(x)


@register_range_estimator(RangeEstimators.running_minmax)
class RunningMinMaxEstimator(RangeEstimatorBase):
    """Exponential moving average of the batch ranges: ``new = (1 - m) * batch + m * old``."""

    fused_code = kernels.ESTIMATOR_RUNNING

    def __init__(self, momentum: float = 0.9, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(f"RunningMinMaxEstimator.momentum must be in [0, 1), got {momentum!r}")
        self._momentum = float(momentum)

    @property
    def momentum(self) -> float:
        return self._momentum

    def forward(self, x):
        return self._minmax_forward(x)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, momentum={self.momentum}"


@register_range_estimator(RangeEstimators.MSE)
class MSE_Estimator(RangeEstimatorBase):  # noqa: N801 - aihwkit's name
    """Search the clipping range that minimises the quantization MSE.

    ``OptMethod.grid``: ``num_candidates`` symmetric thresholds (plus integer skews for an
    asymmetric quantizer of two-sided data), losses accumulated over every batch seen;
    ``OptMethod.golden_section``: a golden-section search on the current batch. The search
    space is fixed by the first batch (``range_margin`` beyond its largest magnitude).
    """

    loss_name = "mse"

    def __init__(self, num_candidates: int = 100, opt_method: OptMethod = OptMethod.grid, range_margin: float = 0.5,
                 *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.quantizer is None:
            raise ValueError(f"{type(self).__name__} needs the quantizer it estimates for (quantizer=...)")
        if self.group_len is not None and self.loss_name != "mse":
            raise ValueError(f"{type(self).__name__}: group-wise ranges take the MSE search, not {self.loss_name}")
        if not isinstance(opt_method, OptMethod):
            raise ValueError(f"{type(self).__name__}.opt_method must be an OptMethod, got {opt_method!r}")
        import math

        from .errors import QuantizationConfigError

        name = type(self).__name__
        n = num_candidates
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise QuantizationConfigError(f"{name}.num_candidates must be an int >= 2, got {n!r}")
        m = range_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
            # The margin is the search bound of all-zero data: it must be positive.
            raise QuantizationConfigError(f"{name}.range_margin must be a finite number > 0, got {m!r}")
        self.opt_method = opt_method
        self.num_candidates = num_candidates
        self.range_margin = float(range_margin)
        self.space = None
        self.loss_array = None

    def forward(self, x):
        """Search the range on ``x`` (grid: add this batch's losses first); returns ``(x_min, x_max)``.

        No host synchronisation after the first batch on the grid path (the first batch reads
        the data's min and max once to fix the search space). Non-finite values of ``x`` are
        ignored; a batch with no finite value (empty, all NaN/inf) raises ``ValueError`` naming
        the layer when it is the first one or the search is golden section (which reads one flag
        back per batch to check); a later grid batch without finite values adds nothing.
        """
        from .kernels import range_search as rs

        q = self.quantizer
        data = x.detach()
        try:
            if self.group_len is not None:  # each group a row: its search is the per-channel search
                data = group_rows(data, self.group_len)
            if self.space is None:
                self.space = rs.define_search_space(x.detach().reshape(x.shape[0], -1) if self.group_len else data,
                                                    q.n_bits, q.symmetric, self.per_channel, self.num_candidates,
                                                    self.range_margin)
                if self.group_len is not None:
                    self.space = dataclasses.replace(self.space, channels=data.shape[0])
            if self.opt_method == OptMethod.grid:
                losses = rs.grid_losses(data, self.space, q.n_bits, q.symmetric, loss=self.loss_name)
                self.loss_array = losses if self.loss_array is None else self.loss_array.add_(losses)
                x_min, x_max = rs.best_range(self.loss_array, self.space, q.n_bits)
            else:
                x_min, x_max = rs.golden_section_range(data, self.space, q.n_bits, q.symmetric,
                                                       loss=self.loss_name)
        except ValueError as err:
            layer = getattr(q, "layer_name", "") or "<unnamed layer>"
            raise ValueError(f"{layer}: {type(self).__name__}: {err}") from err
        if not self.per_channel:
            x_min, x_max = x_min.reshape(()), x_max.reshape(())
        elif self.group_len is not None:
            x_min, x_max = x_min.reshape(self.current_xmin.shape), x_max.reshape(self.current_xmin.shape)
        self.current_xmin, self.current_xmax = x_min, x_max
        return x_min, x_max

    def reset(self) -> None:
        super().reset()
        self.space = None
        self.loss_array = None

    def extra_repr(self) -> str:
        return (
            f"per_channel={self.per_channel}, opt_method={self.opt_method.name}, "
            f"num_candidates={self.num_candidates}, range_margin={self.range_margin}"
        )


@register_range_estimator(RangeEstimators.cross_entropy)
class CrossEntropyEstimator(MSE_Estimator):
    """Like :class:`MSE_Estimator`, minimising ``sum(-softmax(x) * log_softmax(q(x)))`` over dim 1."""

    loss_name = "cross_entropy"


SEARCH_ESTIMATORS = (RangeEstimators.MSE, RangeEstimators.cross_entropy)
