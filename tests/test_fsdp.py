"""FSDP2: a converted language model shards with ``fully_shard`` as it is and trains like one process.

Two gloo ranks on the CPU shard a small :class:`~tquant.lm.ByteLM` per block and at the root
(4-bit per-channel and group-wise weights, an 8-bit asymmetric per-tensor weight, 8-bit output
quantizers synchronised with ``convert_sync_ranges``), train it for three steps with estimated ranges and
two with learned ones, each rank on its half of every batch. The mean loss of the two ranks at
every step must equal the loss of one process training the same model on the whole batches (to
float rounding), every quantizer's state must be the same on both ranks, bit for bit, and equal
the single process's. Checkpoints written with ``torch.distributed.checkpoint`` by the sharded
model load into an unsharded one and the other way round.
"""

from __future__ import annotations

import io
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tquant
from tquant.lm import ByteLM, LMConfig

dcp = pytest.importorskip("torch.distributed.checkpoint", reason="torch.distributed.checkpoint is not available")
fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch.distributed.fsdp is not available")

CONFIG = LMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16)
ESTIMATE_STEPS, LEARN_STEPS = 3, 2
BATCH, SEQ = 4, 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qmodel() -> torch.nn.Module:
    """The converted test model (seeded): 4-bit per-channel weights, asymmetric 4-bit group-wise
    ones (groups of 16) in the MLPs' up projections, one 8-bit asymmetric per-tensor weight, two
    8-bit output quantizers (asymmetric and symmetric)."""
    torch.manual_seed(0)
    qmap = tquant.QuantizationMap(excluded_modules=["embed"])
    qmap.default_qconfig = tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(0), tquant.WeightQuantConfig(4, True, True))
    qmap.instance_qconfig_map["layers.0.mlp.down_proj"] = tquant.QuantizedModuleConfig(
        tquant.QuantLinear, tquant.QuantizationConfig(tquant.ActivationQuantConfig(8, False),
                                                      tquant.WeightQuantConfig(8, False)))
    qmap.instance_qconfig_map["layers.1.attn.o_proj"] = tquant.QuantizedModuleConfig(
        tquant.QuantLinear, tquant.QuantizationConfig(tquant.ActivationQuantConfig(8, True),
                                                      tquant.WeightQuantConfig(4, True, True)))
    for i in range(CONFIG.n_layers):
        qmap.instance_qconfig_map[f"layers.{i}.mlp.up_proj"] = tquant.QuantizedModuleConfig(
            tquant.QuantLinear, tquant.QuantizationConfig(tquant.ActivationQuantConfig(0),
                                                          tquant.WeightQuantConfig(4, False, group_size=16)))
    tquant.append_default_conversions(qmap)
    return tquant.convert_sync_ranges(tquant.convert_to_quantized(ByteLM(CONFIG), qmap))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=g) for _ in range(ESTIMATE_STEPS + LEARN_STEPS)]


def eval_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(2))


def train(model, rows: slice) -> list[float]:
    """The schedule: estimated ranges, then learned ones; returns each step's loss (mean over ranks)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the range parameters too (aihwkit's contract)
    losses = []
    for step, batch in enumerate(batches()):
        if step == ESTIMATE_STEPS:
            tquant.learn_ranges(model)
        batch = batch[rows]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        losses.append(value.item())
    return losses


def quantizer_state(model) -> dict[str, torch.Tensor]:
    """Every quantizer tensor of ``model``, whole (sharded parameters gathered), on the CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "quantizer" in name:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = full.detach().cpu().clone()
    return state


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(eval_tokens())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective one rank never joins fails in two minutes, not after gloo's default half hour
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=2))
    torch.set_num_threads(1)

    def sharded():
        model = qmodel()
        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)

    model = sharded()
    half = BATCH // world
    losses = train(model, slice(rank * half, (rank + 1) * half))
    logits = eval_logits(model)
    dcp.save(get_model_state_dict(model), checkpoint_id=f"{out}/sharded")
    result = {"losses": losses, "state": quantizer_state(model), "logits": logits}

    # the single process's checkpoint (written before the ranks started) into a sharded model
    restored = sharded()
    sd = get_model_state_dict(restored)
    dcp.load(sd, checkpoint_id=f"{out}/single")
    set_model_state_dict(restored, sd)
    result["restored_logits"] = eval_logits(restored)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    single = qmodel()
    losses = train(single, slice(None))
    logits = eval_logits(single)
    dcp.save(single.state_dict(), checkpoint_id=out / "single")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"losses": losses, "state": quantizer_state(single), "logits": logits, "model": single}, ranks, out


def test_sharded_training_matches_one_process(runs):
    single, ranks, _ = runs
    for r in ranks:
        assert len(r["losses"]) == ESTIMATE_STEPS + LEARN_STEPS and all(map(math.isfinite, r["losses"]))
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert single["losses"][-1] < single["losses"][0], "the schedule trains"


def test_quantizer_state_is_the_same_on_both_ranks_and_as_one_process(runs):
    single, (r0, r1), _ = runs
    assert r0["state"].keys() == r1["state"].keys() == single["state"].keys()
    for name in r0["state"]:
        a, b = r0["state"][name], r1["state"][name]
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name} differs between the ranks"
        # learned ranges' gradients sum over whole tensors, which the ranks add in another order
        torch.testing.assert_close(a, single["state"][name], rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
    ranged = [n for n, t in r0["state"].items() if n.endswith("_delta") and not t.isnan().any()]
    assert len(ranged) == 7 * CONFIG.n_layers + 1 + 2, "every weight quantizer and both output quantizers"
    torch.testing.assert_close(r0["logits"], single["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(r0["logits"], r1["logits"])


def test_checkpoints_move_between_sharded_and_unsharded_models(runs):
    single, (r0, r1), out = runs
    # unsharded -> sharded: the ranks loaded the single process's checkpoint
    assert torch.equal(r0["restored_logits"], single["logits"]) and torch.equal(r1["restored_logits"], single["logits"])
    # sharded -> unsharded
    fresh = qmodel()
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=out / "sharded")
    fresh.load_state_dict(sd)
    ranged = {n + ".quantizer._delta" for n, m in fresh.named_modules()
              if isinstance(m, tquant.QuantizationManager) and m.is_initialized}
    assert ranged == {n for n, t in r0["state"].items() if n.endswith("_delta") and not t.isnan().any()}
    for name, tensor in quantizer_state(fresh).items():
        assert torch.equal(tensor.nan_to_num(), r0["state"][name].nan_to_num()), name
    assert torch.equal(eval_logits(fresh), r0["logits"])


@pytest.mark.parametrize("lane", ["host", "torch"])
def test_quantizer_calls_leave_parameter_storage_resizable(lane):
    """FSDP2 frees each unsharded parameter after the forward by resizing its storage to 0: no lane
    may pin the storage of a weight or of a quantizer's own state (``Tensor.numpy()`` would)."""
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig = tquant.QuantizationConfig(tquant.ActivationQuantConfig(8, False),
                                                     tquant.WeightQuantConfig(8, False, lane == "torch"))
    tquant.append_default_conversions(qmap)
    layer = tquant.convert_to_quantized(torch.nn.Sequential(torch.nn.Linear(8, 4)), qmap)[0]
    x = torch.randn(3 if lane != "torch" else (1 << 14) + 1, 8, requires_grad=True)  # torch: outputs > 2^16
    layer(x).sum().backward()
    tquant.learn_ranges(layer)
    layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
    managers = (layer.weight_quantizer, layer.activation_quantizer)
    assert {call.lane for m in managers for call in m._calls.values()} == {lane}
    tensors = [layer.weight] + [t for m in managers for t in (m.quantizer._delta, m.quantizer._zero_float)]
    for t in tensors:
        t.untyped_storage().resize_(0)  # raises "Trying to resize storage that is not resizable" if pinned


def test_per_tensor_state_is_one_element_and_loads_aihwkit_scalars():
    """Per-tensor ranges are ``[1]`` parameters (FSDP2 shards no 0-dim one); a checkpoint with
    aihwkit's 0-dim ``_delta``/``_zero_float`` (and tquant's before) loads into them."""
    model = qmodel()
    model.train()
    model(eval_tokens())
    q = model.layers[0].mlp.down_proj.weight_quantizer.quantizer
    assert q._delta.shape == q._zero_float.shape == (1,) and q.delta.shape == q.scale.shape == ()
    old = {k: (v.reshape(()) if k.endswith(("_delta", "_zero_float")) and v.numel() == 1 else v)
           for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    fresh = qmodel()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fq = fresh.layers[0].mlp.down_proj.weight_quantizer.quantizer
    assert fq.is_initialized and fq._delta.shape == (1,) and torch.equal(fq._delta, q._delta)
    assert torch.equal(eval_logits(fresh), eval_logits(model))
