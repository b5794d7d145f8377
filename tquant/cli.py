"""The ``tquant`` command: ``demo``, ``inspect``, ``bench``, ``selfcheck``.

Each subcommand's options and entry point live in a light module (``add_parser`` and ``run``) that
imports torch, onnx and the rest only when the command runs: ``tquant --version`` and every
``--help`` answer without them (``tquant bench BENCH --help`` too), also on an install without the
optional extras.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .extras import missing_dependency_line

# subcommand -> light module exposing add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "demo": "tquant.demo.cli",
    "inspect": "tquant.export.inspect_cmd",
    "bench": "tquant.benchmarks.cli",
    "selfcheck": "tquant.selfcheck",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage dump
        self.exit(2, f"tquant: error: {message}\n")


def build_parser(modules: dict) -> argparse.ArgumentParser:
    parser = _Parser(prog="tquant", description="Fast quantization-aware training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"tquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in modules.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    names = [wanted] if wanted in SUBCOMMANDS else list(SUBCOMMANDS)
    modules = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(SUBCOMMANDS[name])
        except ImportError as err:
            if name == wanted:
                print(missing_dependency_line(name, err), file=sys.stderr)
                return 2
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
