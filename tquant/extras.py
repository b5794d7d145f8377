"""Which ``pip install 'tquant[...]'`` extra provides an optional dependency.

tquant's core needs only torch and numpy. The export (``onnx``), the demo (``demo``), the Triton
kernels (``triton``), Hugging Face models (``hf``), the tests (``cpu-dev``, ``dev``) and the peers
``tquant bench onnx`` measures when present (``peers``: Brevitas) come with extras (``pyproject.toml``);
an error for a missing optional module names the extra that brings it, not a catch-all.
"""

from __future__ import annotations

EXTRA_OF_MODULE = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "onnx_ir": "onnx",
    "sklearn": "demo",
    "matplotlib": "demo",
    "tqdm": "demo",
    "rich": "demo",
    "triton": "triton",
    "transformers": "hf",
    "pytest": "cpu-dev",
    "xdist": "cpu-dev",
    "hypothesis": "cpu-dev",
    "brevitas": "peers",
    "onnxoptimizer": "peers",
}
"""Top-level module name -> the extra that installs it."""

EXTRA_CONTENTS = {
    "onnx": "onnx, onnxruntime, onnxscript",
    "demo": "scikit-learn, matplotlib, tqdm, rich",
    "triton": "triton",
    "hf": "transformers: the language-model recipe on Hugging Face models",
    "cpu-dev": "onnx, demo, hf, pytest, pytest-xdist, hypothesis, ruff; no Triton",
    "dev": "cpu-dev + triton",
    "peers": "brevitas, onnxoptimizer: Brevitas graph mode in tquant bench onnx",
}


def install_hint(module: str | None) -> str | None:
    """``pip install 'tquant[onnx]' (onnx, onnxruntime, onnxscript)`` for ``module`` (dotted names
    count by their top level), or None when no extra provides it."""
    extra = EXTRA_OF_MODULE.get((module or "").split(".")[0])
    if extra is None:
        return None
    return f"pip install 'tquant[{extra}]' ({EXTRA_CONTENTS[extra]})"


def missing_dependency_line(command: str, err: ImportError) -> str:
    """``tquant inspect: missing dependency onnx: pip install 'tquant[onnx]' (...)``: the one line the
    ``tquant`` command prints when a subcommand cannot import an optional dependency."""
    missing = getattr(err, "name", None) or str(err)
    hint = install_hint(missing) or "see the optional dependencies in tquant's README"
    return f"tquant {command}: missing dependency {missing}: {hint}"


def missing_dependency_error(err: ImportError, what: str) -> ModuleNotFoundError | None:
    """A ``ModuleNotFoundError`` saying that ``what`` needs ``err.name`` and which extra installs it,
    or None when no extra provides the missing module (then ``err`` is the error to raise)."""
    hint = install_hint(getattr(err, "name", None))
    if hint is None:
        return None
    return ModuleNotFoundError(f"{what} needs {err.name}, which is not installed: {hint}", name=err.name)
