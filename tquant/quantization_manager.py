"""The quantization manager: one quantizer, its range estimator and its state machine."""

from __future__ import annotations

import enum

import torch
from torch import nn

from . import kernels
from .config import QMethods, RangeEstimators
from .errors import QuantizerNotInitializedError
from .kernels import backend as _backend
from .kernels.fp8 import fp8_call, fp8_finalize_range, fp8_update_range
from .kernels.group_quant import group_call, group_update_range
from .kernels.group_reference import group_shape
from .kernels.quantizer_call import quantizer_call
from .range_estimators import SEARCH_ESTIMATORS, _all_reduce_range

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Qstates(enum.Enum):
    """Quantizer states (aihwkit's ``Qstates``)."""

    estimate_ranges = 0
    """Ranges are updated in train and eval mode."""
    fix_ranges = 1
    """Ranges are frozen."""
    learn_ranges = 2
    """``delta`` (and ``zero_float``) are trainable parameters."""
    estimate_ranges_train = 3
    """Ranges are updated on training forwards only (the default)."""


class QuantizationManager(nn.Module):
    """A quantizer plus the range estimation that drives it.

    ``QuantizationManager(qmethod=QMethods.symmetric_uniform, init=RangeEstimators.current_minmax,
    per_channel=False, axis=None, n_groups=None, x_min=None, x_max=None, qparams=None, init_params=None,
    *, n_channels=None)``: ``qparams`` are the quantizer's keyword arguments (``n_bits``...),
    ``init_params`` the estimator's. Given ``x_min``/``x_max`` the range is set and fixed.
    ``n_channels`` (tquant's addition; the layers pass their weight's output channels) fixes the
    shape of per-channel state from construction on, so ``torch.compile`` sees one graph.

    ``forward(x)`` returns ``x`` fake-quantized (same shape and dtype). The first call with a new
    (shape, strides, dtype, device) plans the call (backend, checks, launch plan: see
    :mod:`tquant.kernels.quantizer_call`); every call after that is one fused call: while
    estimating, the min/max estimators update the range and the parameters and fake-quantize in
    two passes over ``x`` (two launches on the GPU), with no host synchronisation; with fixed or
    learned ranges it is one pass. An eval forward (or ``fix_ranges``) of a quantizer that never
    saw a finite value (no batch, or only empty / all-NaN/inf ones) raises
    :class:`QuantizerNotInitializedError` naming ``layer_name``; the training forward never reads the
    device to know it (the range state stays NaN), the check does, once, at the change of state.
    """

    MAX_PLANS = 8
    """Input layouts whose plans a manager keeps (a model rarely feeds one quantizer more)."""

    def __init__(self, qmethod=QMethods.symmetric_uniform, init=RangeEstimators.current_minmax, per_channel=False,
                 axis=None, n_groups=None, x_min=None, x_max=None, qparams=None, init_params=None, *,
                 n_channels: int | None = None):
        super().__init__()
        self.state = Qstates.estimate_ranges_train
        self.qmethod = qmethod
        self.init = init
        self.per_channel = per_channel
        self.axis = axis
        self.n_groups = n_groups
        self.qparams = dict(qparams) if qparams else {}
        self.init_params = dict(init_params) if init_params else {}
        self.sync_ranges = False
        self.process_group = None
        self.quantizer = qmethod.cls(per_channel=per_channel, axis=axis, n_channels=n_channels, **self.qparams)
        q = self.quantizer
        groups = {} if q.group_len is None else {"group_len": q.group_len, "state_shape": q.state_shape}
        self.range_estimator = init.cls(
            per_channel=q.per_channel,
            quantizer=self.quantizer if init in SEARCH_ESTIMATORS else None,
            axis=axis,
            n_groups=n_groups,
            n_channels=n_channels,
            **groups,
            **self.init_params,
        )
        self._layer_name = ""
        self._calls: dict = {}
        if x_min is not None and x_max is not None:
            self.set_quant_range(x_min, x_max)
            self.state = Qstates.fix_ranges

    @property
    def layer_name(self) -> str:
        """The path of this quantizer in the model (set by :func:`tquant.convert_to_quantized`)."""
        return self._layer_name

    @layer_name.setter
    def layer_name(self, name: str) -> None:
        self._layer_name = name
        self.quantizer.layer_name = name

    @property
    def n_bits(self) -> int:
        return self.quantizer.n_bits

    @property
    def symmetric(self) -> bool:
        return self.quantizer.symmetric

    @property
    def is_initialized(self) -> bool:
        return self.quantizer.is_initialized

    # -- states ----------------------------------------------------------------------------
    def estimate_ranges(self) -> None:
        self.state = Qstates.estimate_ranges

    def fix_ranges(self) -> None:
        if not self.quantizer.is_initialized:
            raise QuantizerNotInitializedError(self.layer_name, "cannot fix the range of a quantizer that has none")
        self.state = Qstates.fix_ranges

    def learn_ranges(self) -> None:
        self.quantizer.make_range_trainable()
        self.state = Qstates.learn_ranges
        self._settle_initialized()

    def estimate_ranges_train(self) -> None:
        self.state = Qstates.estimate_ranges_train
        self._settle_initialized()

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self._settle_initialized()
        return self

    def _settle_initialized(self) -> None:
        """At a change to a state that quantizes with the range as it is (eval, learned ranges), read
        once whether training forwards set one: they never read the device, and traced code
        (``torch.compile``) can only check the host's answer."""
        self.quantizer.is_initialized  # noqa: B018 - reads the state and caches a True

    def is_learning(self) -> bool:
        return self.state == Qstates.learn_ranges

    def reset_ranges(self) -> None:
        self.range_estimator.reset()
        self.quantizer.reset()
        self.estimate_ranges_train()

    def _estimating(self) -> bool:
        return self.state == Qstates.estimate_ranges or (
            self.state == Qstates.estimate_ranges_train and self.training
        )

    # -- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{self.layer_name or 'QuantizationManager'}: cannot quantize a {x.dtype} tensor; "
                "expected float32, float16, bfloat16 or float64"
            )
        if self.quantizer.per_channel and x.dim() == 0:
            raise ValueError(f"{self.layer_name or 'QuantizationManager'}: per-channel quantization needs x.dim() >= 1")

    def _plan(self, x: torch.Tensor):
        """Checks and decisions that depend on ``x``'s layout, not its values: made once per layout."""
        self._check_input(x)
        q, est = self.quantizer, self.range_estimator
        if q.group_len is not None:
            got = group_shape(x, q.group_len)
            if (got[0], got[2]) != q.state_shape:
                raise ValueError(
                    f"{self.layer_name or 'QuantizationManager'}: group-wise quantizer of state {q.state_shape} "
                    f"(output channels, groups of {q.group_len}) got an input of shape {tuple(x.shape)}"
                )
        # the range's shape; a per-tensor quantizer's parameters are [1]
        shape = q.state_shape if q.group_len is not None else ((x.shape[0],) if q.per_channel else ())
        if q.per_channel and q.state_shape and tuple(shape) != q.state_shape:
            raise ValueError(
                f"{self.layer_name or 'QuantizationManager'}: per-channel quantizer of {q.state_shape[0]} channels "
                f"got an input with {shape[0]} along dim 0"
            )
        if q._delta.device != x.device and q.is_initialized:
            raise RuntimeError(
                f"{self.layer_name or 'QuantizationManager'}: the quantizer's state is on {q._delta.device} but "
                f"the input is on {x.device}; move the model with .to(device)"
            )
        q.ensure_state(shape or (1,), x.device)
        est.ensure_range_buffers(shape, x.device)
        state = ((q._parameters, "_delta"), (q._buffers if q.symmetric else q._parameters, "_zero_float"),
                 (q._buffers, "_signed"), (est._buffers, "current_xmin"), (est._buffers, "current_xmax"),
                 (est._buffers, "_workspace"), (est._buffers, "_arrivals"))
        try:
            if q.group_len is not None:
                call = group_call(x, q.n_bits, q.symmetric, q.group_len, est.fused_code, est.momentum, state)
            elif q.fmt != "int":
                call = fp8_call(x, q.fmt, q.kernel_axis, est.fused_code, est.momentum, state)
            else:
                call = quantizer_call(x, q.n_bits, q.symmetric, q.kernel_axis, est.fused_code, est.momentum, state)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise type(exc)(f"{self.layer_name or 'QuantizationManager'}: {exc}") from exc
        if len(self._calls) >= self.MAX_PLANS:
            self._calls.clear()
        self._calls[(x.shape, x.stride(), x.dtype, x.device, _backend._backend)] = call
        return call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        call = self._calls.get((x.shape, x.stride(), x.dtype, x.device, _backend._backend)) or self._plan(x)
        state = self.state
        if state is Qstates.estimate_ranges or (state is Qstates.estimate_ranges_train and self.training):
            if call.fused and not self.sync_ranges:
                # A zero-size batch (a shape fact) updates nothing; no value is read here either: a
                # quantizer that saw no finite value keeps its NaN range, i.e. stays uninitialised.
                return call.train(x) if x.numel() else call.fixed(x)
            if x.numel():
                self._estimate(x)
        else:
            q = self._modules["quantizer"]
            if not q._initialized and not q.is_initialized:
                raise QuantizerNotInitializedError(self.layer_name)
        return call.fixed(x)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What ``torch.compile`` / ``torch.export`` trace: the registered ``tquant`` ops."""
        self._check_input(x)
        q = self.quantizer
        if self._estimating():
            est = self.range_estimator
            if est.fused_code is None or self.sync_ranges:
                self._estimate(x)
            elif q.group_len is not None:
                group_update_range(x.detach(), est.current_xmin, est.current_xmax, q._delta, q._zero_float, q._signed,
                                   q.n_bits, q.symmetric, q.group_len, est.fused_code, est.momentum, False,
                                   workspace=est._workspace)
            elif q.fmt != "int":
                fp8_update_range(x.detach(), est.current_xmin, est.current_xmax, q._delta, q.fmt, q.kernel_axis,
                                 est.fused_code, est.momentum, False,
                                 state=(q._zero_float, q._signed, est._workspace, est._arrivals))
            else:
                kernels.update_range(x.detach(), est.current_xmin, est.current_xmax, q._delta, q._zero_float,
                                     q._signed, q.n_bits, q.symmetric, q.kernel_axis, est.fused_code, est.momentum,
                                     False, workspace=(est._workspace, est._arrivals))
        elif not q._initialized:  # the host's answer, settled at the change to eval / fixed / learned ranges
            raise QuantizerNotInitializedError(self.layer_name)
        return q.fake_quant(x)

    def _estimate(self, x: torch.Tensor) -> None:
        """Range estimation off the fused path: search estimators, percentiles, synchronised ranges."""
        q, est = self.quantizer, self.range_estimator
        if est.fused_code is not None:  # sync_ranges: the batch range is all-reduced before the update
            bmin, bmax = est.batch_range(x)
            _all_reduce_range(bmin, bmax, self.process_group)
            with torch.no_grad():
                if q.fmt != "int":
                    fp8_finalize_range(bmin, bmax, est.current_xmin, est.current_xmax, q._delta, q.fmt,
                                       est.fused_code, est.momentum, False)
                else:
                    kernels.finalize_range(bmin, bmax, est.current_xmin, est.current_xmax, q._delta, q._zero_float,
                                           q._signed, q.n_bits, q.symmetric, est.fused_code, est.momentum, False)
            return
        x_min, x_max = est(x)
        if self.sync_ranges:
            x_min, x_max = x_min.clone(), x_max.clone()
            _all_reduce_range(x_min, x_max, self.process_group)
        q.set_quant_range(x_min, x_max)

    def set_quant_range(self, x_min, x_max) -> None:
        self.quantizer.set_quant_range(x_min, x_max)

    def _apply(self, fn, recurse=True):
        self._calls.clear()
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        if name in ("quantizer", "range_estimator") and "_calls" in self.__dict__:
            self._calls.clear()  # the plans look up this quantizer's and estimator's tensors
        super().__setattr__(name, value)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_calls"] = {}  # plans hold device workspaces: rebuilt on first use
        return state

    def export_qparams(self) -> dict:
        """The quantizer's constants for deployment (reads the device: not for the hot path).

        Returns ``{"scale": fp32 0-dim or [C], "zero_point": int64 like scale, "qmin": int,
        "qmax": int, "axis": None or 0, "n_bits": int, "symmetric": bool, "signed": bool, "fmt": str,
        "group_len": int or None}``; group-wise scale and zero point are ``[C, n_groups]``
        (``group_len`` elements of the weight's ``[C, K]`` view each); FP8 has zero point 0 and
        ``qmin``/``qmax`` the format's ``-max``/``max`` (floats).
        """
        q = self.quantizer
        if not q.is_initialized:
            raise QuantizerNotInitializedError(self.layer_name, "calibrate or train the model before exporting it")
        with torch.no_grad():
            scale = q.scale.detach().float().clone()
            zero_point = q.zero_point.detach().round().to(torch.int64)
        return {
            "scale": scale,
            "zero_point": zero_point,
            "qmin": int(q.int_min) if q.fmt == "int" else q.int_min,
            "qmax": int(q.int_max) if q.fmt == "int" else q.int_max,
            "axis": 0 if q.per_channel else None,
            "n_bits": q.n_bits,
            "symmetric": q.symmetric,
            "signed": bool(q._signed) if q.symmetric else False,
            "fmt": q.fmt,
            "group_len": q.group_len,
        }

    def extra_repr(self) -> str:
        return f"state={self.state.name}"
