"""A small Llama-shaped decoder-only transformer over bytes (:class:`ByteLM`), and its decode step.

Pre-norm blocks: ``x + attn(rmsnorm(x))``, then ``x + mlp(rmsnorm(x))``; causal multi-head
attention with rotary positions (rotate-half form, as Llama) on queries and keys; a SwiGLU MLP
``down(silu(gate(x)) * up(x))``; a final RMSNorm and an untied ``lm_head``. Every projection is a
bias-free ``nn.Linear`` (what a weight-only quantization map converts); the embedding and the
norms stay float.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LMConfig:
    """Shape of a :class:`ByteLM`. The default (10.8 M parameters) is the benchmark's model."""

    vocab_size: int = 256
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 6
    ffn_dim: int = 1024
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"LMConfig.dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` (computed in fp32, returned in ``x``'s dtype)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # written as a division: onnxruntime fuses it into SimplifiedLayerNormalization
        return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(config: LMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[max_seq_len, head_dim]`` (each frequency twice, rotate-half layout)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, Dh]`` by the positions whose ``cos``/``sin`` rows ``[T, Dh]`` are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and an optional key/value cache."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, cache=None):
        """``x`` ``[B, T, dim]``; ``cos``/``sin`` the rows of these T positions. Returns ``y``; with
        ``cache = (past_k, past_v)`` (``[B, H, P, Dh]``, the P positions before) ``(y, k, v)``: the new
        positions' keys and values ``[B, H, T, Dh]``, for the caller to append. The cache is read where
        it lies, never copied: the scores against it and against the new keys share one softmax."""
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin) * (1.0 / math.sqrt(self.head_dim))
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        t = q.shape[2]
        scores = q @ k.transpose(-2, -1)
        if t > 1:  # causal among the new positions; every cached one lies before them
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if cache is None:
            y = scores.softmax(dim=-1) @ v
        else:
            past_k, past_v = cache
            p = past_k.shape[2]
            probs = torch.cat([q @ past_k.transpose(-2, -1), scores], dim=-1).softmax(dim=-1)
            y = probs[..., :p] @ past_v + probs[..., p:] @ v
        y = self.o_proj(y.transpose(1, 2).reshape(x.shape))
        return y if cache is None else (y, k, v)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        """``x + attn(norm(x))``, then ``+ mlp(norm(.))``; with ``cache`` also the new k/v (:class:`Attention`)."""
        a = self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + (a if cache is None else a[0])
        x = x + self.mlp(self.mlp_norm(x))
        return x if cache is None else (x, a[1], a[2])


class ByteLM(nn.Module):
    """Decoder-only byte-level language model.

    ``forward(tokens)``: int64 ``[B, T]`` (``T <= max_seq_len``) to next-token logits
    ``[B, T, vocab_size]`` (fp32). :meth:`step` runs T new positions after a key/value cache.
    Initialisation: normal(0, 0.02), the residual projections (``o_proj``, ``down_proj``) scaled
    by ``1/sqrt(2 n_layers)``; seed with ``torch.manual_seed`` for a reproducible model.
    """

    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.layers:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def _check(self, tokens: torch.Tensor, start: int) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"ByteLM: tokens must be int64 [batch, time], got {tokens.dtype} {tuple(tokens.shape)}")
        if start + tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"ByteLM: {start + tokens.shape[1]} positions exceed max_seq_len "
                             f"{self.config.max_seq_len}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check(tokens, 0)
        t = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    def step(self, tokens: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """Decode: ``tokens`` ``[B, T]`` at positions ``P .. P + T - 1`` after the cache
        ``past_k``/``past_v`` ``[n_layers, B, H, P, Dh]``. Returns ``(logits [B, T, V], k, v)``, ``k``/``v``
        the new positions' ``[n_layers, B, H, T, Dh]``: the next cache is ``torch.cat([past_k, k], 3)``."""
        start = past_k.shape[3]
        self._check(tokens, start)
        t = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            x, k, v = block(x, cos, sin, (past_k[i], past_v[i]))
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)).float(), torch.stack(ks), torch.stack(vs)

    def empty_cache(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Key/value caches of zero positions for :meth:`step`."""
        c = self.config
        shape = (c.n_layers, batch, c.n_heads, 0, c.head_dim)
        return self.rope_cos.new_zeros(shape), self.rope_cos.new_zeros(shape)


class DecodeStep(nn.Module):
    """``forward(tokens, past_k, past_v) = model.step(...)``: the module exported for decoding."""

    def __init__(self, model: ByteLM):
        super().__init__()
        self.model = model

    def forward(self, tokens, past_k, past_v):
        return self.model.step(tokens, past_k, past_v)


def count_parameters(model: nn.Module) -> int:
    """Trainable float parameters (quantizer ranges excluded: they are not weights)."""
    return sum(p.numel() for name, p in model.named_parameters() if "quantizer" not in name)
