"""The benchmarks' command-line options, importable without torch: ``tquant bench BENCH --help``
answers without loading the benchmark (each ``<bench>`` function adds one benchmark's options to a
parser and returns it; the benchmark modules' ``build_parser`` and ``tquant bench`` both call it).

The names the options offer (providers, models, subjects, jobs) live here too, as the one list the
benchmarks run over.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

RESULTS_ROOT = Path("tquant-bench-results")
"""Where results go without ``--out``: ``./tquant-bench-results/<device>/``, relative to the
working directory of the run (never the committed ``benchmarks/results/``, never site-packages)."""

QUANTIZER_MODES = ("forward", "backward", "full")
QUANTIZER_PROVIDERS = ("tquant-torch", "tquant-triton", "torch-fused-op", "torch.ao-module", "compile-ref",
                       "aihwkit-ref")
QAT_MODELS = ("mlp", "cnn", "resnet50", "encoder")
FAMILIES = ("resnet", "mobilenet", "vgg", "mlp", "transformer")
"""The model families of ``benchmarks/families.py`` (its ``FAMILIES`` has these keys, in this order)."""
ONNX_SUBJECTS = ("digits", "encoder", *FAMILIES)
DIGITS_SEEDS = 5
"""Seeds the ``bench onnx`` digits accuracy is averaged over (``--seeds``; 1 with ``--quick``)."""
SEARCH_CASES = ("grid-sym", "grid-asym", "golden-sym", "golden-asym", "ce-grid-sym")
SEARCH_PROVIDERS = ("tquant", "aihwkit", "aihwkit-algo")
STARTUP_CLI_JOBS = {
    "cli:--version": ["--version"],
    "cli:--help": ["--help"],
    "cli:demo --help": ["demo", "--help"],
    "cli:inspect --help": ["inspect", "--help"],
    "cli:bench --help": ["bench", "--help"],
    "cli:bench quantizer --help": ["bench", "quantizer", "--help"],
    "cli:selfcheck --help": ["selfcheck", "--help"],
}
"""``bench startup``'s ``tquant`` command jobs: name -> arguments."""
STARTUP_PY_JOBS = ("first-forward", "calibrate-mlp", "train-mlp", "train-cnn")
STARTUP_JOBS = [*STARTUP_CLI_JOBS, *STARTUP_PY_JOBS, "demo"]
STARTUP_QUICK_JOBS = ["cli:--version", "cli:--help", "first-forward"]
LM_DEFAULTS = {"float_steps": 1000, "qat_steps": 60, "qat_lr": 3e-4, "group_size": 128}
"""The defaults of ``bench lm``'s full run that its options override."""


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--out``, ``--reps``, ``--warmup``, ``--no-plot`` and ``--threads``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default: ./{RESULTS_ROOT}/<device>/; a temporary one with --quick); "
        "the only way to write into tquant's own tree, e.g. the committed benchmarks/results/<device>/",
    )
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per provider (default: the benchmark's, by size; few with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per provider first (default: the benchmark's; fewer with --quick)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's, all usable cores)")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_env(text: str) -> dict[str, str]:
    """``"A=1,B=2"`` -> ``{"A": "1", "B": "2"}`` (an argparse type)."""
    pairs = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {text!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def quantizer(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="log2 of the sizes (default 10 16 18 20 22 24)"
    )
    parser.add_argument("--modes", nargs="+", choices=QUANTIZER_MODES, default=list(QUANTIZER_MODES),
                        help="forward (range update + fake quant), backward, full (default: all three)")
    parser.add_argument("--providers", nargs="+", choices=QUANTIZER_PROVIDERS, default=None,
                        help="default: all that run here (tquant-triton on CUDA only)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--busy", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="time with N competing busy processes, started and stopped by the benchmark "
                        "(default 0; --busy alone: 1); results go to quantizer-busy.*")
    parser.add_argument("--host", action="store_true",
                        help="measure the host cost per call of each lane instead (2^10 elements; the Triton lane "
                             "with its launches stubbed on a CPU): quantizer_host.{csv,json,md}")
    return parser


def qat(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    parser.add_argument("--models", nargs="+", choices=QAT_MODELS, default=None,
                        help="default: mlp cnn on the CPU, resnet50 encoder on CUDA")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    return parser


def onnx(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    parser.add_argument("--subjects", nargs="+", choices=ONNX_SUBJECTS, default=list(ONNX_SUBJECTS),
                        help="models to deploy (default: " + " ".join(ONNX_SUBJECTS) + ")")
    parser.add_argument("--epochs", type=int, default=None, help="float training epochs (digits; default 15)")
    parser.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (digits; default 4, as the demo)")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help=f"digits: average the accuracy over seeds 0..N-1, each a whole run "
                             f"(default {DIGITS_SEEDS}; 1 with --quick)")
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows of --subjects in the results folder's onnx.json/onnx.md and "
                             "keep the other subjects' rows (from the runs that measured them)")
    return parser


def search(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    parser.add_argument("--cases", nargs="+", choices=SEARCH_CASES, default=None, help="default: all")
    parser.add_argument("--providers", nargs="+", choices=SEARCH_PROVIDERS, default=None,
                        help="default: all that run here (aihwkit's when it imports)")
    parser.add_argument("--num-candidates", type=int, default=None, help="grid size (default 100; 20 with --quick)")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                        help="default: cpu, and cuda when available")
    return parser


def startup(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    parser.add_argument("--jobs", nargs="+", choices=STARTUP_JOBS, default=None, metavar="JOB",
                        help="jobs to time (default: all; --quick: " + ", ".join(STARTUP_QUICK_JOBS) + "); one of: "
                        + ", ".join(STARTUP_JOBS))
    parser.add_argument("--env", type=parse_env, action="append", default=None, metavar="NAME=VALUE[,...]",
                        help="a configuration: environment variables for the job processes (repeat to compare "
                        "several; default: the environment as it is)")
    parser.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    return parser


def lm(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(parser)
    d = LM_DEFAULTS
    parser.add_argument("--float-steps", type=int, default=None, help=f"float training steps ({d['float_steps']})")
    parser.add_argument("--qat-steps", type=int, default=None, help=f"QAT steps ({d['qat_steps']})")
    parser.add_argument("--qat-lr", type=float, default=None, help=f"QAT peak learning rate ({d['qat_lr']})")
    parser.add_argument("--group-size", type=int, default=None, help=f"input features per scale ({d['group_size']})")
    parser.add_argument("--seed", type=int, default=None, help="seed of the initialisation and the batches (0)")
    parser.add_argument("--cache", type=Path, default=RESULTS_ROOT / "lm-cache",
                        help="folder for the trained float model (default: ./tquant-bench-results/lm-cache/)")
    parser.add_argument("--no-cache", action="store_true", help="train the float model even when it is cached")
    return parser


PARSERS: dict[str, Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = {
    "quantizer": quantizer, "qat": qat, "onnx": onnx, "search": search, "startup": startup, "lm": lm,
}
"""``tquant bench`` name -> the function adding that benchmark's options."""
