"""The language-model example (:mod:`tquant.lm`): corpus, model, weight-only INT4 recipe, QAT, and the same
recipe on Hugging Face's ``LlamaForCausalLM`` when ``transformers`` is installed."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tquant
from tquant.lm import ByteLM, LMConfig, count_parameters
from tquant.lm.data import eval_windows, load_corpus, random_windows, stdlib_sources
from tquant.lm.recipe import prepare_qat, round_to_nearest, weight_only_map
from tquant.lm.training import TrainConfig, lm_loss, next_tokens, perplexity, train

TINY = LMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_train_bytes=1 << 16, max_val_bytes=1 << 12)


def test_corpus_is_the_stdlib_split_by_file(corpus):
    files = stdlib_sources()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    assert corpus.train.dtype == torch.uint8 and len(corpus.train) == 1 << 16 and len(corpus.val) == 1 << 12
    assert load_corpus(max_train_bytes=1 << 16, max_val_bytes=1 << 12).digest == corpus.digest, "deterministic"
    assert bytes(corpus.val[:200].tolist()) not in bytes(corpus.train.tolist()), "validation files are held out"
    w = eval_windows(corpus.val, 16, 5)
    assert w.shape == (5, 17) and torch.equal(w[1, 0], w[0, 16]) and w.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    r = random_windows(corpus.train, 4, 16, g)
    assert r.shape == (4, 17) and torch.equal(r, random_windows(corpus.train, 4, 16, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(corpus.val[:10], 16)


def test_model_shapes_causality_and_cache():
    torch.manual_seed(0)
    model = ByteLM(TINY).eval()
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 256) and logits.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8], rtol=0, atol=1e-6)  # no peeking ahead
    k, v = model.empty_cache(2)
    parts = []
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:]):  # a prefill, then decode steps
        out, new_k, new_v = model.step(chunk, k, v)
        assert new_k.shape[3] == chunk.shape[1]
        k, v = torch.cat([k, new_k], 3), torch.cat([v, new_v], 3)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), logits, rtol=1e-5, atol=1e-5)
    assert k.shape == (TINY.n_layers, 2, TINY.n_heads, 12, TINY.head_dim)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(dim=30, n_heads=4)
    assert count_parameters(ByteLM()) == 10_818_432, "the benchmark's model: 10.8 M parameters"


def test_weight_only_map_quantizes_every_linear_layer_and_nothing_else():
    model = ByteLM(TINY)
    qmodel = tquant.convert_to_quantized(model, weight_only_map(model, 4, 16))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [n for n, m in qmodel.named_modules() if isinstance(m, tquant.QuantLinear)]
    assert quantized == linears and len(linears) == 7 * TINY.n_layers + 1
    assert isinstance(qmodel.embed, nn.Embedding) and not isinstance(qmodel.embed, tquant.QuantEmbedding)
    q = qmodel.layers[0].mlp.down_proj.weight_quantizer.quantizer
    assert q._delta.shape == (TINY.dim, TINY.ffn_dim // 16) and q.n_bits == 4
    assert not qmodel.layers[0].mlp.down_proj._quant_a, "activations stay float"


def test_rtn_then_qat_lowers_the_loss_and_keeps_4bit_groups(corpus):
    torch.manual_seed(0)
    model = ByteLM(TINY)
    train(model, corpus.train, TrainConfig(steps=30, batch=8, seq_len=32, lr=3e-3, warmup=3))
    qmap = weight_only_map(model, 4, 16)
    val = eval_windows(corpus.val, 32, 8)
    rtn = round_to_nearest(model, qmap, val[:1, :-1])
    w = rtn.layers[1].mlp.up_proj
    codes = w.get_params()[0].detach().reshape(TINY.ffn_dim, -1, 16) / w.weight_quantizer.quantizer._delta[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8, "each group: 4-bit codes x scale"
    qat = prepare_qat(model, qmap, val[:1, :-1])
    assert qat.layers[0].attn.q_proj.weight_quantizer.is_learning()
    batch = random_windows(corpus.train, 8, 32, torch.Generator().manual_seed(5))
    before = lm_loss(qat, batch).item()
    losses = train(qat, corpus.train, TrainConfig(steps=8, batch=8, seq_len=32, lr=1e-3, warmup=1, seed=1))
    assert all(map(math.isfinite, losses))
    assert lm_loss(qat, batch).item() < before
    q = qat.layers[0].attn.q_proj.weight_quantizer.quantizer
    rtn_delta = rtn.layers[0].attn.q_proj.weight_quantizer.quantizer._delta
    assert q._delta.requires_grad and not torch.equal(q._delta, rtn_delta), "the scales trained"
    assert math.isfinite(perplexity(qat, val)) and next_tokens(qat, val).shape == (8, 32)


def test_bench_lm_quick_writes_the_table(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="tquant bench lm runs onnxruntime: pip install 'tquant[onnx]'")
    from tquant.cli import main

    argv = ["bench", "lm", "--quick", "--float-steps", "4", "--qat-steps", "2", "--reps", "2", "--warmup", "1",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "check: MatMulNBits for every linear layer (15 / 15 of 15, prefill / decode): ok" in out
    assert "check: onnxruntime agrees with PyTorch" in out
    with open(tmp_path / "lm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["float", "float +2", "W4 g32 RTN", "W4 g32 QAT"]
    assert float(rows[3]["ort_agree"]) >= 99.0 and float(rows[3]["size_vs_fp32"]) < 100
    assert json.loads((tmp_path / "lm.json").read_text())["environment"]["settings"]["float_steps"] == 4
    assert "| W4 g32 QAT |" in (tmp_path / "lm.md").read_text()
    from tquant.benchmarks import bench_lm

    settings = bench_lm.settings_from_args(bench_lm.build_parser().parse_args(argv[2:]))
    _, info = bench_lm.float_model(settings, load_corpus(*settings.corpus_bytes), tmp_path / "cache")
    assert info["cached"], "a second run takes the trained float model from the cache"


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _llama_classes():
    """``LlamaConfig, LlamaForCausalLM``, imported with the repository root off ``sys.path``.

    ``python -m pytest`` in a checkout puts the root on ``sys.path``, where tquant's ``kernels/``
    folder (installed as ``tquant.kernels``) passes for Hugging Face's ``kernels`` package:
    transformers imports it to read its version, and tquant's ops would be registered twice.
    """
    import tquant.kernels

    root = Path(tquant.kernels.__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    finally:
        sys.path[:] = saved
    return LlamaConfig, LlamaForCausalLM


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (optional: pip install 'tquant[hf]'); "
                                                  "the LlamaForCausalLM case needs it")
def test_llama_for_causal_lm_converts_and_trains():
    """The same recipe on Hugging Face's Llama, built from a small config (no download)."""
    LlamaConfig, LlamaForCausalLM = _llama_classes()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    qmap = weight_only_map(model, 4, 32)
    rtn = round_to_nearest(model, qmap, tokens[:1])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, m in rtn.named_modules() if isinstance(m, tquant.QuantLinear)] == linears
    assert len(linears) == 7 * config.num_hidden_layers + 1
    k_proj = rtn.model.layers[0].self_attn.k_proj
    assert k_proj.weight_quantizer.quantizer._delta.shape == (32, 2), "grouped-query k_proj: [out 32, 64 / 32]"
    with torch.no_grad():
        float_loss = model(tokens, labels=tokens).loss.item()
        rtn_loss = rtn(tokens, labels=tokens).loss.item()
    assert math.isfinite(rtn_loss) and rtn_loss != float_loss
    qat = prepare_qat(model, qmap, tokens[:1])
    opt = torch.optim.AdamW(qat.parameters(), lr=3e-3)  # every parameter, the learned ranges included
    losses = []
    for _ in range(6):
        loss = qat(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(map(math.isfinite, losses))
    assert qat.model.layers[1].mlp.down_proj.weight_quantizer.quantizer._delta.grad is not None
    qat.eval()
    with torch.no_grad():
        assert math.isfinite(qat(tokens, labels=tokens).loss.item())
