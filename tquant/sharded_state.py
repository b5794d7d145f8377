"""Quantizer state under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards every parameter of the modules it manages, quantizers' ``_delta`` and
``_zero_float`` included (aihwkit keeps them as parameters, so ``learn_ranges`` can train them).
Before a forward it all-gathers each parameter into an unsharded tensor and registers that on
the module; after it, it registers the sharded parameter again and frees the unsharded one.
A range estimator writes ``_delta`` / ``_zero_float`` in place during the forward — into the
unsharded tensor, which FSDP2 then frees: without help the next all-gather would bring back the
old values, eval would quantize with stale ranges and checkpoints would hold them.

FSDP2 swaps the two through ``setattr`` when a module overrides ``__setattr__`` (quantizers do),
so a quantizer sees the moment its sharded parameter comes back and copies this rank's part of
what the forward wrote into it (:func:`keep_forward_writes`). Every rank computes the same
values (the weight is all-gathered; activation ranges need ``tquant.convert_sync_ranges``), so
the shards stay one consistent tensor. Learned ranges are left to FSDP2 and the optimizer:
nothing writes them in a forward.
"""

from __future__ import annotations

import torch


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it needlessly)."""
    if not torch.distributed.is_available() or not isinstance(tensor, torch.Tensor):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def keep_forward_writes(current: torch.Tensor | None, sharded: torch.Tensor) -> None:
    """Copy this rank's part of ``current`` (the unsharded tensor a forward may have written)
    into the local shard of ``sharded`` (the DTensor FSDP2 is about to register again).

    Does nothing unless ``current`` is a plain tensor of ``sharded``'s global shape and
    ``sharded`` does not require grad (a learned range is the optimizer's to change).
    """
    if current is None or sharded.requires_grad or is_dtensor(current) or current.shape != sharded.shape:
        return
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank cuts its own part, no communication
    part = distribute_tensor(current.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None)
    with torch.no_grad():
        sharded.to_local().copy_(part.to_local())
