"""convert_sync_ranges: every data-parallel rank ends up with the same ranges."""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tquant


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qmodel():
    torch.manual_seed(0)
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8, False)
    tquant.append_default_conversions(qmap)
    return tquant.convert_to_quantized(nn.Sequential(nn.Linear(4, 3)), qmap)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective one rank never joins fails in two minutes, not after gloo's default half hour
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=2))
    model = tquant.convert_sync_ranges(_qmodel())
    for step in range(2):
        x = torch.full((2, 4), float(rank + 1)) * (1 if step else -1) + torch.arange(4.0)
        model(x)
    est = model[0].activation_quantizer.range_estimator
    torch.save({"min": est.current_xmin, "max": est.current_xmax,
                "delta": model[0].activation_quantizer.quantizer._delta.detach()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_share_ranges(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    for key in ("min", "max", "delta"):
        assert torch.equal(r0[key], r1[key]), key
    # the same ranges as one process seeing both shards of every batch
    single = _qmodel()
    w = single[0].weight
    for step in range(2):
        xs = [torch.full((2, 4), float(r + 1)) * (1 if step else -1) + torch.arange(4.0) for r in range(2)]
        single(torch.cat(xs))
    assert torch.equal(single[0].weight, w)
    est = single[0].activation_quantizer.range_estimator
    assert torch.allclose(r0["min"], est.current_xmin) and torch.allclose(r0["max"], est.current_xmax)


def test_without_process_group_nothing_changes():
    model = tquant.convert_sync_ranges(_qmodel())
    plain = _qmodel()
    x = torch.randn(5, 4)
    assert torch.equal(model(x), plain(x))
