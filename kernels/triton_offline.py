"""The GPU path, checked without a GPU: record the Triton launches, stub them, compile them for CUDA.

The interpreter proves numerics, not that a kernel compiles for a GPU, nor what the host pays per
call (DESIGN §4). This module gives a CPU-only process the other two, with the Triton that is
installed (not in interpreter mode: set nothing, or unset ``TRITON_INTERPRET`` before importing tquant):

- :func:`offline` — a context in which the ``triton`` backend takes CPU tensors as stand-ins for CUDA
  tensors, plans are sized for a GPU of :data:`SM_COUNT` SMs, and ``JITFunction.run`` compiles nothing
  and launches nothing: it hands each launch to an optional recorder and returns a stub kernel whose C
  launcher is a no-op, so tquant's bound launchers (``_triton_launch``) bind to it as to a compiled
  kernel. What a quantizer call costs there is all of tquant's Python and ATen around its launches.
- :func:`bind` — a recorded launch bound the way ``JITFunction.run`` binds it for a CUDA target:
  argument types, constexprs, specialisation attributes (16-byte alignment, integers equal to 1) and
  options: one :class:`Variant`, what the GPU would compile.
- :func:`compile_variant` — ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``:
  PTX and a cubin for a GPU that is not there (Triton ships ``ptxas``).

Uses Triton internals that are the same in Triton 3.6 and 3.9 (``create_function_from_signature``,
``JITFunction._pack_args``), so the compile check runs with either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

from . import _triton_plan, backend
from ._triton import INTERPRET, triton

__all__ = ["SM_COUNT", "Variant", "bind", "compile_variant", "offline"]

SM_COUNT = 132
"""SMs of the GPU the offline plans are sized for (an H100 SXM / H200)."""


class Launches:
    """Counts the launches made offline (each call of a stub launcher, each unbound ``kernel[grid]``)."""

    def __init__(self):
        self.count = 0


class _StubKernel:
    """What ``JITFunction.run`` returns offline: a "compiled kernel" whose C launcher only counts."""

    function = None
    packed_metadata = None

    def __init__(self, launches: Launches):
        self._launches = launches

    def run(self, *args):
        self._launches.count += 1


class _OfflineDriver:
    """Triton's active driver offline: a CUDA target of :data:`SM_COUNT` SMs that is not there (torch's
    ``wrap_triton`` asks it for the target when it analyses which arguments a kernel mutates)."""

    @staticmethod
    def get_current_target():
        return _target(90)

    @staticmethod
    def get_current_device() -> int:
        return 0

    @staticmethod
    def get_current_stream(device=None) -> int:
        return 0


@contextlib.contextmanager
def offline(record=None):
    """Run the Triton lanes on CPU tensors without launching anything (see the module docstring).

    Yields a :class:`Launches` counter. ``record(kernel, args, kwargs)``, when given, is called for every
    launch that goes through ``JITFunction.run`` (the first call of each bound launcher, and every
    unbound ``kernel[grid](...)``) with the kernel's positional and keyword arguments. Quantizers and plans
    made inside stay bound to the stubs: use them only inside (the functional ops' plan cache is emptied
    on exit).
    """
    if INTERPRET:
        raise RuntimeError("triton_offline needs compiled Triton: unset TRITON_INTERPRET before importing tquant")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launches = Launches()
    stub = _StubKernel(launches)

    def run(self, *args, grid, warmup, **kwargs):
        if record is not None:
            record(self, args, kwargs)
        if not warmup:
            launches.count += 1
        return stub

    saved = (JITFunction.run, backend.INTERPRET, _triton_plan.OFFLINE_SM_COUNT)
    JITFunction.run = run
    backend.INTERPRET = True  # lets TQUANT_BACKEND=triton take CPU tensors
    _triton_plan.OFFLINE_SM_COUNT = SM_COUNT
    _triton_plan._plans.clear()
    previous_driver = driver._active  # reset_active() would create the default driver, which fails here
    driver.set_active(_OfflineDriver())
    try:
        yield launches
    finally:
        JITFunction.run, backend.INTERPRET, _triton_plan.OFFLINE_SM_COUNT = saved
        _triton_plan._plans.clear()
        driver._active = previous_driver


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: what ``triton.compile`` needs, in picklable parts."""

    module: str
    name: str
    arch: int
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.name}[sm_{self.arch}]({consts})"


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def bind(kernel, args, kwargs, arch: int) -> Variant:
    """The variant ``JITFunction.run`` would compile for this launch on an ``sm_<arch>`` GPU."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target_backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, target_backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(target_backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    scalars = (int, float, str, bool, type(None))
    opts = tuple(sorted((k, v) for k, v in options.__dict__.items() if isinstance(v, scalars)))
    return Variant(
        module=kernel.fn.__module__, name=kernel.fn.__name__, arch=arch,
        signature=tuple(signature.items()),
        constexprs=tuple((names[k[0]], v) for k, v in sorted(constexprs.items()) if len(k) == 1),
        attrs=tuple((k, tuple(map(tuple, v))) for k, v in sorted(attrs.items())),
        options=opts,
    )


def compile_variant(variant: Variant) -> str | None:
    """Compile ``variant`` for its GPU; ``None`` when it compiles, else the error in one line."""
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(variant.module), variant.name)
    names = kernel.arg_names
    source = ASTSource(
        kernel, dict(variant.signature), {(names.index(k),): v for k, v in variant.constexprs},
        {k: [list(a) for a in v] for k, v in variant.attrs},
    )
    try:
        triton.compile(source, target=_target(variant.arch), options=dict(variant.options))
    except Exception as exc:  # report every failure, whatever Triton raised
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # a CompilationError starts with "at line:col:"
        return f"{type(exc).__name__}: {where}{lines[-1][:300]}"
    return None
