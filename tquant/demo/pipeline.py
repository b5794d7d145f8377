"""The demo end to end (:func:`run_demo`): train, quantize, export, validate, measure, report."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tquant

from .data import load_digits_split
from .model import DigitsCNN, quantization_map
from .report import DemoReport, VariantResult, _fmt_bytes, _markdown, _plot, _print_table, _validation_summary
from .runtime import _session, ort_latencies_ms, ort_predict
from .settings import (
    AGREEMENT_MIN,
    BATCH_SIZE,
    FLOAT_ACC_MIN,
    FLOAT_LR,
    INT8_SIZE_MAX,
    LATENCY_BATCH,
    LOW_BITS_CHOICES,
    QAT_LR,
    REQUIRED_MODULES,
    TEST_FRACTION,
    W8_MAX_DROP,
    WLOW_MAX_DROP,
    DemoConfig,
    DemoError,
    _StageError,
)
from .training import accuracy, calibrate, predict, train


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (with parents) and check that a file can be written in it.

    Raises :class:`DemoError` with a one-line reason when it cannot.
    """
    path = Path(out).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise DemoError(f"output folder '{out}' is an existing file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tquant-demo-", suffix=".probe"):
            pass
    except DemoError:
        raise
    except OSError as err:
        reason = err.strerror or str(err)
        raise DemoError(f"cannot write to output folder '{out}': {reason}") from None
    return path

def _check_config(config: DemoConfig) -> None:
    """The CLI's value checks, for callers that build a :class:`DemoConfig` themselves."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    c = config
    bits = ", ".join(map(str, LOW_BITS_CHOICES))
    problems = [
        (is_int(c.epochs) and c.epochs >= 1, f"--epochs must be an integer >= 1, got {c.epochs!r}"),
        (is_int(c.qat_epochs) and c.qat_epochs >= 0,
         f"--qat-epochs must be an integer >= 0, got {c.qat_epochs!r}"),
        (c.bits in LOW_BITS_CHOICES, f"--bits must be one of {bits}, got {c.bits!r}"),
        (c.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {c.device!r}"),
        (is_int(c.seed) and 0 <= c.seed < 2**32, f"--seed must be in [0, 2**32), got {c.seed!r}"),
        (c.limit is None or (is_int(c.limit) and c.limit >= 1),
         f"--limit must be an integer >= 1, got {c.limit!r}"),
        (is_int(c.threads) and c.threads >= 1, f"--threads must be an integer >= 1, got {c.threads!r}"),
    ]
    for ok, message in problems:
        if not ok:
            raise DemoError(message)


def _check_dependencies() -> None:
    import importlib.util

    missing = [pkg for mod, pkg in REQUIRED_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise DemoError(f"missing dependencies: {', '.join(missing)}; pip install 'tquant[dev]'")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


@contextlib.contextmanager
def _torch_settings(threads: int, device: torch.device):
    """Threads, determinism and TF32 for the run; the previous values are restored on exit."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cuda.matmul.allow_tf32 = saved[3]
        torch.backends.cudnn.allow_tf32 = saved[4]


@contextlib.contextmanager
def _quiet_exporter_logs():
    """Silence ``torch.onnx``'s info/warning log lines (e.g. "torchvision is not installed") meanwhile."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stage(step: str, what: str, call: Callable[[], Any]) -> Any:
    """Run one export/validation/writing call; its failure becomes a one-line :class:`_StageError`."""
    try:
        return call()
    except (DemoError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - reported as one line naming the step
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _StageError(f"{step} failed for {what}: {type(err).__name__}: {message}") from err


def run_demo(config: DemoConfig, console=None) -> DemoReport:
    """Run the demo as configured, print the summary table and write the output folder.

    Returns the :class:`DemoReport`. Raises :class:`DemoError` for bad input (unknown device,
    unwritable output folder, missing dependency) before any training starts.
    """
    _check_config(config)
    _check_dependencies()
    device = _resolve_device(config.device)
    out = prepare_out_dir(config.out)

    from rich.console import Console

    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    with _torch_settings(config.threads, device):
        report = _run(config, device, out, console, started)
    _print_table(report, console)
    console.print(report.checks_line(), markup=False, style="bold red" if report.failed_checks else None)
    for name in ("markdown", "json", "png"):
        console.print(f"wrote {out / report.files[name]}")
    console.print(f"ONNX files in {out}/: " + ", ".join(v.onnx_file for v in report.variants))
    return report


def _run(config: DemoConfig, device: torch.device, out: Path, console, started: float) -> DemoReport:
    import onnxruntime

    from tquant import export as tq_export

    torch.manual_seed(config.seed)
    data = load_digits_split(config.seed, config.limit)
    console.print(
        f"[bold]tquant demo[/bold]: digits {len(data.y_train)} train / {len(data.y_test)} test, device "
        f"{device.type}, backend {tquant.kernels.get_backend()}, seed {config.seed}"
    )

    # 1. float model
    torch.manual_seed(config.seed)
    float_model = DigitsCNN().to(device)
    float_seconds = train(float_model, data, config.epochs, FLOAT_LR, config.seed, device,
                          "float training", config.progress)
    float_pred = predict(float_model, data.x_test, device)
    float_acc = accuracy(float_pred, data.y_test)
    console.print(f"float CNN: test accuracy {float_acc:.2f}% ({float_seconds:.1f} s)")

    # 2. quantized variants: convert, calibrate, QAT
    variants = [("W8A8 QAT", 8), (f"W{config.bits}A8 QAT", config.bits)]
    console.print(f"QuantizationMap: per-channel int8 | int{config.bits} weights, int8 image input, ReLUs folded "
                  "into the layers (int8 outputs after them: one quantization per tensor), int32 biases, "
                  "float logits")
    trained: list[tuple[str, int, nn.Module, float, float, torch.Tensor, float]] = []
    for name, wbits in variants:
        qmodel = tquant.convert_to_quantized(float_model, quantization_map(wbits))
        calibrate(qmodel, data, device)
        ptq_acc = accuracy(predict(qmodel, data.x_test, device), data.y_test)
        tquant.estimate_ranges_train(qmodel)
        seconds = train(qmodel, data, config.qat_epochs, QAT_LR, config.seed + wbits, device,
                        f"QAT {name.split()[0]}", config.progress)
        tquant.fix_ranges(qmodel)
        pred = predict(qmodel, data.x_test, device)
        acc = accuracy(pred, data.y_test)
        console.print(f"{name}: after calibration {ptq_acc:.2f}%, after {config.qat_epochs} QAT epoch(s) "
                      f"{acc:.2f}% ({seconds:.1f} s)")
        trained.append((name, wbits, qmodel, ptq_acc, acc, pred, seconds))

    # 3. ONNX export, validation in onnxruntime, accuracy / agreement / size / latency
    example = data.x_test[:LATENCY_BATCH].cpu()
    x_test = data.x_test.cpu()
    models = [("float", None, None, float_model, float_acc, None, float_pred, float_seconds)]
    models += [(n, wb, 8, m, acc, ptq, pred, s) for n, wb, m, ptq, acc, pred, s in trained]
    results: list[VariantResult] = []
    sessions = []
    for name, wbits, abits, model, acc, ptq_acc, pred, seconds in models:
        file_name = "float.onnx" if wbits is None else f"w{wbits}a{abits}_qat.onnx"
        path = out / file_name
        cpu_model = copy.deepcopy(model).cpu().eval()
        with _quiet_exporter_logs():
            _stage("tquant.export.export_onnx", name,
                   lambda m=cpu_model, p=path: tq_export.export_onnx(m, example, p))
        validation = {} if wbits is None else _stage(
            "tquant.export.validate_onnx", name,
            lambda m=cpu_model, p=path: _validation_summary(
                tq_export.validate_onnx(m, example, p, inputs=[x_test])),
        )
        session = _stage("onnxruntime.InferenceSession", name, lambda p=path: _session(p, config.threads))
        sessions.append(session)
        ort_pred = ort_predict(session, x_test)
        size = path.stat().st_size
        row = VariantResult(
            name=name, weight_bits=wbits, act_bits=abits, accuracy=acc, ptq_accuracy=ptq_acc,
            onnx_file=file_name, onnx_bytes=size, onnx_accuracy=accuracy(ort_pred, data.y_test),
            onnx_agreement=accuracy(ort_pred, pred),
            size_ratio=size / (results[0].onnx_bytes if results else size),
            latency_ms_batch1=math.nan, latency_ms_batch=math.nan, latency_speedup=math.nan,
            train_seconds=seconds, validation=validation,
        )
        results.append(row)
        console.print(f"{name}: exported {file_name} ({_fmt_bytes(size)}), onnxruntime accuracy "
                      f"{row.onnx_accuracy:.2f}%, agrees with PyTorch on {row.onnx_agreement:.2f}%")
    # latencies last, all sessions interleaved (fair on a busy machine)
    for row, ms1, ms_batch in zip(results, ort_latencies_ms(sessions, example[:1]),
                                  ort_latencies_ms(sessions, example)):
        row.latency_ms_batch1, row.latency_ms_batch = ms1, ms_batch
        row.latency_speedup = results[0].latency_ms_batch / ms_batch if row is not results[0] else 1.0
    del sessions

    fp, w8, wlow = results
    agreement = min(w8.onnx_agreement, wlow.onnx_agreement)
    checks = {
        f"float accuracy >= {FLOAT_ACC_MIN:g}%": fp.accuracy >= FLOAT_ACC_MIN,
        f"W8A8 QAT within {W8_MAX_DROP:g} point of float": w8.accuracy >= fp.accuracy - W8_MAX_DROP,
        f"{wlow.name} within {WLOW_MAX_DROP:g} points of float": wlow.accuracy >= fp.accuracy - WLOW_MAX_DROP,
        f"onnxruntime agrees with PyTorch QAT on >= {AGREEMENT_MIN:g}%": agreement >= AGREEMENT_MIN,
        f"int8 file < {100 * INT8_SIZE_MAX:g}% of float": w8.size_ratio < INT8_SIZE_MAX,
        "W8A8 ONNX faster than float (batch)": w8.latency_speedup > 1.0,
    }
    report = DemoReport(
        config={"epochs": config.epochs, "qat_epochs": config.qat_epochs, "bits": config.bits,
                "device": config.device, "seed": config.seed, "out": str(out), "limit": config.limit,
                "threads": config.threads, "batch_size": BATCH_SIZE, "float_lr": FLOAT_LR, "qat_lr": QAT_LR},
        environment={"tquant": tquant.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                     "device": device.type, "backend": tquant.kernels.get_backend(),
                     "cpu_count": os.cpu_count()},
        data={"dataset": "sklearn.datasets.load_digits", "train": len(data.y_train), "test": len(data.y_test),
              "test_fraction": TEST_FRACTION},
        variants=results,
        checks=checks,
        files={"markdown": "summary.md", "json": "summary.json", "png": "summary.png",
               **{v.name: v.onnx_file for v in results}},
        seconds=0.0,
    )
    report.seconds = time.perf_counter() - started
    _stage("writing", str(out / "summary.md"), lambda: (out / "summary.md").write_text(_markdown(report)))
    _stage("writing", str(out / "summary.json"),
           lambda: (out / "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    _stage("writing", str(out / "summary.png"), lambda: _plot(report, out / "summary.png"))
    return report
