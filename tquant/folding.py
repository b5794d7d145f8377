"""Folding at conversion: activations into the layer before them, batch norm into its convolution.

Without folding, a quantized layer quantizes its output and the activation after it runs on that
quantized value; the next quantizer (another layer's input or output quantizer) quantizes again, so
a deployed graph has a float ``DequantizeLinear → Relu → QuantizeLinear`` chain at every boundary.
With :attr:`tquant.QuantizationMap.fold_activations` on, :func:`fold_sequential_activations` gives
the activation to the layer (``QuantizationHijacker.activation_function``, which runs *before* the
output quantizer) and puts an ``nn.Identity()`` in its place, so each tensor is quantized once.

Which patterns are folded: a converted layer (a :class:`~tquant.base_modules.QuantizationHijacker`,
possibly wrapped in a :class:`~tquant.QuantizedInputModule`) directly followed, inside an
``nn.Sequential``, by one of :data:`FOLDABLE_ACTIVATIONS`. Activations called from a custom
``forward`` (``self.relu(self.conv(x))``) are not folded: the converter cannot see the data flow.

Which activations: those onnxruntime removes in front of a ``QuantizeLinear`` whose range already
clips them (ReluQuantFusion, ClipQuantFusion), so ``DequantizeLinear → Conv → Relu →
QuantizeLinear`` still becomes one QLinearConv. Other activations (GELU, SiLU, Sigmoid, Tanh,
LeakyReLU, PReLU) have no fused integer kernel after a Conv/Gemm; folding them would make the
layer itself run in float, so they are left where they are and the layer records them in
``unfolded_activation`` (the export report lists them).

Batch norm: :func:`fold_batch_norm` turns a converted ``Conv2d`` and the ``BatchNorm2d`` after it
into one :class:`QuantConvBn2d` whose quantized weight is the BN-folded weight, so the exported
graph has ``DequantizeLinear → Conv → QuantizeLinear`` (one QLinearConv) instead of a float
``BatchNormalization`` after the conv. Pairs: sequential neighbours
(:func:`sequential_conv_bn_pairs`, with ``QuantizationMap.fold_batch_norm``) and the named pairs of
``QuantizationMap.batch_norm_pairs`` for convs used from a custom ``forward``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base_modules import ACTIVATIONS, QuantizationHijacker
from .layers import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

__all__ = [
    "FOLDABLE_ACTIVATIONS",
    "FOLDED_CLASSES",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvBn3d",
    "QuantLinearBn1d",
    "fold_batch_norm",
    "fold_sequential_activations",
    "sequential_conv_bn_pairs",
]

FOLDABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
"""Activations folded into the layer before them (ReLU6 is a Hardtanh; both export as ``Clip``)."""


def _hijacker(module: nn.Module) -> QuantizationHijacker | None:
    inner = getattr(module, "module", None) if not isinstance(module, QuantizationHijacker) else module
    if isinstance(inner, QuantizationHijacker):
        return inner
    return None


def fold_sequential_activations(seq: nn.Sequential, excluded: set[str] = frozenset(), prefix: str = "") -> int:
    """Fold each foldable activation that directly follows a quantized layer in ``seq``; returns how many.

    The activation (a deep copy) becomes the layer's ``activation_function`` and its slot in
    ``seq`` becomes ``nn.Identity()`` (state-dict names of the other children do not change).
    A layer that already has an activation, and activations named in ``excluded`` (state-dict
    paths), are left alone. A non-foldable activation (see :data:`ACTIVATIONS`) sets the layer's
    ``unfolded_activation`` note instead.
    """
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"fold_sequential_activations: expected an nn.Sequential, got {type(seq).__name__}")
    names = list(seq._modules)
    folded = 0
    for name, next_name in zip(names, names[1:]):
        layer = _hijacker(seq._modules[name])
        act = seq._modules[next_name]
        path = f"{prefix}.{next_name}" if prefix else next_name
        if isinstance(act, nn.Identity):  # a batch norm folded into the conv before it
            act = seq._modules[names[names.index(next_name) + 1]] if next_name != names[-1] else None
            next_name = names[names.index(next_name) + 1] if act is not None else next_name
            path = f"{prefix}.{next_name}" if prefix else next_name
        if layer is None or act is None or path in excluded or layer.activation_function is not None:
            continue
        if isinstance(act, FOLDABLE_ACTIVATIONS):
            layer.activation_function = copy.deepcopy(act)
            seq._modules[next_name] = nn.Identity()
            folded += 1
        elif isinstance(act, ACTIVATIONS) or isinstance(act, (nn.Softplus, nn.Mish, nn.Hardswish, nn.ELU)):
            layer.unfolded_activation = (
                f"{type(act).__name__} ('{path}') after this layer is not folded: onnxruntime has no fused "
                f"integer kernel for {type(layer).__name__.removeprefix('Quant')} + {type(act).__name__}, so it "
                "runs in float between DequantizeLinear and QuantizeLinear"
            )
    return folded


# -- batch norm ------------------------------------------------------------------------------------
class _BatchNormFolded:
    """Mixin of the ``Quant*Bn`` layers: the layer's weight and bias with the following batch norm folded in.

    The layer runs ``op(x, fq(w * g), beta + (b - mean) * g)`` with ``g = gamma / sqrt(var + eps)`` per
    output channel and the BN's *running* statistics: the quantized weight is the BN-folded weight, as
    deployed (torch.ao's ConvBn QAT modules quantize the folded weight too). Gradients reach the layer's
    weight and bias and the BN's ``weight``/``bias`` through the folding.

    In training mode, until ``freeze_bn_step`` training forwards have run (``None``: never), each
    forward first updates the running statistics from the batch (a float op without gradient, the BN's
    ``momentum``), then folds; afterwards they stay frozen. Meant for QAT fine-tuning of a trained float
    model, whose running statistics are already good (the usual QAT recipe).
    """

    bn: nn.modules.batchnorm._BatchNorm
    freeze_bn_step: int | None
    bn_steps: torch.Tensor

    def get_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bn = self.bn
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        weight = self.weight * gain.reshape(-1, *([1] * (self.weight.dim() - 1)))
        return weight, shift + (bias - bn.running_mean) * gain

    def _weight_cache_key(self, weight: torch.Tensor) -> tuple:
        bn = self.bn
        return (*super()._weight_cache_key(weight), *(t._version for t in (bn.running_mean, bn.running_var)),
                *(t._version for t in (bn.weight, bn.bias) if t is not None))

    def forward(self, x: torch.Tensor, offsets=None) -> torch.Tensor:
        if self.training and (self.freeze_bn_step is None or int(self.bn_steps) < self.freeze_bn_step):
            self._update_bn_statistics(x)
        return super().forward(x, offsets=offsets)

    @torch.no_grad()
    def _update_bn_statistics(self, x: torch.Tensor) -> None:
        y = self.run_forward(x, self.weight, self.bias)
        bn = self.bn
        dims = (0, *range(2, y.dim()))
        n = y.numel() / y.shape[1]
        mean = y.mean(dim=dims)
        var = y.var(dim=dims, unbiased=False) * (n / max(n - 1, 1))
        momentum = 0.1 if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(var, alpha=momentum)
        self.bn_steps += 1
        self.clear_cache()


class QuantConvBn2d(_BatchNormFolded, QuantConv2d):
    """A :class:`~tquant.QuantConv2d` with the following ``BatchNorm2d`` folded into its weight and bias
    (see :class:`_BatchNormFolded`). Built by :func:`fold_batch_norm` from a converted conv and its batch
    norm (``self.bn``)."""


class QuantConvBn1d(_BatchNormFolded, QuantConv1d):
    """A :class:`~tquant.QuantConv1d` with the following ``BatchNorm1d`` folded in (see :class:`QuantConvBn2d`)."""


class QuantConvBn3d(_BatchNormFolded, QuantConv3d):
    """A :class:`~tquant.QuantConv3d` with the following ``BatchNorm3d`` folded in (see :class:`QuantConvBn2d`)."""


class QuantLinearBn1d(_BatchNormFolded, QuantLinear):
    """A :class:`~tquant.QuantLinear` on ``[N, C]`` inputs with the following ``BatchNorm1d`` folded in."""


FOLDED_CLASSES = {
    QuantConv1d: (QuantConvBn1d, nn.BatchNorm1d),
    QuantConv2d: (QuantConvBn2d, nn.BatchNorm2d),
    QuantConv3d: (QuantConvBn3d, nn.BatchNorm3d),
    QuantLinear: (QuantLinearBn1d, nn.BatchNorm1d),
}
"""Converted layer type -> (its batch-norm-folded class, the batch norm type it folds)."""


def _convert_conv_bn(qconv: nn.Module, bn: nn.Module, freeze_bn_step: int | None) -> nn.Module:
    """Turn the converted layer into its ``Quant*Bn`` class in place (its quantizers and parameters kept)."""
    if type(qconv) not in FOLDED_CLASSES:
        raise TypeError(f"batch-norm folding needs a QuantConv1d/2d/3d or QuantLinear, got {type(qconv).__name__}")
    folded_class, bn_type = FOLDED_CLASSES[type(qconv)]
    if type(bn) is not bn_type:
        raise TypeError(f"a {type(qconv).__name__} folds a {bn_type.__name__}, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("batch-norm folding needs a batch norm with running statistics (track_running_stats)")
    out_channels = qconv.out_features if isinstance(qconv, nn.Linear) else qconv.out_channels
    if bn.num_features != out_channels:
        raise ValueError(f"{bn_type.__name__} has {bn.num_features} features, the layer {out_channels} outputs")
    qconv.__class__ = folded_class
    qconv.bn = bn
    qconv.freeze_bn_step = freeze_bn_step
    qconv.register_buffer("bn_steps", torch.zeros((), dtype=torch.int64, device=bn.running_mean.device))
    qconv.clear_cache()
    return qconv


def _inner_bn(module: nn.Module) -> nn.Module | None:
    inner = getattr(module, "module", module)
    return inner if type(inner) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) else None


def _conv_of(module: nn.Module) -> nn.Module | None:
    inner = module if isinstance(module, QuantizationHijacker) else getattr(module, "module", None)
    return inner if type(inner) in FOLDED_CLASSES else None


def fold_batch_norm(model: nn.Module, pairs: dict[str, str], freeze_bn_step: int | None = None) -> list[str]:
    """Fold each named BatchNorm2d into the named converted conv before it; returns the conv names.

    ``pairs`` maps a conv's state-dict name to its batch norm's (``{"layer1.conv1": "layer1.bn1"}``):
    the conv becomes a :class:`QuantConvBn2d` holding the batch norm (``<conv>.bn``), and the batch
    norm's slot becomes ``nn.Identity()`` (a :class:`~tquant.QuantBatchNorm2d` wrapper and its
    output quantizer are dropped: the conv's output quantizer now sits after the batch norm).

    Raises:
        ValueError: a name that is not in the model, or that is not a converted Conv2d / a BatchNorm2d
            (the message names it).
    """
    modules = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in pairs.items():
        conv = _conv_of(modules.get(conv_name)) if conv_name in modules else None
        bn = _inner_bn(modules[bn_name]) if bn_name in modules else None
        if conv is None:
            raise ValueError(
                f"fold_batch_norm: '{conv_name}' is not a converted Conv2d (or Conv1d/Conv3d/Linear) in "
                f"{type(model).__name__}"
            )
        if bn is None:
            raise ValueError(f"fold_batch_norm: '{bn_name}' is not a BatchNorm2d (or 1d/3d) in {type(model).__name__}")
        try:
            _convert_conv_bn(conv, bn, freeze_bn_step)
        except (TypeError, ValueError) as e:
            raise ValueError(f"fold_batch_norm: '{conv_name}' + '{bn_name}': {e}") from e
        parent_name, _, attr = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, nn.Identity())
        folded.append(conv_name)
    return folded


def sequential_conv_bn_pairs(seq: nn.Sequential) -> dict[str, str]:
    """``{conv: bn}`` child names of ``seq`` where a converted Conv2d is directly followed by a BatchNorm2d."""
    children = list(seq._modules.items())
    return {a: b for (a, ma), (b, mb) in zip(children, children[1:]) if type(_conv_of(ma)) is QuantConv2d
            and type(_inner_bn(mb)) is nn.BatchNorm2d}
