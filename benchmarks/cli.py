"""``tquant bench quantizer|qat|onnx|search|startup|lm [--quick] ...``: run the benchmarks from the command line.

Two stages: ``tquant bench`` knows the benchmarks by name, and their options (``options.py``, no torch:
``tquant bench BENCH --help`` imports no benchmark); the chosen one's module (with torch) is imported only
to run it.
"""

from __future__ import annotations

import argparse
import importlib
import textwrap

from . import options

BENCHES = {
    "quantizer": (
        "tquant.benchmarks.bench_quantizer",
        "per-tensor running-min/max fake quantizer vs torch's fused op",
    ),
    "qat": ("tquant.benchmarks.bench_qat", "QAT training step overhead over float: tquant vs torch.ao"),
    "onnx": ("tquant.benchmarks.bench_onnx", "onnxruntime latency: tquant int8 vs float vs quantize_static"),
    "search": ("tquant.benchmarks.bench_search", "MSE / cross-entropy range searches: tquant vs aihwkit"),
    "startup": ("tquant.benchmarks.bench_startup", "start-up and whole-job wall times, each in a fresh process"),
    "lm": ("tquant.benchmarks.bench_lm", "a small language model: W4 g128 RTN vs QAT vs float, in onnxruntime"),
}


def _listing() -> str:
    return "\n".join(f"  {name:<10} {help_text}" for name, (_, help_text) in BENCHES.items())


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench BENCH [options]``; the options are the chosen benchmark's (``tquant bench BENCH --help``)."""
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and write its results",
        description=textwrap.fill(
            "Run a tquant benchmark; results go to --out, else ./tquant-bench-results/<device>/ (a temporary "
            "folder with --quick). tquant's own tree (a checkout's committed benchmarks/results/) is written "
            "only when --out names it. A warning says when the machine was busy during the run. "
            "Options of a benchmark: tquant bench BENCH --help.", width=78
        ),
        epilog="benchmarks:\n" + _listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bench", nargs="?", choices=list(BENCHES), metavar="BENCH",
                        help="the benchmark to run: " + ", ".join(BENCHES))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the benchmark's options (see tquant bench BENCH --help)")
    parser.set_defaults(bench_parser_class=type(parser))
    return parser


def run(args: argparse.Namespace) -> int:
    """Parse the chosen benchmark's options and run its ``main``; without one, list them."""
    if getattr(args, "bench", None) is None:
        print("tquant bench: choose one of " + ", ".join(BENCHES) + "\n" + _listing())
        return 2
    module_name, help_text = BENCHES[args.bench]
    parser_class = getattr(args, "bench_parser_class", argparse.ArgumentParser)
    parser = options.PARSERS[args.bench](parser_class(prog=f"tquant bench {args.bench}", description=help_text))
    bench_args = parser.parse_args(args.bench_args)  # --help answers here, before the benchmark (and torch) loads
    return int(importlib.import_module(module_name).main(bench_args) or 0)
