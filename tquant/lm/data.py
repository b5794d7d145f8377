"""A byte-level corpus every machine has: the Python standard library's own source files.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites, ``site-packages`` and
``dist-packages`` left out), sorted by their path below that folder; every ``VAL_EVERY``-th file
is validation, the others training. Each split is the files' bytes joined by a newline, as a
``uint8`` tensor (a token is a byte, 256 of them). Nothing is downloaded; the corpus is the same
on every machine with the same Python version (it differs between versions: results say which).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_EVERY = 20
"""Every 20th file (5 %) is validation."""
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class ByteCorpus:
    """Training and validation bytes (``uint8`` tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    files: int
    digest: str
    """sha256 of both splits (first 12 hex digits): names the corpus in caches and results."""

    def describe(self) -> str:
        return (f"{self.files} .py files of the Python {sys.version_info.major}.{sys.version_info.minor} standard "
                f"library ({self.source}): {len(self.train) / 1e6:.2f} MB training, {len(self.val) / 1e6:.2f} MB "
                f"validation, bytes as tokens")


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The corpus files under ``root`` (default: the running Python's standard library), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_train_bytes: int | None = None, max_val_bytes: int | None = None,
                root: Path | None = None) -> ByteCorpus:
    """Read the corpus; ``max_*_bytes`` keep the first bytes of each split (a smaller run)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root)
    if len(files) < VAL_EVERY:
        raise FileNotFoundError(f"tquant.lm: found {len(files)} Python files under {root}; the corpus needs the "
                                "standard library's sources")
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for i, path in enumerate(files):
        parts[i % VAL_EVERY == VAL_EVERY - 1].append(path.read_bytes())
    train, val = (b"\n".join(p) for p in parts)
    train, val = train[:max_train_bytes], val[:max_val_bytes]
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()[:12]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return ByteCorpus(as_tensor(train), as_tensor(val), str(root), len(files), digest)


def random_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length + 1`` consecutive tokens at random offsets: int64 ``[batch, length + 1]``."""
    if len(data) < length + 1:
        raise ValueError(f"tquant.lm: {len(data)} tokens are fewer than one window of {length + 1}")
    starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
    return torch.stack([data[s:s + length + 1] for s in starts.tolist()]).long()


def eval_windows(data: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    """The first ``count`` (default: all) non-overlapping windows of ``length + 1`` tokens: int64
    ``[count, length + 1]`` — the fixed validation set (each window's last token starts the next)."""
    n = (len(data) - 1) // length
    if count is not None:
        n = min(n, count)
    if n < 1:
        raise ValueError(f"tquant.lm: {len(data)} tokens are fewer than one window of {length + 1}")
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)[None, :]
    return data[idx].long()
