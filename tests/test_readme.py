"""Every code block of the README runs as written (issue 18), in a fresh interpreter.

- ``python`` blocks run in order in ONE new Python process, as a reader's session (a later block
  uses what an earlier one made), each block compiled on its own so that a failure names it; the
  process starts in an empty folder with nothing imported, so a block that needs an import it
  does not write fails here too.
- ``bash`` blocks pass ``bash -n``, and each command on them is checked without running it (they
  install packages, or run the whole demo / test suite, which have their own tests): a ``tquant``
  command parses with tquant's own option parser (a benchmark's options with that benchmark's),
  ``pip install`` names only extras that ``pyproject.toml`` defines, any other program is one the
  README's install lines provide.
- ``text`` blocks are output, not code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tquant import cli
from tquant.benchmarks.cli import BENCHES

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 1)
          for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S)]
PROGRAMS = {"pip", "tquant", "pytest"}
"""Programs the bash blocks may call: pip, and what the install lines put on PATH."""

RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md (python block at line {line})", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README python block at line {line} failed")
"""


def test_every_block_has_a_known_language():
    assert {lang for lang, _, _ in BLOCKS} <= {"python", "bash", "text"}, "a code block without a language tag"


def test_python_blocks_run_in_a_fresh_interpreter(tmp_path):
    blocks = [(line, code) for lang, code, line in BLOCKS if lang == "python"]
    assert len(blocks) >= 3
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "qmodel.pt").exists() and (tmp_path / "qmodel.onnx").exists()


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[project.optional-dependencies]"):]
    section = section[:section.index("\n[", 1)]
    return set(re.findall(r"^([\w-]+) = \[", section, re.M))


def _tquant_parser() -> argparse.ArgumentParser:
    return cli.build_parser({name: importlib.import_module(path) for name, path in cli.SUBCOMMANDS.items()})


def _check_command(argv: list[str], where: str) -> None:
    assert argv[0] in PROGRAMS, f"{where}: {argv[0]!r} is not a program the README installs"
    if argv[0] == "pip":
        assert argv[1] == "install", where
        for extras in re.findall(r"\[([\w,-]+)\]", " ".join(argv[2:])):
            unknown = set(extras.split(",")) - _extras()
            assert not unknown, f"{where}: pyproject.toml defines no extra {sorted(unknown)}"
    elif argv[0] == "tquant":
        args = _tquant_parser().parse_args(argv[1:])
        if args.command == "bench" and args.bench is not None:
            module = importlib.import_module(BENCHES[args.bench][0])
            module.build_parser(argparse.ArgumentParser()).parse_args(args.bench_args)


@pytest.mark.parametrize("line,code", [(line, code) for lang, code, line in BLOCKS if lang == "bash"],
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_bash_blocks_are_valid_commands(line, code):
    syntax = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert syntax.returncode == 0, f"README bash block at line {line}: {syntax.stderr}"
    for offset, text in enumerate(code.splitlines()):
        text = text.split(" #", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        for command in re.split(r"&&|;|\|\|", text):
            _check_command(shlex.split(command), f"README line {line + 1 + offset}: {command.strip()}")
