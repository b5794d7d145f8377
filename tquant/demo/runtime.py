"""onnxruntime: sessions, predictions and interleaved latencies."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: torch.Tensor) -> torch.Tensor:
    """Class predictions of an onnxruntime session on ``x`` (CPU, float32)."""
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x.cpu().numpy()})[0]
    return torch.from_numpy(logits).argmax(1)


def ort_latencies_ms(sessions: list, x: torch.Tensor, rounds: int = 7, runs: int = 15) -> list[float]:
    """onnxruntime latency of each session on ``x``, in ms, measured interleaved.

    After a few warm-up runs, each round times ``runs`` calls of every session in turn and keeps
    their median; a session's figure is the smallest of its round medians. Interleaving and the
    minimum keep a busy machine (another process taking the CPU for a while) from favouring one
    session over another.
    """
    feeds = [{s.get_inputs()[0].name: x.cpu().numpy()} for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(5):
            session.run(None, feed)
    best = [math.inf] * len(sessions)
    for _ in range(rounds):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t0)
            times.sort()
            best[i] = min(best[i], 1e3 * times[len(times) // 2])
    return best
