"""``tquant demo``'s command line: option parsing and the exit statuses."""

from __future__ import annotations

import argparse
import sys

from .settings import (
    DEFAULT_BITS,
    DEFAULT_EPOCHS,
    DEFAULT_OUT,
    DEFAULT_QAT_EPOCHS,
    LOW_BITS_CHOICES,
    DemoConfig,
    DemoError,
    _StageError,
)


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
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a check fails (accuracy, agreement, size, speed; "
                        "the failed checks are printed either way)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``tquant demo`` options; returns the exit status.

    0 on success; 2 with a one-line ``tquant demo: error: ...`` on stderr for bad input or a
    missing optional dependency; 1 with a one-line message if writing a result fails or the
    export/validation step fails, or with ``--strict`` when a check failed; 130 on Ctrl-C.
    """
    from .pipeline import run_demo  # torch, sklearn, onnxruntime: only when the demo runs

    try:
        config = DemoConfig(
            epochs=args.epochs, qat_epochs=args.qat_epochs, bits=args.bits, device=args.device,
            seed=args.seed, out=args.out, limit=args.limit, threads=args.threads,
            progress=not args.no_progress,
        )
        report = run_demo(config)
    except DemoError as err:
        print(f"tquant demo: error: {err}", file=sys.stderr)
        return 2
    except _StageError as err:
        print(f"tquant demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tquant demo: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "strict", False) and report.failed_checks:
        print(f"tquant demo: error: {report.checks_line()} (--strict)", file=sys.stderr)
        return 1
    return 0
