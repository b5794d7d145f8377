"""What the demo measured (:class:`VariantResult`, :class:`DemoReport`) and how it is written: the
terminal table, ``summary.md``, ``summary.png``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .settings import LATENCY_BATCH


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

    @property
    def failed_checks(self) -> list[str]:
        """The names of the checks that failed (empty when every check passed)."""
        return [name for name, ok in self.checks.items() if not ok]

    def checks_line(self) -> str:
        """``checks: all 6 ok`` or ``checks: 2 of 6 FAILED: <names>`` (printed after the table)."""
        failed = self.failed_checks
        if not failed:
            return f"checks: all {len(self.checks)} ok"
        return f"checks: {len(failed)} of {len(self.checks)} FAILED: " + "; ".join(failed)

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
    ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)  # below the bars
    sizes = [v.onnx_bytes / 1024 for v in report.variants]
    bars = ax_size.bar(list(xs), sizes, color="tab:green")
    ax_size.bar_label(bars, labels=[f"{100 * v.size_ratio:.0f}%" for v in report.variants])
    ax_size.margins(y=0.12)  # room for the labels above the bars
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
