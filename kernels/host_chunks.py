"""Large per-tensor CPU passes on threads that take chunks as they go: robust on a busy machine.

torch's intra-op parallelism splits each op evenly between its threads and waits for the slowest
at the end of the op. When another process competes for a core, the thread that shares it finishes
last every time, and a pass made of many ops (the cache-blocked fake quantization: a few ops per
block) waits once per op: measured 2-6x slower than torch's one fused op on a 2-core machine with
one competing process. Here ``torch.get_num_threads()`` threads (the caller and pool workers) each
take the next chunk of the tensor when done with the last and run the whole pass on it with
numpy, which runs single-threaded and releases the GIL: a slowed thread does fewer chunks, and the
others wait for it once, at the end of the call.

Numerics are the host lane's (:func:`~tquant.kernels.fake_quant.host_codes` and
:func:`~tquant.kernels.fake_quant.host_values`, spelled out on preallocated per-thread scratch):
the reference's bits. The pool is made on first use and again in a forked child (whose copy of a
parent's pool has no threads).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["CHUNK", "chunked_minmax", "chunked_fake_quant", "run_chunks"]

CHUNK = 1 << 17
"""Elements per chunk: x, the codes, y and the mask of a chunk (about 2 MB for fp32) stay in a core's L2
across the pass, and the Python per chunk (a few microseconds) stays small beside its arithmetic."""

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None
_scratch = threading.local()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)
    if _pool_key != key:
        if _pool is not None and _pool_key[0] == key[0]:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="tquant-chunks")
        _pool_key = key
    return _pool


def run_chunks(n: int, fn) -> None:
    """Call ``fn(start, stop)`` on every :data:`CHUNK` of ``range(n)``, on up to ``torch.get_num_threads()``
    threads that each take the next chunk when done (the calling thread is one of them). Re-raises a
    chunk's error."""
    chunk = CHUNK
    threads = min(torch.get_num_threads(), math.ceil(n / chunk))
    starts = iter(range(0, n, chunk))  # next() on it is atomic under the GIL: each chunk goes to one thread

    def work() -> None:
        for start in starts:
            fn(start, min(start + chunk, n))

    if threads <= 1:
        work()
        return
    futures = [_executor(threads - 1).submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()


def chunked_minmax(xn: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(min, max)`` of a 1-D float array (NaN when it holds one, as numpy's are), as float32 scalars."""
    parts: list[tuple] = []
    run_chunks(xn.size, lambda a, b: parts.append((xn[a:b].min(), xn[a:b].max())))
    return np.float32(min(p[0] for p in parts)), np.float32(max(p[1] for p in parts))


def _buffers(n: int) -> tuple[np.ndarray, np.ndarray]:
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None or buffers[0].size < n:
        buffers = _scratch.buffers = (np.empty(n, np.float32), np.empty(n, np.float32))
    return buffers[0][:n], buffers[1][:n]


def chunked_fake_quant(xn: np.ndarray, consts, yn: np.ndarray, maskn: np.ndarray | None) -> None:
    """``yn = scale * (clamp(rint(xn / scale) + zp, qmin, qmax) - zp)`` and ``maskn`` = in range (NaN: False),
    chunk by chunk; 1-D arrays of one size (``xn``/``yn`` float32 or float16, ``maskn`` bool or None).
    ``consts``: :func:`~tquant.kernels.host_math.fake_quant_consts`' ``(scale, zp, qmin, qmax)``.

    Computed as ``scale * clip(rint(x / scale) + 0.0, qmin - zp, qmax - zp)``: the same integers (codes and
    ``zp`` are exact in float32), one pass less each side; ``+ 0.0`` makes rint's -0.0 the +0.0 that the
    reference's ``+ zp - zp`` gives."""
    scale, zp, qmin, qmax = consts
    lo, hi = qmin - zp, qmax - zp

    def one(a: int, b: int) -> None:
        r, c = _buffers(b - a)
        np.divide(xn[a:b], scale, out=r, dtype=np.float32)
        np.rint(r, out=r)
        np.add(r, 0.0, out=r)
        np.clip(r, lo, hi, out=c)  # NaN stays NaN
        if maskn is not None:
            np.equal(c, r, out=maskn[a:b])
        np.multiply(c, scale, out=yn[a:b], casting="same_kind")

    run_chunks(xn.size, one)
