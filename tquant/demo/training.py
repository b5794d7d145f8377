"""Training, calibration and evaluation in PyTorch."""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import tquant

from .data import DigitsData
from .settings import BATCH_SIZE, CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=True, dynamic_ncols=True,
                file=sys.stderr)


def train(model: nn.Module, data: DigitsData, epochs: int, lr: float, seed: int, device: torch.device,
          desc: str, progress: bool) -> float:
    """Adam with a one-cycle schedule, batches of :data:`BATCH_SIZE` in a seeded order; returns seconds."""
    if epochs <= 0:
        return 0.0
    start = time.perf_counter()
    x, y = data.x_train.to(device), data.y_train.to(device)
    n = len(y)
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with _progress(epochs * steps_per_epoch, desc, progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            total_loss = torch.zeros((), device=device)
            for i in range(0, n, BATCH_SIZE):
                batch = order[i:i + BATCH_SIZE]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.detach() * len(batch)
                bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total_loss.item() / n:.4f}")
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Class predictions of ``model`` in eval mode (on the CPU)."""
    model.eval()
    return model(x.to(device)).argmax(1).cpu()


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of ``pred`` equal to ``labels``."""
    return 100.0 * (pred == labels).double().mean().item()


@torch.no_grad()
def calibrate(qmodel: nn.Module, data: DigitsData, device: torch.device) -> None:
    """Estimate every quantizer's range on up to 8 batches of 64 training images, then fix them."""
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    x = data.x_train.to(device)
    for i in range(0, min(len(x), CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE), CALIBRATION_BATCH_SIZE):
        qmodel(x[i:i + CALIBRATION_BATCH_SIZE])
    tquant.fix_ranges(qmodel)
