"""Test set-up: Triton runs in interpreter mode on machines without CUDA.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here,
before any test module imports ``tquant``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections import Counter  # noqa: E402

import pytest  # noqa: E402

import tquant.kernels as K  # noqa: E402
from tquant.kernels._triton import HAS_TRITON  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason with its count (``-rs`` lists every skipped test)."""
    reasons = Counter(str(r.longrepr[2]).removeprefix("Skipped: ") for r in terminalreporter.stats.get("skipped", [])
                      if isinstance(r.longrepr, tuple))
    if reasons:
        terminalreporter.write_sep("-", "skipped tests, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:5d}  {reason}")


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts and ends on the backend the environment selected."""
    previous = K.get_backend()
    yield
    K.set_backend(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


MODEL_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(params=MODEL_BACKENDS)
def backend(request):
    """Run a model-level test on each backend: the torch path, and the Triton kernels — in the
    interpreter on CPU tensors, or compiled, on CUDA tensors, where a GPU exists. There the
    Triton case runs with CUDA as the default device, so the test's models and tensors are
    made on the GPU without the test naming a device."""
    with K.use_backend(request.param):
        if request.param == "triton" and HAS_CUDA:
            with torch.device("cuda"):
                yield request.param
        else:
            yield request.param
