"""Kernel launches per quantizer call on the Triton path (DESIGN §4 fusion plan), counted in the
interpreter: a training forward with range estimation is at most 2 launches, a fixed-range
forward 1, a backward 1 (plus the range-gradient reduction with learned ranges). Besides the
Triton kernels, no torch op may compute on the tensor (allocations and views only), so the
counts are what a GPU would run."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tquant
import tquant.kernels as K
from tquant.kernels._triton import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_TRITON and (INTERPRET or torch.cuda.is_available())),
                                reason="needs Triton (interpreter or a GPU)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# aten ops that allocate, alias or read metadata: no kernel runs on a GPU for them
# (scalar_tensor: a Python number wrapped as a CPU scalar, which CUDA kernels take as an argument)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "view", "detach", "alias", "lift_fresh", "_unsafe_view",
             "as_strided", "t", "expand", "_reshape_alias", "reshape", "is_same_size", "scalar_tensor"}


_in_launch = [0]  # > 0 while a Triton kernel runs (the interpreter's own tensor copies are not ours)


class OpLog(TorchDispatchMode):
    """Every aten op dispatched while active, outside Triton launches (name without overload)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _in_launch[0]:
            self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))

    def compute_ops(self) -> list[str]:
        return [op for op in self.ops if op not in NO_KERNEL]


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")


@pytest.fixture
def launches(monkeypatch):
    """A list that records the name of every Triton kernel launched (interpreter or GPU): the calls of the
    plans' bound launchers (which on a GPU go straight to Triton's C launcher) and unbound ``kernel[grid]``
    launches (in the interpreter a bound launcher makes one of those too: counted once)."""
    from tquant.kernels import _triton_fake_quant, _triton_range
    from tquant.kernels._triton_launch import Launcher

    names: list[str] = []
    kernels = [getattr(mod, n) for mod in (_triton_fake_quant, _triton_range) for n in dir(mod)
               if n.endswith("_kernel")]
    run, call = type(kernels[0]).run, Launcher.__call__

    def counting_call(self, *args):
        names.append(_name(self.kernel))
        _in_launch[0] += 1
        try:
            return call(self, *args)
        finally:
            _in_launch[0] -= 1

    def counting_run(self, *args, **kwargs):
        if not _in_launch[0] and not kwargs.get("warmup"):
            names.append(_name(self))
        _in_launch[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            _in_launch[0] -= 1

    monkeypatch.setattr(type(kernels[0]), "run", counting_run)
    monkeypatch.setattr(Launcher, "__call__", counting_call)
    K.set_backend("triton")  # conftest restores it
    return names


def manager(symmetric: bool, per_channel: bool, estimator=tquant.RangeEstimators.running_minmax, n_channels=None):
    qmethod = tquant.QMethods.symmetric_uniform if symmetric else tquant.QMethods.asymmetric_uniform
    return tquant.QuantizationManager(qmethod, estimator, per_channel=per_channel, qparams={"n_bits": 8},
                                      n_channels=n_channels).to(DEV)


CASES = [pytest.param(s, pc, id=f"{'sym' if s else 'asym'}-{'channel' if pc else 'tensor'}")
         for s in (True, False) for pc in (False, True)]


@pytest.mark.parametrize("symmetric, per_channel", CASES)
def test_training_forward_two_launches_backward_one(launches, symmetric, per_channel):
    qm = manager(symmetric, per_channel, n_channels=6).train()
    x = torch.randn(6, 33, device=DEV, requires_grad=True)
    qm(x)  # the first call plans
    for _ in range(2):  # the initialising call and a later one
        launches.clear()
        with OpLog() as log:
            y = qm(x)
        assert len(launches) <= 2, launches
        assert launches == ["_update_range_kernel", "_fake_quant_fwd_kernel"], launches
        assert log.compute_ops() == [], f"torch ops computing in the forward: {log.compute_ops()}"
        launches.clear()
        grad = torch.ones_like(y)
        with OpLog() as log:
            y.backward(grad)
        assert launches == [] and len(log.compute_ops()) <= 2, (launches, log.compute_ops())
        assert [op for op in log.compute_ops() if op != "add_"] == ["where"], log.compute_ops()  # add_: x.grad


@pytest.mark.parametrize("symmetric, per_channel", CASES)
def test_fixed_range_forward_is_one_launch(launches, symmetric, per_channel):
    qm = manager(symmetric, per_channel, n_channels=5).train()
    x = torch.randn(5, 17, device=DEV)
    qm(x)
    qm.fix_ranges()
    launches.clear()
    with OpLog() as log:
        qm(x)
    assert launches == ["_fake_quant_fwd_kernel"] and log.compute_ops() == [], (launches, log.compute_ops())
    qm.eval()
    launches.clear()
    qm(x)
    assert launches == ["_fake_quant_fwd_kernel"]


def test_learned_ranges_backward_adds_only_the_range_reduction(launches):
    qm = manager(False, False).train()
    x = torch.randn(4, 9, device=DEV, requires_grad=True)
    qm(x)
    qm.learn_ranges()
    y = qm(x)
    launches.clear()
    y.sum().backward()
    assert launches == ["_range_grads_partials_kernel", "_range_grads_finalize_kernel"], launches


def test_input_without_grad_saves_no_mask(launches):
    """An input that needs no gradient (the image): one range update and one fake quant, no mask."""
    qm = manager(True, False).train()
    x = torch.randn(3, 8, device=DEV)
    qm(x)
    launches.clear()
    y = qm(x)
    assert launches == ["_update_range_kernel", "_fake_quant_fwd_kernel"] and y.grad_fn is None


def test_new_layout_replans_instead_of_reusing_a_stale_plan(launches):
    """Shape, dtype and strides may change between calls: each new layout gets its own plan."""
    qm = manager(True, True, n_channels=4).train()
    ref = manager(True, True, n_channels=4).train()
    for x in (torch.randn(4, 10), torch.randn(4, 3, 5), torch.randn(4, 10).half(), torch.randn(10, 4).t(),
              torch.randn(4, 10)[:, ::2]):
        x = x.to(DEV)
        with K.use_backend("reference"):
            expected = ref(x)
        torch.testing.assert_close(qm(x), expected, rtol=0, atol=0)
    assert len(qm._calls) == 5
    with pytest.raises(ValueError, match="per-channel quantizer of 4 channels got an input with 3"):
        qm(torch.randn(3, 10, device=DEV))
