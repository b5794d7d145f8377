"""Launching a planned Triton kernel variant through Triton's C launcher, without ``JITFunction.run``.

``kernel[grid](...)`` goes through ``JITFunction.run`` at every launch: binding the arguments,
computing their specialisation and looking the compiled kernel up costs 10-12 us of Python before the
driver (DESIGN §4). A quantizer launches the same few variants, with the same sizes, at every step,
so its plan binds each variant once:

- a :class:`Launcher` holds one kernel, its grid and its fixed trailing arguments (sizes, scalars,
  constexprs and launch options). Its first call compiles the variant for that call's arguments (or
  takes it from Triton's cache) through ``JITFunction.warmup``, and keeps the ``CompiledKernel``'s C
  launcher, function handle and packed metadata; every later call is one call into that launcher.
- In the interpreter (``TRITON_INTERPRET=1``) nothing is compiled: each call is ``kernel[grid](...)``.
- With a Triton launch hook installed (a profiler) when a launcher binds, it goes through
  ``kernel[grid]`` instead, so the hook sees every launch (hooks added later do not see bound launchers).

Contract: the leading arguments passed at call time are the kernel's first parameters, in order; the
trailing ones are fixed per launcher. Triton specialises pointers on 16-byte alignment and integers on
their value; a launcher is only valid for calls whose leading pointers have the alignment of its first
call (state pointers are declared ``do_not_specialize_on_alignment`` in the kernels, and callers pick
a launcher by the alignment of their input: :func:`aligned`).
"""

from __future__ import annotations

import torch

from ._triton import INTERPRET, triton

__all__ = ["Launcher", "aligned"]


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t``'s data pointer has the 16-byte alignment Triton specialises pointers on."""
    return t.data_ptr() % 16 == 0


def _no_stream(_device) -> int:
    return 0


class Launcher:
    """One kernel variant bound to a launch plan: ``launcher(*leading_args)`` launches it.

    Args:
        kernel: the ``@triton.jit`` function.
        grid: the launch grid (a tuple of 1-3 ints).
        tail: the non-constexpr arguments after the leading ones, in order (fixed per plan).
        constexprs: the ``tl.constexpr`` parameters by name (the kernels declare them last).
        options: launch options (``num_warps``, ``enable_fp_fusion``...).
    """

    __slots__ = ("kernel", "grid", "tail", "constexprs", "options", "_bound")

    def __init__(self, kernel, grid: tuple, tail: tuple, constexprs: dict, options: dict):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tail = tuple(tail)
        self.constexprs = constexprs
        self.options = options
        self._bound = None

    def __call__(self, *args):
        bound = self._bound
        if bound is None:
            return self._first(args)
        run, g0, g1, g2, get_stream, device, function, metadata, rest = bound
        run(g0, g1, g2, get_stream(device), function, metadata, None, None, None, *args, *rest)

    def _slow(self, args):
        self.kernel[self.grid](*args, *self.tail, **self.constexprs, **self.options)

    def _first(self, args):
        """Compile (or fetch) the variant for these arguments and launch it; keep what later calls need."""
        if INTERPRET or _launch_hooked():
            return self._slow(args)
        full = (*args, *self.tail)
        if list(self.constexprs) != self.kernel.arg_names[len(full):]:
            raise TypeError(f"{self.kernel.__name__}: constexpr parameters must come last, in order")
        device = args[0].device
        if device.type == "cuda":
            from triton.runtime import driver

            index = device.index if device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):  # the module is loaded on the device current at compile time
                compiled = self.kernel.warmup(*full, grid=self.grid, **self.constexprs, **self.options)
                run = compiled.run
            get_stream = driver.active.get_current_stream
            if torch.cuda.device_count() > 1:
                run = _on_device(run, index)
        else:  # tquant.kernels.triton_offline's stubbed kernels: no device behind them
            compiled = self.kernel.warmup(*full, grid=self.grid, **self.constexprs, **self.options)
            run, get_stream, index = compiled.run, _no_stream, None
        self._bound = (run, *self.grid, get_stream, index, compiled.function, compiled.packed_metadata,
                       (*self.tail, *self.constexprs.values()))
        return self(*args)


def _on_device(run, index: int):
    """``run`` made current-device safe: the launch happens with device ``index`` current."""

    def launch(*args):
        if torch.cuda.current_device() == index:
            return run(*args)
        with torch.cuda.device(index):
            return run(*args)

    return launch


def _launch_hooked() -> bool:
    """Whether a launch hook (a profiler) is installed: Triton's hook chains hold a call."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return False
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and (getattr(h, "calls", None) or not hasattr(h, "calls")) for h in hooks)
