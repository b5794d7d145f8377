"""The data: scikit-learn's bundled digits, split and scaled (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import TEST_FRACTION


@dataclass
class DigitsData:
    """The digits split: images ``[N, 1, 8, 8]`` scaled to [0, 1], labels ``[N]`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int, limit: int | None = None) -> DigitsData:
    """scikit-learn's bundled digits, split 75/25 stratified by class with ``random_state=seed``.

    Pixel values 0..16 are scaled to [0, 1]. ``limit`` keeps the first ``limit`` samples of each
    (already shuffled) split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=TEST_FRACTION, stratify=digits.target, random_state=seed
    )
    if limit is not None:
        train_idx, test_idx = train_idx[:limit], test_idx[:limit]
    return DigitsData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])
