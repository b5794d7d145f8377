"""``tquant demo``: the whole job end to end on real data, in one command.

1. loads scikit-learn's bundled handwritten digits (1797 8x8 images, no download) and splits
   off a stratified, seeded 25% test set;
2. trains a small float CNN (:class:`DigitsCNN`) and reports its test accuracy;
3. converts it twice with a :class:`~tquant.QuantizationMap` (:func:`quantization_map`) —
   8-bit per-channel weights and 8-bit activations (``W8A8``), and ``--bits``-bit weights with
   8-bit activations (``W4A8`` by default) — both with 8-bit quantization of the network input
   (the first layer's ``input_activation_qconfig_map`` entry) and of every other layer's input,
   float logits; calibrates each (``tquant.estimate_ranges`` on training batches; the accuracy
   after calibration is the post-training-quantization figure), then runs QAT (the default
   ``estimate_ranges_train`` state) and reports the test accuracy;
4. exports the float model and each quantized model to ONNX (:func:`tquant.export.export_onnx`),
   validates each file in onnxruntime (:func:`tquant.export.validate_onnx`), and measures the
   onnxruntime model's test accuracy, its agreement with the PyTorch model's predictions, the
   file size relative to the float file and the onnxruntime latency relative to the float model;
5. prints one summary table and writes ``summary.md``, ``summary.json``, ``summary.png`` and
   the ONNX files to ``--out`` (default ``./tquant-demo/``).

Deterministic for a given ``--seed`` on a given machine and device: the split, the weight
initialisation and the batch order are seeded, ``torch.use_deterministic_algorithms`` is on
(``warn_only``) and TF32 is off for the run; the process-wide torch settings it changes
(threads, determinism, TF32) are restored when it returns. On a CUDA device the quantizers run
as tquant's Triton kernels (``TQUANT_BACKEND=auto``); onnxruntime always runs on the CPU.

Bad input (an unknown option value, ``--device cuda`` without a CUDA device, an output folder
that cannot be created or written, a missing optional dependency) prints one line
``tquant demo: error: ...`` on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import tquant

DEFAULT_OUT = "tquant-demo"
DEFAULT_EPOCHS = 15
DEFAULT_QAT_EPOCHS = 4
DEFAULT_BITS = 4
LOW_BITS_CHOICES = (2, 3, 4, 5, 6, 7)
BATCH_SIZE = 32
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 64
FLOAT_LR = 3e-3
QAT_LR = 5e-4
TEST_FRACTION = 0.25
LATENCY_BATCH = 64

# The acceptance bars of the demo's default run (issue 5), recorded in summary.json as "checks".
FLOAT_ACC_MIN = 95.0
W8_MAX_DROP = 1.0
WLOW_MAX_DROP = 3.0
AGREEMENT_MIN = 99.5
INT8_SIZE_MAX = 0.35

REQUIRED_MODULES = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "rich": "rich",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
}


class DemoError(Exception):
    """Bad input to the demo (the message is the one line the CLI prints)."""


# --------------------------------------------------------------------------------------------
# command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in LOW_BITS_CHOICES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(map(str, LOW_BITS_CHOICES))}; "
            "the 8-bit row is always run)"
        )
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand and its options to the ``tquant`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="train, quantize (QAT), export to ONNX and compare, on the bundled digits data set",
        description=(
            "Train a small CNN on scikit-learn's bundled digits, quantize it with QAT (8-bit, and "
            "--bits-bit weights), export each model to ONNX, validate it in onnxruntime and compare "
            "accuracy, agreement, file size and latency in one table."
        ),
    )
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                        help=f"float training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--qat-epochs", type=_non_negative_int, default=DEFAULT_QAT_EPOCHS,
                        help="QAT epochs per quantized variant; 0 = calibration only "
                        f"(default {DEFAULT_QAT_EPOCHS})")
    parser.add_argument("--bits", type=_bits, default=DEFAULT_BITS, metavar="{2..7}",
                        help=f"weight bits of the low-bit variant (default {DEFAULT_BITS})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (default auto: cuda when available); "
                        "onnxruntime runs on the CPU")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of the split, the init and the batch order (default 0)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="output folder for the report, the PNG and the ONNX files "
                        f"(default ./{DEFAULT_OUT}/)")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="use at most N training and N test samples (a quick smoke run)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads for torch and onnxruntime (default 1: fastest for this tiny model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``tquant demo`` options; returns the exit status.

    0 on success; 2 with a one-line ``tquant demo: error: ...`` on stderr for bad input or a
    missing optional dependency; 1 with a one-line message if writing a result fails or the
    export/validation step fails; 130 on Ctrl-C.
    """
    try:
        config = DemoConfig(
            epochs=args.epochs, qat_epochs=args.qat_epochs, bits=args.bits, device=args.device,
            seed=args.seed, out=args.out, limit=args.limit, threads=args.threads,
            progress=not args.no_progress,
        )
        run_demo(config)
    except DemoError as err:
        print(f"tquant demo: error: {err}", file=sys.stderr)
        return 2
    except _StageError as err:
        print(f"tquant demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tquant demo: interrupted", file=sys.stderr)
        return 130
    return 0


class _StageError(Exception):
    """A step of the demo failed for a reason other than bad input (export, writing results)."""


# --------------------------------------------------------------------------------------------
# configuration and report


@dataclass
class DemoConfig:
    """The demo's options (the CLI's, with the same defaults)."""

    epochs: int = DEFAULT_EPOCHS
    qat_epochs: int = DEFAULT_QAT_EPOCHS
    bits: int = DEFAULT_BITS
    device: str = "auto"
    seed: int = 0
    out: str | os.PathLike = DEFAULT_OUT
    limit: int | None = None
    threads: int = 1
    progress: bool = True


@dataclass
class VariantResult:
    """One row of the summary: a model variant, measured in PyTorch and in onnxruntime.

    Accuracies and agreement are percentages of the test split; ``ptq_accuracy`` is the accuracy
    right after calibration (before QAT), ``None`` for the float model; ``onnx_agreement`` is
    the share of test samples whose onnxruntime prediction equals the PyTorch model's;
    ``size_ratio`` and ``latency_speedup`` are relative to the float model's ONNX file
    (speedup > 1: faster than float); latencies are onnxruntime medians in milliseconds for one
    sample and for a batch of :data:`LATENCY_BATCH` (see :func:`ort_latencies_ms`);
    ``validation`` summarises :func:`tquant.export.validate_onnx`'s report on the test split (see
    :func:`_validation_summary`; empty for the float model).
    """

    name: str
    weight_bits: int | None
    act_bits: int | None
    accuracy: float
    ptq_accuracy: float | None
    onnx_file: str
    onnx_bytes: int
    onnx_accuracy: float
    onnx_agreement: float
    size_ratio: float
    latency_ms_batch1: float
    latency_ms_batch: float
    latency_speedup: float
    train_seconds: float
    validation: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoReport:
    """Everything the demo measured (also written to ``summary.json``)."""

    config: dict[str, Any]
    environment: dict[str, Any]
    data: dict[str, Any]
    variants: list[VariantResult]
    checks: dict[str, bool]
    files: dict[str, str]
    seconds: float

    def variant(self, name: str) -> VariantResult:
        """The row called ``name`` (``"float"``, ``"W8A8 QAT"``, ``"W4A8 QAT"``...)."""
        for row in self.variants:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# data and model


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


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: three 3x3 convolutions with ReLU and max pooling, two linear layers.

    :attr:`LAYERS` are the state-dict names of its convolutions and linear layers, in order
    (``features.0`` takes the image); 62k parameters.
    """

    LAYERS = ("features.0", "features.2", "features.5", "classifier.1", "classifier.3")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def quantization_map(weight_bits: int, act_bits: int = 8, fold_activations: bool = True,
                     quantize_bias: bool | None = None) -> tquant.QuantizationMap:
    """The demo's :class:`~tquant.QuantizationMap` for :class:`DigitsCNN`.

    - every conv/linear layer: ``weight_bits`` symmetric per-channel weights and an ``act_bits``
      output quantizer (``default_qconfig`` + ``append_default_conversions``);
    - ``fold_activations`` (default): each ReLU is folded into the layer before it, so the output
      quantizer sits after the ReLU and each tensor is quantized once; only the image (the input
      of ``features.0``) gets an input quantizer. In ONNX every conv runs as one QLinearConv and
      every hidden linear as a QGemm, with no float ``DequantizeLinear → Relu → QuantizeLinear``
      between them (max-pool and flatten run on the uint8 tensor);
    - ``quantize_bias`` (default: as ``fold_activations``): conv/linear biases on the int32 grid of
      input scale x weight scale, as onnxruntime's integer kernels add them (the first linear
      after ``Flatten`` keeps a float bias: its input quantizer is in another Sequential);
    - without folding (aihwkit's default conversion): the input of every layer is quantized too
      (``input_activation_qconfig_map``), so each tensor is quantized twice (before and after
      the ReLU);
    - the last layer's output (the logits) stays float (``instance_qconfig_map``): an argmax over
      8-bit logits has ties, which a one-LSB difference between runtimes would break either way.
    """
    qmap = tquant.QuantizationMap(fold_activations=fold_activations,
                                  quantize_bias=fold_activations if quantize_bias is None else quantize_bias)
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(weight_bits, symmetric=True,
                                                                 per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(act_bits)
    for name in DigitsCNN.LAYERS[:1] if fold_activations else DigitsCNN.LAYERS:
        qmap.input_activation_qconfig_map[name] = tquant.ActivationQuantConfig(act_bits)
    float_logits = tquant.QuantizationConfig(
        tquant.ActivationQuantConfig(0), copy.deepcopy(qmap.default_qconfig.weight_quant)
    )
    qmap.instance_qconfig_map[DigitsCNN.LAYERS[-1]] = tquant.QuantizedModuleConfig(tquant.QuantLinear,
                                                                                   float_logits)
    tquant.append_default_conversions(qmap)
    return qmap


# --------------------------------------------------------------------------------------------
# training and evaluation


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


# --------------------------------------------------------------------------------------------
# onnxruntime


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


def _as_jsonable(obj: Any) -> Any:
    """A JSON-friendly view of a validation report (dataclass, dict or anything with ``__dict__``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _as_jsonable(obj.item())
    if hasattr(obj, "item") and getattr(obj, "size", 2) == 1:  # numpy scalars
        return _as_jsonable(obj.item())
    return str(obj)


def _validation_summary(report) -> dict[str, Any]:
    """``validate_onnx``'s report as JSON: ``min_match_share`` (smallest share of logits equal to float
    precision over the optimisation levels), ``max_abs`` (largest absolute logit difference),
    ``max_lsb`` (None: the demo's logits are not quantized), ``fused`` (integer nodes onnxruntime
    made) and the full ``report``.

    ``report.ok()`` is not used: with float logits it asks for bit-identical floats, which
    onnxruntime's reordered sums do not give; the demo's criterion is the agreement of predictions.
    """
    return {
        "min_match_share": float(report.min_match_share()),
        "max_abs": max((float(c.max_abs) for c in report.comparisons), default=0.0),
        "max_lsb": _as_jsonable(report.max_lsb()),
        "fused": _as_jsonable(report.fused),
        "report": _as_jsonable(report),
    }


# --------------------------------------------------------------------------------------------
# output folder and writers


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


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _rows(report: DemoReport) -> list[list[str]]:
    rows = []
    for v in report.variants:
        rows.append([
            v.name,
            "fp32" if v.weight_bits is None else f"int{v.weight_bits}/ch",
            "fp32" if v.act_bits is None else f"int{v.act_bits}",
            f"{v.accuracy:.2f}%",
            "-" if v.ptq_accuracy is None else f"{v.ptq_accuracy:.2f}%",
            f"{v.onnx_accuracy:.2f}%",
            f"{v.onnx_agreement:.2f}%",
            _fmt_bytes(v.onnx_bytes),
            f"{100 * v.size_ratio:.1f}%",
            f"{v.latency_ms_batch1:.3f}",
            f"{v.latency_ms_batch:.3f}",
            f"{v.latency_speedup:.2f}x",
        ])
    return rows


HEADERS = [
    ("model", ""), ("weights", ""), ("acts", ""), ("PyTorch", "acc"), ("after", "calib."), ("ORT", "acc"),
    ("ORT =", "PyTorch"), ("ONNX", "size"), ("vs", "float"), ("ORT ms", "batch 1"),
    ("ORT ms", f"batch {LATENCY_BATCH}"), ("speed vs", "float"),
]
"""Column headers (two lines in the terminal table, joined with a space in the markdown table)."""


def _markdown(report: DemoReport) -> str:
    cfg, data, env = report.config, report.data, report.environment
    lines = [
        "# tquant demo",
        "",
        f"Digits (scikit-learn, 8x8): {data['train']} training / {data['test']} test images, "
        f"seed {cfg['seed']}; "
        f"float {cfg['epochs']} epochs, QAT {cfg['qat_epochs']} epochs; device {env['device']}, "
        f"{cfg['threads']} thread(s); {report.seconds:.0f} s.",
        "",
        "| " + " | ".join(" ".join(h).strip() for h in HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += [
        "",
        "*after calib.*: accuracy after calibration, before QAT (post-training quantization). "
        "*ORT = PyTorch*: test samples on which onnxruntime predicts the PyTorch model's class. "
        f"Latency: onnxruntime (CPU, {cfg['threads']} thread(s), all graph optimisations) for 1 and "
        f"{LATENCY_BATCH} images, best of interleaved rounds of medians (speed vs float: batch figure).",
        "",
        "Checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in report.checks.items()),
        "",
        "## onnxruntime vs PyTorch (`tquant.export.validate_onnx`, test split + example batch)",
        "",
        "| model | ORT optimisation | logits equal | max abs diff of logits | integer nodes fused by ORT |",
        "|---|---|---|---|---|",
    ]
    for v in report.variants:
        if not v.validation:
            continue
        fused = ", ".join(f"{k} x{n}" for k, n in sorted(v.validation.get("fused", {}).items())) or "none"
        for c in v.validation.get("report", {}).get("comparisons", []):
            lines.append(f"| {v.name} | {c['level']} | {100 * c['match_share']:.2f}% | {c['max_abs']:.3g} | "
                         f"{fused if c['level'] != 'disabled' else '-'} |")
    lines.append("")
    return "\n".join(lines)


def _plot(report: DemoReport, path: Path) -> None:
    from matplotlib.figure import Figure

    names = [v.name for v in report.variants]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_acc, ax_size, ax_lat = fig.subplots(1, 3)
    xs = range(len(names))
    width = 0.38
    ax_acc.bar([i - width / 2 for i in xs], [v.accuracy for v in report.variants], width,
               label="PyTorch")
    ax_acc.bar([i + width / 2 for i in xs], [v.onnx_accuracy for v in report.variants], width,
               label="onnxruntime")
    low = min(min(v.accuracy, v.onnx_accuracy) for v in report.variants)
    ax_acc.set_ylim(max(0.0, low - 5.0), 100.0)
    ax_acc.set_title("test accuracy (%)")
    for container in ax_acc.containers:
        ax_acc.bar_label(container, fmt="%.1f", fontsize=8, padding=-12, color="white")
    ax_acc.legend(loc="lower left", fontsize=8, framealpha=0.9)
    sizes = [v.onnx_bytes / 1024 for v in report.variants]
    bars = ax_size.bar(list(xs), sizes, color="tab:green")
    ax_size.bar_label(bars, labels=[f"{100 * v.size_ratio:.0f}%" for v in report.variants])
    ax_size.set_title("ONNX file (KiB)")
    ax_lat.bar(list(xs), [v.latency_ms_batch for v in report.variants], color="tab:purple")
    ax_lat.set_title(f"onnxruntime latency, batch {LATENCY_BATCH} (ms)")
    for ax in (ax_acc, ax_size, ax_lat):
        ax.set_xticks(list(xs), names)
    fig.suptitle(f"tquant demo — digits, seed {report.config['seed']}")
    fig.savefig(path, dpi=110)


def _print_table(report: DemoReport, console) -> None:
    from rich.table import Table

    table = Table(title="tquant demo: digits, float vs QAT, PyTorch vs onnxruntime", title_style="bold")
    for i, header in enumerate(HEADERS):
        table.add_column("\n".join(header), justify="left" if i < 3 else "right")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)


# --------------------------------------------------------------------------------------------
# the demo


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
    console.print(f"QuantizationMap: per-channel int8 | int{config.bits} weights, int8 inputs and outputs "
                  "of every conv/linear, float logits")
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


__all__ = [
    "DemoConfig",
    "DemoError",
    "DemoReport",
    "DigitsCNN",
    "VariantResult",
    "accuracy",
    "add_parser",
    "calibrate",
    "load_digits_split",
    "quantization_map",
    "run",
    "run_demo",
    "train",
]
