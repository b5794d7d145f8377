"""Package attributes that load on first use (PEP 562), so ``tquant --help`` never imports torch.

:func:`lazy_attributes` gives a package the module-level ``__getattr__`` and ``__dir__`` that import
the submodule defining a name when the name is first read (then cache it in the package), and make
every submodule an attribute without an explicit import (``tquant.attention`` after ``import tquant``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable


def lazy_attributes(package: str, names_by_module: dict[str, tuple[str, ...]],
                    on_import_error: Callable[[ImportError], Exception | None] | None = None):
    """``(__getattr__, __dir__, names)`` for ``package``: ``names_by_module`` maps each submodule (relative
    name) to the public names it defines; ``names`` lists them all (for ``__all__``). ``on_import_error(err)``
    may turn an ImportError while loading a name into a clearer exception (e.g. which extra to install);
    returning None re-raises ``err``."""
    exports = {name: module for module, names in names_by_module.items() for name in names}

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            if name.startswith("_") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        try:
            value = getattr(importlib.import_module(f"{package}.{module}"), name)
        except ImportError as err:
            clearer = on_import_error(err) if on_import_error is not None else None
            if clearer is None:
                raise
            raise clearer from err
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__, list(exports)


def load_all(package: str, names) -> None:
    """Load every name of ``names`` in ``package`` now (what a plain ``from .x import y`` list would do)."""
    module = sys.modules[package]
    for name in names:
        getattr(module, name)
