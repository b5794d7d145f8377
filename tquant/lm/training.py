"""Training and evaluation of a :class:`~tquant.lm.ByteLM`: next-byte cross-entropy, perplexity.

:func:`train` is plain AdamW (betas 0.9/0.95, weight decay on matrices only) with a linear warm-up
and a cosine decay, gradient clipping, and batches of random windows drawn from a seeded
generator: the same seed gives the same batches and, on one machine, the same model. It trains a
float model and a converted one alike (QAT): the optimizer holds every parameter of the model, the
quantizers' ranges included, which train only in ``learn_ranges`` state (aihwkit's contract).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .data import random_windows


@dataclass(frozen=True)
class TrainConfig:
    """One training run: ``steps`` of ``batch`` windows of ``seq_len`` tokens."""

    steps: int
    batch: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    final_lr_ratio: float = 0.05
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine decay to ``lr * final_lr_ratio`` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup - 1)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * cos)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embedding); none on norms' gains and quantizer ranges."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "quantizer" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``windows`` int64 ``[B, T + 1]``."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def train(model: nn.Module, data: torch.Tensor, config: TrainConfig,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``data`` (uint8 tokens); returns the loss of every step.

    ``on_step(step, loss)`` is called after each step (progress bars). The model is left in
    train mode.
    """
    generator = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    params = [p for group in opt.param_groups for p in group["params"]]
    model.train()
    losses = []
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        loss = lm_loss(model, random_windows(data, config.batch, config.seq_len, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], config.clip)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    """``exp`` of the mean next-token cross-entropy over every position of ``windows`` (eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def next_tokens(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The model's most likely next token at every position of ``windows[:, :-1]`` (eval mode)."""
    model.eval()
    return torch.cat([model(chunk[:, :-1]).argmax(-1) for chunk in windows.split(batch)])
