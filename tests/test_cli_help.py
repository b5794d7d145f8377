"""The ``tquant`` command's help (issue 18): light to load, and every command and option explained.

Start-up times are measured in ``tquant bench startup`` (committed results), not here; these tests
check what makes them short: ``--help`` and ``--version`` never import torch, and a bare ``import
tquant`` loads nothing heavy until a name is used.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from tquant import cli
from tquant.benchmarks.cli import BENCHES


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (printed one per line)."""
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["demo", "--help"], ["inspect", "--help"],
                                  ["bench", "--help"], ["selfcheck", "--help"],
                                  *(["bench", name, "--help"] for name in BENCHES)], ids=" ".join)
def test_help_and_version_import_no_torch(argv):
    code = f"import contextlib, io\nfrom tquant import cli\nwith contextlib.suppress(SystemExit), " \
           f"contextlib.redirect_stdout(io.StringIO()):\n    cli.main({argv!r})"
    loaded = _modules_after(code)
    assert "tquant.cli" in loaded
    heavy = {"torch", "onnx", "onnxruntime", "sklearn", "matplotlib", "triton"} & loaded
    assert not heavy, f"tquant {' '.join(argv)} imported {sorted(heavy)}"


def test_bare_import_is_light_and_names_load_on_use():
    loaded = _modules_after("import tquant")
    assert "torch" not in loaded
    loaded = _modules_after("import tquant\nassert tquant.attention.QuantTransformerEncoderLayer\n"
                            "assert tquant.QuantizationMap().default_qconfig is not None")
    assert {"torch", "tquant.attention", "tquant.config", "tquant.kernels"} <= loaded


def test_import_after_torch_registers_the_ops_at_once():
    loaded = _modules_after("import torch\nimport tquant\nassert torch.ops.tquant.fake_quant.default")
    assert "tquant.kernels.fake_quant" in loaded


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parsers():
    """``(name, parser)`` of every subcommand and every benchmark, as the command builds them."""
    modules = {name: importlib.import_module(path) for name, path in cli.SUBCOMMANDS.items()}
    top = cli.build_parser(modules)
    yield "tquant", top
    yield from _subparsers(top).items()
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        yield f"bench {name}", module.build_parser(argparse.ArgumentParser(prog=f"tquant bench {name}",
                                                                           description=help_text))


def test_every_command_and_option_is_explained():
    for name, parser in _parsers():
        assert parser.description, f"tquant {name} --help has no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            what = f"tquant {name}: {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help"
            trivial = action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
            assert trivial or "default" in action.help, f"{what} does not say its default ({action.default!r})"


def test_bench_help_lists_the_benchmarks_and_a_benchmarks_help_shows_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name:<10} {text}" in out for name, (_, text) in BENCHES.items())
    with pytest.raises(SystemExit):
        cli.main(["bench", "quantizer", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: tquant bench quantizer") and "--modes" in out and "default: all three" in out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "quantizer", "--modes", "sideways"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("tquant: error: argument --modes: invalid choice: 'sideways'")
    assert len(err.splitlines()) == 1


def test_bench_options_offer_what_the_benchmarks_run():
    """``benchmarks/options.py`` (no torch) names the choices; the benchmarks run over the same lists."""
    from tquant.benchmarks import bench_search, bench_startup, families, options

    assert set(options.PARSERS) == set(BENCHES)
    assert tuple(families.FAMILIES) == options.FAMILIES
    assert tuple(bench_search.CASES) == options.SEARCH_CASES
    assert tuple(bench_startup.PY_JOBS) == options.STARTUP_PY_JOBS
