"""The quantization manager: one quantizer, its range estimator and its state machine."""

from __future__ import annotations

import enum

import torch
from torch import nn

from .config import QMethods, RangeEstimators
from .errors import QuantizerNotInitializedError
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
    per_channel=False, axis=None, n_groups=None, x_min=None, x_max=None, qparams=None, init_params=None)``:
    ``qparams`` are the quantizer's keyword arguments (``n_bits``...), ``init_params`` the
    estimator's. Given ``x_min``/``x_max`` the range is set and fixed.

    ``forward(x)`` returns ``x`` fake-quantized (same shape and dtype). While estimating, the
    min/max estimators run as one fused op (range + parameters) followed by the fake quant:
    two passes over ``x``, no host synchronisation. An eval forward (or ``fix_ranges``) of a
    quantizer that never saw data raises :class:`QuantizerNotInitializedError` naming ``layer_name``.
    """

    def __init__(self, qmethod=QMethods.symmetric_uniform, init=RangeEstimators.current_minmax, per_channel=False,
                 axis=None, n_groups=None, x_min=None, x_max=None, qparams=None, init_params=None):
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
        self.quantizer = qmethod.cls(per_channel=per_channel, axis=axis, **self.qparams)
        self.range_estimator = init.cls(
            per_channel=per_channel,
            quantizer=self.quantizer if init in SEARCH_ESTIMATORS else None,
            axis=axis,
            n_groups=n_groups,
            **self.init_params,
        )
        self._layer_name = ""
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

    def estimate_ranges_train(self) -> None:
        self.state = Qstates.estimate_ranges_train

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self._estimating():
            estimator = self.range_estimator
            if estimator.fused_code is not None:
                estimator.fused_update(x, self.quantizer, self.process_group, self.sync_ranges)
            else:
                x_min, x_max = estimator(x)
                if self.sync_ranges:
                    x_min, x_max = x_min.clone(), x_max.clone()
                    _all_reduce_range(x_min, x_max, self.process_group)
                self.quantizer.set_quant_range(x_min, x_max)
        return self.quantizer.forward(x)  # the manager is the hookable module; skip a second __call__

    def set_quant_range(self, x_min, x_max) -> None:
        self.quantizer.set_quant_range(x_min, x_max)

    def export_qparams(self) -> dict:
        """The quantizer's constants for deployment (reads the device: not for the hot path).

        Returns ``{"scale": fp32 0-dim or [C], "zero_point": int64 like scale, "qmin": int,
        "qmax": int, "axis": None or 0, "n_bits": int, "symmetric": bool, "signed": bool}``.
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
            "qmin": int(q.int_min),
            "qmax": int(q.int_max),
            "axis": 0 if q.per_channel else None,
            "n_bits": q.n_bits,
            "symmetric": q.symmetric,
            "signed": bool(q._signed) if q.symmetric else False,
        }

    def extra_repr(self) -> str:
        return f"state={self.state.name}"
