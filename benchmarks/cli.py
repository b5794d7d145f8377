"""``tquant bench quantizer|qat|onnx|search|lm [--quick] ...``: run the benchmarks from the command line."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "quantizer": (
        "tquant.benchmarks.bench_quantizer",
        "per-tensor running-min/max fake quantizer vs torch's fused op",
    ),
    "qat": ("tquant.benchmarks.bench_qat", "QAT training step overhead over float: tquant vs torch.ao"),
    "onnx": ("tquant.benchmarks.bench_onnx", "onnxruntime latency: tquant int8 vs float vs quantize_static"),
    "search": ("tquant.benchmarks.bench_search", "MSE / cross-entropy range searches: tquant vs aihwkit"),
    "lm": ("tquant.benchmarks.bench_lm", "a small language model: W4 g128 RTN vs QAT vs float, in onnxruntime"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` and one sub-subcommand per benchmark script (options come from the script)."""
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and write its results",
        description=(
            "Run a tquant benchmark; results go to --out, else ./tquant-bench-results/<device>/ (a temporary "
            "folder with --quick). tquant's own tree (a checkout's committed benchmarks/results/) is written "
            "only when --out names it. A warning says when the machine was busy during the run."
        ),
    )
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(parser))
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        module.build_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen benchmark's ``main``; without one, list them."""
    if getattr(args, "bench", None) is None:
        print("tquant bench: choose one of " + ", ".join(BENCHES))
        for name, (_, help_text) in BENCHES.items():
            print(f"  {name:<10} {help_text}")
        return 2
    module = importlib.import_module(BENCHES[args.bench][0])
    return int(module.main(args) or 0)
