"""The one place that answers "can we use Triton here?".

Importing this module never touches a GPU driver and never fails: on a machine without
Triton (macOS, Windows, CPU-only installs) ``HAS_TRITON`` is False and tquant runs its torch
path. ``INTERPRET`` mirrors ``TRITON_INTERPRET=1``, which Triton reads when ``@triton.jit``
decorates a kernel, so it must be set before the kernel modules are imported.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the machine
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["HAS_TRITON", "INTERPRET", "triton", "tl"]
