"""The Triton lane's GPU-side contract, checked on a CPU with compiled Triton and stubbed launches.

``tests/offline_checks.py`` runs once, in a process of its own (the suite runs Triton's interpreter,
which has no compiled kernels to bind or trace), inside ``tquant.kernels.triton_offline.offline``:

- under ``torch.compile(fullgraph=True)`` a converted model on the Triton lane has no opaque ``tquant``
  op in its forward or backward graph: every quantizer kernel is a ``wrap_triton`` call that inductor
  launches itself (training, and learned ranges with their gradient kernels);
- the range-update workspace of every quantizer exists from conversion and is never re-allocated,
  so nothing is allocated inside a CUDA-graph capture;
- each kernel variant goes through ``JITFunction.run`` once (its compile); later launches go to the
  bound launcher;
- an input whose data pointer is not 16-byte aligned gets its own variant, compiled without the
  alignment assumption.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tquant.kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install 'tquant[triton]')")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("offline") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("offline_checks.py")), str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", ["mlp", "mlp-learned", "cnn", "cnn-learned", "formats", "formats-learned"])
def test_compiled_graph_has_no_python_fallback(report, case):
    graphs = report["graphs"][case]
    opaque = [t for g in graphs.values() for t in g if t.startswith("tquant.")]
    assert not opaque, f"opaque tquant ops in the compiled graph: {opaque}"
    kernels = [t for t in graphs["forward"] if t.startswith("triton_kernel_wrapper")]
    learned = case.endswith("learned")  # training: a range update and a fake quant per quantizer (>= 4)
    assert len(kernels) >= (4 if learned else 8), graphs["forward"]
    if learned:  # the LSQ gradients are kernels too
        assert any(t.startswith("triton_kernel_wrapper") for t in graphs["backward"]), graphs["backward"]


def test_workspace_exists_before_the_first_call_and_is_never_reallocated(report):
    ws = report["workspace"]
    assert ws["before"] == ws["after"]
    for name, (_, shape) in ws["before"].items():
        channels = ws["channels"][name]
        assert shape == [2 * (channels[0] if channels else 1)], (name, shape, channels)


def test_each_variant_compiles_once_then_launches_through_its_bound_launcher(report):
    assert report["binding"] == {"through_run": 2, "launches": 10}  # 5 steps x (range update + fake quant)


def test_a_misaligned_input_gets_a_variant_without_the_alignment_assumption(report):
    al = report["alignment"]
    assert al["pointers"][0] == 0 and al["pointers"][1] != 0
    for kernel in ("_update_range_kernel", "_fake_quant_fwd_kernel"):
        aligned, misaligned = al["attrs"][kernel]
        hints = [dict((i[0], a) for i, a in attrs) for attrs in (aligned, misaligned)]
        assert hints[0][0] == [["tt.divisibility", 16]] and hints[1][0] == [], (kernel, hints)
