"""Data-parallel range estimation: the same quantization ranges on every process."""

from __future__ import annotations

from torch import nn

from .quantization_manager import QuantizationManager


def convert_sync_ranges(model: nn.Module, process_group=None) -> nn.Module:
    """Make every quantizer of ``model`` reduce its batch range across ``process_group``.

    With DDP each process sees another shard of the batch; unsynchronised running ranges
    drift apart and the replicas quantize differently. After this call, min/max estimators
    all-reduce the batch min (MIN) and max (MAX) before the running update, so every rank
    computes identical ranges and parameters (two tiny all-reduces per quantizer forward,
    no host sync); search and percentile estimators reduce their resulting range the same
    way. Without an initialised process group it changes nothing. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, QuantizationManager):
            module.sync_ranges = True
            module.process_group = process_group
    return model
