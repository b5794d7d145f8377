"""Backend selection: one dispatch point for every quantizer op.

``TQUANT_BACKEND`` (read at import, changeable with :func:`set_backend` or the
:func:`use_backend` context manager) picks how the ops in ``tquant.kernels`` run:

- ``auto`` (default): Triton kernels for CUDA tensors when Triton imports, else the torch path;
- ``torch``: vectorised native torch ops on any device (bit-identical to the reference);
- ``triton``: the Triton kernels on every tensor; CPU tensors need ``TRITON_INTERPRET=1``
  set before tquant is imported (the interpreter runs numpy: small tensors only);
- ``reference``: the readable eager reference (slow; for debugging and tests).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ._triton import HAS_TRITON, INTERPRET

BACKENDS = ("auto", "torch", "triton", "reference")


def _check(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"TQUANT_BACKEND: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_backend = _check(os.environ.get("TQUANT_BACKEND", "auto") or "auto")


def get_backend() -> str:
    """The backend name currently in force (one of :data:`BACKENDS`)."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for all later quantizer calls (see the module docstring)."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(x: torch.Tensor) -> str:
    """Which implementation runs for tensor ``x``: ``"triton"``, ``"torch"`` or ``"reference"``."""
    backend = _backend
    if backend == "auto":
        return "triton" if (HAS_TRITON and x.is_cuda) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("TQUANT_BACKEND=triton: Triton is not importable; pip install 'tquant[triton]'")
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError(
                "TQUANT_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 set before tquant is imported"
            )
    return backend
