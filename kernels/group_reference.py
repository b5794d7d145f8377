"""Eager references of group-wise quantization: the numerics the torch and Triton lanes reproduce.

A group-wise quantizer sees its tensor ``x`` as the 2-D view ``[C, K] = x.reshape(C, -1)`` (dim 0 the
output channel, the other dims flattened in row-major order) cut along K into groups of ``group_len``
consecutive elements; the last group of a row is shorter when ``group_len`` does not divide K. Its
parameters (``delta``, ``zero_float``, the running range) are ``[C, n_groups]`` with
``n_groups = ceil(K / group_len)``, and element ``(c, k)`` is quantized with parameter
``(c, k // group_len)``. ``signed`` stays one flag per quantizer (DESIGN §3: the smallest minimum
decides). Everything else is the per-tensor math of ``reference.py``, applied per group, so a
group that covers a whole row is the per-channel quantizer, bit for bit.

Layers (:func:`group_layout`): a Linear weight ``[out, in]`` groups ``group_size`` input features;
a conv weight ``[out, in, *kernel]`` groups ``group_size`` input channels, each with its whole
kernel (``group_len = group_size * prod(kernel)``: in the row-major flattening an input channel's
kernel is contiguous). That is the ``[out, in * kh * kw]`` matrix a conv runs as a GEMM, blocked
along its reduction dim as onnxruntime's and TensorRT's blocked weights are, and it keeps every
block inside whole input channels.
"""

from __future__ import annotations

import math

import torch

from .reference import fake_quant_reference, quantize_reference

__all__ = [
    "expand_groups",
    "group_fake_quant_reference",
    "group_layout",
    "group_minmax_reference",
    "group_quantize_reference",
    "group_shape",
]

MIN_POW2_GROUP = 16
"""Smallest power-of-two group size that may leave a shorter last group (onnxruntime's MatMulNBits
takes block sizes that are powers of two >= 16)."""


def group_layout(weight_shape, group_size: int) -> tuple[int, int]:
    """``(group_len, n_groups)`` of a weight of ``weight_shape`` grouped ``group_size`` input features.

    ``group_size`` must be a power of two >= 16, or divide the input features (``weight_shape[1]``);
    ``group_len`` counts elements of the flattened ``[C, K]`` row (``group_size * prod(kernel)``).

    Raises:
        ValueError: a weight of fewer than two dims, a ``group_size`` that is not an int >= 1, or one
            that is neither a power of two >= 16 nor a divisor of the input features (the message names
            ``WeightQuantConfig.group_size``).
    """
    shape = tuple(int(d) for d in weight_shape)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"WeightQuantConfig.group_size must be an int >= 1, got {group_size!r}")
    if len(shape) < 2:
        raise ValueError(
            f"WeightQuantConfig.group_size={group_size}: group-wise quantization needs a weight with input "
            f"features (2 or more dims), got shape {shape}; map this layer with group_size=None"
        )
    features = shape[1]
    pow2 = group_size >= MIN_POW2_GROUP and group_size & (group_size - 1) == 0
    if not pow2 and features % group_size != 0:
        raise ValueError(
            f"WeightQuantConfig.group_size={group_size} is neither a power of two >= {MIN_POW2_GROUP} nor a "
            f"divisor of the layer's {features} input features"
        )
    kernel = math.prod(shape[2:])
    return group_size * kernel, -(-features // group_size)


def group_shape(x: torch.Tensor, group_len: int) -> tuple[int, int, int]:
    """``(C, K, n_groups)`` of ``x`` seen as ``[C, K]`` in groups of ``group_len``."""
    if x.dim() < 1:
        raise ValueError("group-wise quantization needs a tensor with at least one dim")
    if isinstance(group_len, bool) or not isinstance(group_len, int) or group_len < 1:
        raise ValueError(f"group_len must be an int >= 1, got {group_len!r}")
    c = x.shape[0]
    k = x.numel() // c if c else math.prod(x.shape[1:])
    return c, k, -(-k // group_len)


def expand_groups(p: torch.Tensor, k: int, group_len: int) -> torch.Tensor:
    """``[C, n_groups]`` → ``[C, K]``: element ``(c, j)`` takes ``p[c, j // group_len]`` (differentiable)."""
    idx = torch.arange(k, device=p.device) // group_len
    return p[:, idx]


def _check_params(x: torch.Tensor, group_len: int, *params: torch.Tensor) -> tuple[int, int, int]:
    c, k, ng = group_shape(x, group_len)
    for p in params:
        if tuple(p.shape) != (c, ng):
            raise ValueError(
                f"group parameters of shape {tuple(p.shape)} do not match x of shape {tuple(x.shape)} in groups "
                f"of {group_len} (expected {(c, ng)})"
            )
    return c, k, ng


def _per_element(x, delta, zero_float, group_len):
    """``x`` as ``[C, K]`` and each element's ``delta`` and ``zero_float`` (``[C, K]``, differentiable)."""
    c, k, _ = _check_params(x, group_len, delta, zero_float)
    return x.reshape(c, k), expand_groups(delta, k, group_len), expand_groups(zero_float, k, group_len)


def group_fake_quant_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
) -> torch.Tensor:
    """``y = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)`` with each group's parameters.

    ``delta``/``zero_float``: fp32 ``[C, n_groups]``. Autograd as in ``fake_quant_reference``
    (straight-through round, zero outside the grid; ``delta``/``zero_float`` get the LSQ gradients,
    summed over each group by the expansion). Returns ``x``'s shape and dtype.
    """
    return fake_quant_reference(*_per_element(x, delta, zero_float, group_len), signed, n_bits, symmetric,
                                -1).reshape(x.shape)


def group_quantize_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_float: torch.Tensor,
    signed: torch.Tensor,
    n_bits: int,
    symmetric: bool,
    group_len: int,
) -> torch.Tensor:
    """The integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` (int64, ``x``'s shape; no autograd)."""
    return quantize_reference(*_per_element(x, delta, zero_float, group_len), signed, n_bits, symmetric,
                              -1).reshape(x.shape)


def group_minmax_reference(x: torch.Tensor, group_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (fp32 ``[C, n_groups]``) of the finite values of each group of ``x``.

    As ``batch_minmax_reference`` per group: non-finite values are ignored, a group without a finite
    value gives ``(+inf, -inf)``, a zero extreme is +0.0.
    """
    c, k, ng = group_shape(x, group_len)
    xf = x.detach().float().reshape(c, k)
    finite = torch.isfinite(xf)
    inf = torch.tensor(float("inf"), device=x.device)
    pad = ng * group_len - k
    lo = torch.nn.functional.pad(torch.where(finite, xf, inf), (0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(torch.where(finite, xf, -inf), (0, pad), value=float("-inf"))
    if ng == 0 or c == 0:
        return lo.new_empty((c, ng)), hi.new_empty((c, ng))
    return (lo.reshape(c, ng, group_len).amin(dim=2) + 0.0, hi.reshape(c, ng, group_len).amax(dim=2) + 0.0)
