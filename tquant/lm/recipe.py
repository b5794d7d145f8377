"""The language-model quantization recipe: weight-only group-wise INT4 on every linear layer.

:func:`weight_only_map` quantizes the weights of every ``nn.Linear`` (the attention and MLP
projections and ``lm_head``) to ``n_bits`` with one scale per output row and ``group_size``
input features, leaving activations, the embedding and the norms float: onnxruntime then runs
each linear layer as one ``MatMulNBits``. :func:`round_to_nearest` is the post-training
baseline (each group's min/max range, codes rounded to nearest); :func:`prepare_qat` starts QAT
from it.
"""

from __future__ import annotations

import torch
from torch import nn

import tquant


def weight_only_map(model: nn.Module, n_bits: int = 4, group_size: int | None = 128,
                    symmetric: bool = True) -> tquant.QuantizationMap:
    """``QuantizationMap`` for ``model``: ``n_bits`` group-wise (``group_size``; None: per output
    channel) weights on every ``nn.Linear``; every other module with parameters stays float on purpose."""
    weights = tquant.WeightQuantConfig(n_bits, symmetric, per_channel=True, group_size=group_size)
    qmap = tquant.QuantizationMap(excluded_modules=[
        name for name, m in model.named_modules()
        if name and not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))
    ])
    qmap.module_qconfig_map[nn.Linear] = tquant.QuantizedModuleConfig(
        tquant.QuantLinear, tquant.QuantizationConfig(tquant.ActivationQuantConfig(0), weights))
    return qmap


def round_to_nearest(model: nn.Module, qmap: tquant.QuantizationMap, sample: torch.Tensor) -> nn.Module:
    """A converted copy of ``model`` whose weight ranges are each group's min/max, then fixed:
    post-training round-to-nearest quantization (one forward on ``sample`` sets the ranges)."""
    qmodel = tquant.convert_to_quantized(model, qmap)
    tquant.estimate_ranges(qmodel)
    with torch.no_grad():
        qmodel(sample)
    tquant.fix_ranges(qmodel)
    return qmodel.eval()


def prepare_qat(model: nn.Module, qmap: tquant.QuantizationMap, sample: torch.Tensor,
                learn_ranges: bool = True) -> nn.Module:
    """A converted copy of ``model`` ready for QAT, starting from :func:`round_to_nearest`'s ranges:
    learned (LSQ: each group's scale trains with the weights) or, with ``learn_ranges=False``,
    re-estimated from the weights at every training step."""
    qmodel = round_to_nearest(model, qmap, sample)
    if learn_ranges:
        tquant.learn_ranges(qmodel)
    else:
        tquant.estimate_ranges_train(qmodel)
    return qmodel.train()
