"""Every Triton kernel variant the lanes launch compiles for sm_80 and sm_90, with each Triton we support.

The interpreter runs the kernels' numerics but type-checks nothing the compiler checks (a loop-carried
variable re-bound to another shape passed every interpreter test and failed to compile for sm_90).
``tests/cuda_compile.py`` records the launches of the lanes over a matrix of inputs, binds each as
Triton binds it for a CUDA target, and compiles each distinct variant (PTX and cubin; Triton ships
ptxas), in a process of its own with compiled Triton. Here it runs:

- with the installed Triton (what CI and users install);
- with the GPU machine's Triton 3.6, when ``TQUANT_TRITON_36`` names a folder it is installed in
  (``.ci/run`` installs it there and sets ``TQUANT_REQUIRE_TRITON_36=1``, so CI cannot skip it);
- on a kernel that is broken the way the interpreter cannot see, to show that the check fails then.
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

SCRIPT = Path(__file__).with_name("cuda_compile.py")
TRITON_36 = os.environ.get("TQUANT_TRITON_36", "")
REQUIRE_36 = os.environ.get("TQUANT_REQUIRE_TRITON_36") == "1"


def run_check(tmp_path: Path, *args: str, triton_path: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # quiet Triton 3.9's notice; every launch sets its own option
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH", "")) if p)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(report), *args], env=env,
                          capture_output=True, text=True, timeout=1200)
    data = json.loads(report.read_text()) if report.exists() else {}
    return proc, data


def assert_all_compile(proc: subprocess.CompletedProcess, data: dict) -> None:
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert data, f"no report: {tail}"
    assert not data["failed"], f"{len(data['failed'])} variants failed to compile: {data['failed'][:5]}"
    assert not data["missing"], f"kernels never launched by the matrix: {data['missing']}"
    assert proc.returncode == 0, tail
    assert data["arches"] == [80, 90]
    assert data["variants"] >= 150 and len(data["kernels"]) >= 7, data


def test_every_variant_compiles_with_the_installed_triton(tmp_path):
    proc, data = run_check(tmp_path)
    assert_all_compile(proc, data)


@pytest.mark.skipif(not TRITON_36 and not REQUIRE_36,
                    reason="set TQUANT_TRITON_36 to a folder holding Triton 3.6 (pip install --target DIR "
                           "triton==3.6.0 --no-deps), as .ci/run does")
def test_every_variant_compiles_with_the_gpu_machines_triton_36(tmp_path):
    assert TRITON_36 and Path(TRITON_36, "triton").is_dir(), f"TQUANT_TRITON_36={TRITON_36!r} holds no Triton"
    proc, data = run_check(tmp_path, triton_path=TRITON_36)
    assert data.get("triton", "").startswith("3.6"), data.get("triton")
    assert_all_compile(proc, data)


def test_a_kernel_broken_the_way_the_interpreter_misses_fails_the_check(tmp_path):
    proc, data = run_check(tmp_path, "--self-test")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(data["failed"]) == 2, data  # sm_80 and sm_90
    assert all("Loop-carried variable" in error for _, error in data["failed"]), data["failed"]
