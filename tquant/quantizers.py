"""Uniform quantizers: the parameters of one quantizer and its fake-quantization forward.

State (aihwkit-compatible names, so checkpoints keep their keys):

- ``_delta`` (``nn.Parameter``, fp32, ``requires_grad=False`` until ``learn_ranges``): ``[1]`` per
  tensor (FSDP2 shards parameters along dim 0 and takes none that is 0-dim; checkpoints with
  aihwkit's 0-dim ``_delta`` load as they are), ``[C]`` per channel (dim 0); NaN while
  uninitialised. ``scale = max(delta, eps)``.
  The shapes are fixed from construction when the channel count is known (``n_channels``: the
  layers pass their weight's output channels), so the first, initialising step and every later
  one trace to the same graph under ``torch.compile``; a per-channel quantizer built without
  ``n_channels`` takes its channel count from the first batch.
- asymmetric: ``_zero_float`` (``nn.Parameter``), ``zp = clamp(round(zero_float), 0, 2^b - 1)``.
- symmetric: ``_signed`` (bool buffer, one flag per quantizer): grid ``[-2^(b-1), 2^(b-1) - 1]``
  when the range reaches below zero, else ``[0, 2^b - 1]``.
- group-wise (``group_size``, tquant's addition): ``_delta`` / ``_zero_float`` are ``[C, n_groups]`` from
  construction (the weight's shape is given), one per output channel and group of input features
  (:mod:`tquant.kernels.group_reference`); ``_signed`` is still one flag.
- FP8 (``fmt="fp8_e4m3"`` / ``"fp8_e5m2"``, symmetric, 8 bits): ``scale = max(delta, eps)`` maps the
  range onto the format's largest value (:mod:`tquant.kernels.fp8_reference`); no zero point.

Whether the quantizer has a range is its tensor state: a NaN ``_delta`` means "no range yet", and
a quantizer whose estimator has only seen empty or all-NaN/inf batches keeps it. The training hot
path never reads tensor values (no host synchronisation on the GPU); ``is_initialized`` reads
``_delta`` when asked and caches a True on the host (``_initialized``), so the checks of eval,
``fix_ranges`` and export read the device at most once. The math lives in :mod:`tquant.kernels`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels, sharded_state
from .config import FORMATS, QMethods
from .errors import QuantizerNotInitializedError
from .kernels.fp8 import fp8_fake_quant
from .kernels.fp8_reference import fp8_max, fp8_qparams_from_range
from .kernels.group_quant import group_fake_quant
from .kernels.group_reference import group_layout
from .kernels.reference import EPS, grid_bounds, scale_and_zero_point
from .registry import register_quantizer


class Fp32StateMixin:
    """Keep a module's floating-point state in fp32 through ``model.half()`` / ``.to(dtype)``:
    quantizer math is fp32 whatever the data's dtype (DESIGN §3), so ranges and scales are too."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for tensor in [*self._parameters.values(), *self._buffers.values()]:
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self


class QuantizerBase(Fp32StateMixin, nn.Module):
    """Common state and behaviour of the symmetric and asymmetric uniform quantizers."""

    symmetric: bool = True

    def __init__(self, n_bits: int, scale_domain: str = "linear", per_channel: bool = False, axis=None,
                 eps: float = EPS, n_channels: int | None = None, *, fmt: str = "int", group_size: int | None = None,
                 weight_shape: tuple | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"{type(self).__name__}.fmt: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt != "int" and (n_bits != 8 or not self.symmetric or group_size is not None):
            raise ValueError(
                f"{type(self).__name__}.fmt={fmt!r}: FP8 quantizers are symmetric, 8-bit and per tensor or per channel"
            )
        if scale_domain != "linear":
            raise ValueError(f"{type(self).__name__}.scale_domain: only 'linear' is supported, got {scale_domain!r}")
        if axis not in (None, 0):
            raise ValueError(f"{type(self).__name__}.axis: only per-channel along dim 0 is supported, got {axis!r}")
        if eps != EPS:
            raise ValueError(f"{type(self).__name__}.eps: tquant's kernels use eps={EPS}, got {eps!r}")
        self.n_bits = n_bits
        self.scale_domain = scale_domain
        self.per_channel = per_channel or axis == 0
        self.axis = axis
        self.eps = eps
        if n_channels is not None and (not isinstance(n_channels, int) or n_channels < 0):
            raise ValueError(f"{type(self).__name__}.n_channels must be a non-negative int, got {n_channels!r}")
        self.layer_name = ""
        self._initialized = False
        self.fmt = fmt
        self.group_size = group_size
        self.group_len: int | None = None
        """Elements of a ``[C, K]`` row per group (``group_size`` times the kernel's size), or None."""
        self.state_shape: tuple = (n_channels,) if self.per_channel and n_channels is not None else ()
        if not self.per_channel:
            self.state_shape = (1,)
        if group_size is not None:
            if weight_shape is None:
                raise ValueError(f"{type(self).__name__}.group_size needs the weight's shape (weight_shape=...)")
            self.group_len, n_groups = group_layout(weight_shape, group_size)
            self.per_channel = True
            self.state_shape = (int(weight_shape[0]), n_groups)
        self._delta = nn.Parameter(torch.full(self.state_shape, math.nan), requires_grad=False)

    # -- state -----------------------------------------------------------------------------
    @property
    def kernel_axis(self) -> int:
        """``0`` for per-channel parameters, ``-1`` per tensor (the ops' ``axis`` argument)."""
        return 0 if self.per_channel else -1

    @property
    def is_initialized(self) -> bool:
        """Whether a range is set (a ``_delta`` that is not all NaN; a zero-channel state counts as set).

        Reads the device until the answer is True, then answers from the host: not for the hot path.
        """
        if self._initialized:
            return True
        d = self._delta
        if sharded_state.is_dtensor(d):  # FSDP2: judge the whole range (a collective: every rank asks, all agree)
            d = d.full_tensor()
        ok = d.numel() == 0 or not bool(torch.isnan(d).all())
        if ok:
            self._initialized = True
        return ok

    def _require_initialized(self) -> None:
        if not self.is_initialized:
            raise QuantizerNotInitializedError(self.layer_name)

    def ensure_state(self, shape: tuple, device: torch.device) -> None:
        """Give the parameters ``shape`` on ``device`` (fresh values) when they differ (no sync)."""
        if tuple(self._delta.shape) == tuple(shape) and self._delta.device == device:
            return
        with torch.no_grad():
            self._delta.data = torch.full(shape, math.nan, device=device)
            self._zero_float.data = torch.zeros(shape, device=device)
            self._signed = torch.zeros((), dtype=torch.bool, device=device)
        self._initialized = False

    def _user_view(self, state: torch.Tensor) -> torch.Tensor:
        """``state`` as aihwkit shapes it: 0-dim per tensor (a view of the ``[1]`` parameter), ``[C]`` per channel."""
        return state if self.per_channel else state.view(())

    @property
    def delta(self) -> torch.Tensor:
        self._require_initialized()
        return self._user_view(self._delta)

    @property
    def zero_float(self) -> torch.Tensor:
        self._require_initialized()
        return self._user_view(self._zero_float)

    @property
    def signed(self) -> bool:
        self._require_initialized()
        return bool(self._signed)

    @property
    def scale(self) -> torch.Tensor:
        return torch.clamp(self.delta, min=self.eps)

    @property
    def zero_point(self) -> torch.Tensor:
        self._require_initialized()
        return self._user_view(scale_and_zero_point(self._delta, self._zero_float, self.n_bits, self.symmetric)[1])

    @property
    def int_min(self) -> float:
        """The lowest grid value (FP8: ``-max`` of the format)."""
        self._require_initialized()
        if self.fmt != "int":
            return -fp8_max(self.fmt)
        return float(grid_bounds(self.n_bits, self.symmetric, self._signed)[0])

    @property
    def int_max(self) -> float:
        self._require_initialized()
        if self.fmt != "int":
            return fp8_max(self.fmt)
        return float(grid_bounds(self.n_bits, self.symmetric, self._signed)[1])

    @property
    def x_min(self) -> torch.Tensor:
        return self.scale * (self.int_min - self.zero_point)

    @property
    def x_max(self) -> torch.Tensor:
        return self.scale * (self.int_max - self.zero_point)

    def set_quant_range(self, x_min, x_max) -> None:
        """Set the range (floats or fp32 tensors, 0-dim or ``[C]`` per channel); see DESIGN §3."""
        device = self._delta.device
        x_min = torch.as_tensor(x_min, dtype=torch.float32, device=device if not torch.is_tensor(x_min) else None)
        x_max = torch.as_tensor(x_max, dtype=torch.float32, device=x_min.device)
        if x_min.dim() > 0 and x_min.numel() > 1 and not self.per_channel:
            raise ValueError(
                f"{self.layer_name or type(self).__name__}: x_min and x_max must be a float or a 1-element "
                "tensor for per-tensor quantization (per_channel=False)"
            )
        if not self.per_channel:
            x_min, x_max = x_min.reshape(1), x_max.reshape(1)
        if self.group_len is not None and tuple(x_min.shape) != self.state_shape:
            raise ValueError(
                f"{self.layer_name or type(self).__name__}: a group-wise range has shape {self.state_shape} "
                f"(output channels, groups), got {tuple(x_min.shape)}"
            )
        if self.fmt != "int":
            delta = fp8_qparams_from_range(x_min, x_max, self.fmt)
            zero_float, signed = torch.zeros_like(delta), torch.zeros((), dtype=torch.bool, device=delta.device)
        else:
            delta, zero_float, signed = kernels.qparams_from_range(x_min, x_max, self.n_bits, self.symmetric)
        self.ensure_state(tuple(delta.shape), delta.device)
        with torch.no_grad():
            self._delta.copy_(delta)
            self._zero_float.copy_(zero_float)
            self._signed.copy_(signed)
        self._initialized = False  # is_initialized reads the new state when asked (a NaN range is none)

    def make_range_trainable(self) -> None:
        self._delta.requires_grad_(True)

    def reset(self) -> None:
        """Back to uninitialised, in place (same tensors and shapes)."""
        with torch.no_grad():
            self._delta.fill_(math.nan)
            self._zero_float.fill_(0.0)
            self._signed.fill_(False)
        self._initialized = False

    def __setattr__(self, name, value):
        if name in ("_delta", "_zero_float") and sharded_state.is_dtensor(value):
            sharded_state.keep_forward_writes(self._parameters.get(name), value)  # FSDP2 resharding
        super().__setattr__(name, value)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x_float: torch.Tensor) -> torch.Tensor:
        """Fake-quantize with the current range (``x``'s shape and dtype)."""
        self._require_initialized()
        return self.fake_quant(x_float)

    def fake_quant(self, x_float: torch.Tensor) -> torch.Tensor:
        """``forward`` without the initialisation check (which reads the device): for traced graphs."""
        if self.group_len is not None:
            return group_fake_quant(x_float, self._delta, self._zero_float, self._signed, self.n_bits, self.symmetric,
                                    self.group_len)
        if self.fmt != "int":
            return fp8_fake_quant(x_float, self._delta, self.fmt, self.kernel_axis)
        return kernels.fake_quant(
            x_float, self._delta, self._zero_float, self._signed, self.n_bits, self.symmetric, self.kernel_axis
        )

    # -- checkpoints -----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        delta = state_dict.get(prefix + "_delta")
        if delta is not None and not self.per_channel and delta.dim() == 0:  # aihwkit's (and older) 0-dim state
            for key in (prefix + "_delta", prefix + "_zero_float"):
                if key in state_dict:
                    state_dict[key] = state_dict[key].reshape(1)
            delta = state_dict[prefix + "_delta"]
        if delta is not None:
            values = delta.full_tensor() if sharded_state.is_dtensor(delta) else delta  # FSDP2: a shard may be empty
            initialized = bool(not torch.isnan(values).all()) if values.numel() else True
            if self.state_shape and tuple(delta.shape) != self.state_shape:
                if initialized:
                    what = f"{self.state_shape[0]} channels" if len(self.state_shape) == 1 else (
                        f"shape {self.state_shape} (output channels, groups)")
                    error_msgs.append(
                        f"{self.layer_name or prefix.rstrip('.')}: the checkpoint's per-channel range has shape "
                        f"{tuple(delta.shape)}, this quantizer has {what}"
                    )
                else:  # an uninitialised quantizer saved before shapes were fixed (0-dim NaN)
                    state_dict[prefix + "_delta"] = torch.full(self.state_shape, math.nan)
                    if prefix + "_zero_float" in state_dict:
                        state_dict[prefix + "_zero_float"] = torch.full(self.state_shape, math.nan)
            elif self.per_channel and not self.state_shape:  # channel count not fixed: take the checkpoint's
                with torch.no_grad():
                    self._delta.data = torch.empty(delta.shape, device=self._delta.device)
                    self._zero_float.data = torch.zeros(delta.shape, device=self._delta.device)
            self._initialized = initialized
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = [prefix + "_signed"] if not self.symmetric else []
        if prefix + "_signed" not in state_dict and delta is not None and not self._initialized:
            optional.append(prefix + "_signed")  # aihwkit omits it for uninitialised quantizers
        for key in optional:
            if key in missing_keys:
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        extra = (f", fmt={self.fmt!r}" if self.fmt != "int" else "") + (
            f", group_size={self.group_size}" if self.group_size is not None else "")
        return (
            f"n_bits={self.n_bits}, per_channel={self.per_channel}, symmetric={self.symmetric}{extra}, "
            f"is_initialized={self.is_initialized}"
        )


@register_quantizer(QMethods.symmetric_uniform)
class SymmetricUniformQuantizer(QuantizerBase):
    """Symmetric quantizer: ``zp = 0``; signed or unsigned grid chosen by the data's sign."""

    symmetric = True

    def __init__(self, n_bits: int, scale_domain: str = "linear", per_channel: bool = False, axis=None,
                 eps: float = EPS, n_channels: int | None = None, **kwargs):
        super().__init__(n_bits, scale_domain, per_channel, axis, eps, n_channels, **kwargs)
        self.register_buffer("_signed", torch.zeros((), dtype=torch.bool), persistent=True)
        self.register_buffer("_zero_float", torch.zeros(self.state_shape), persistent=False)


@register_quantizer(QMethods.asymmetric_uniform)
class AsymmetricUniformQuantizer(QuantizerBase):
    """Asymmetric quantizer: grid ``[0, 2^b - 1]`` with a learned-or-estimated zero point."""

    symmetric = False

    def __init__(self, n_bits: int, scale_domain: str = "linear", per_channel: bool = False, axis=None,
                 eps: float = EPS, n_channels: int | None = None, **kwargs):
        super().__init__(n_bits, scale_domain, per_channel, axis, eps, n_channels, **kwargs)
        self._zero_float = nn.Parameter(torch.full(self.state_shape, math.nan), requires_grad=False)
        self.register_buffer("_signed", torch.zeros((), dtype=torch.bool), persistent=False)

    def make_range_trainable(self) -> None:
        self._delta.requires_grad_(True)
        self._zero_float.requires_grad_(True)

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            self._zero_float.fill_(math.nan)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        zf = state_dict.get(prefix + "_zero_float")  # as the base class left it (aihwkit's 0-dim made [1])
        if zf is not None and zf.shape != self._zero_float.shape:
            error_msgs.append(f"{prefix}_zero_float: shape {tuple(zf.shape)} does not match _delta")
