"""Checks of the GPU path that need compiled (not interpreted) Triton, run on a CPU: ``python offline_checks.py OUT``.

Run by ``tests/test_triton_offline.py`` in a process of its own (``TRITON_INTERPRET`` unset), inside
``tquant.kernels.triton_offline.offline``: the Triton lane on CPU tensors with its launches stubbed.
Writes a JSON report of facts for the test to assert on:

- ``graphs``: the call targets of the AOT forward and backward graphs of converted models compiled
  with ``fullgraph=True`` on the Triton lane (training, and learned ranges), one of them with group-wise and
  FP8 quantizers;
- ``workspace``: the quantizers' range-update workspaces exist right after conversion and are the
  same tensors after training steps (nothing allocated per call, so nothing inside a capture);
- ``binding``, ``binding_formats``: how many launches went through ``JITFunction.run`` (one compile per
  variant) and how many through the bound launchers over repeated calls (integer, group-wise and FP8
  quantizers);
- ``alignment``: the variants an aligned and a misaligned input of the same layout were bound to.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import tquant
import tquant.kernels as K
from tquant.kernels import triton_offline

from helpers import stand_in_ranges


def qmap(per_channel: bool = True) -> tquant.QuantizationMap:
    config = tquant.QuantizationConfig(tquant.ActivationQuantConfig(8),
                                       tquant.WeightQuantConfig(8, per_channel=per_channel))
    qmap = tquant.QuantizationMap(config)
    tquant.append_default_conversions(qmap)
    return qmap


def models():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    return [("mlp", mlp, torch.randn(8, 16)),
            ("cnn", cnn, torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))]


def graph_targets(model: nn.Module, x: torch.Tensor) -> dict:
    """``{"forward": [...], "backward": [...]}``: call targets of the compiled step's AOT graphs."""
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    compiled(x).float().square().mean().backward()
    names = [[str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs]
    return {"forward": names[0], "backward": names[1] if len(names) > 1 else []}


def formats_qmap() -> tquant.QuantizationMap:
    """Group-wise asymmetric W4 (g16) with int8 outputs, then FP8 weights (per channel) and outputs."""
    group = tquant.QuantizationConfig(tquant.ActivationQuantConfig(8),
                                      tquant.WeightQuantConfig(4, False, group_size=16))
    fp8 = tquant.QuantizationConfig(tquant.ActivationQuantConfig(8, fmt="fp8_e5m2"),
                                    tquant.WeightQuantConfig(8, True, True, fmt="fp8_e4m3"))
    return tquant.QuantizationMap(instance_qconfig_map={"0": tquant.QuantizedModuleConfig(tquant.QuantLinear, group),
                                                        "2": tquant.QuantizedModuleConfig(tquant.QuantLinear, fp8)})


def check_graphs() -> dict:
    out = {}
    formats = ("formats", nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16))
    for name, model, x in [*models(), formats]:
        qmodel = tquant.convert_to_quantized(model, formats_qmap() if name == "formats" else qmap()).train()
        out[name] = graph_targets(qmodel, x)
        stand_in_ranges(qmodel)
        tquant.learn_ranges(qmodel)
        out[name + "-learned"] = graph_targets(qmodel, x)
    return out


def check_workspace() -> dict:
    _, model, x = models()[1]
    qmodel = tquant.convert_to_quantized(model, qmap())
    managers = {n: m for n, m in qmodel.named_modules() if isinstance(m, tquant.QuantizationManager)}
    before = {n: (m.range_estimator._workspace.data_ptr(), tuple(m.range_estimator._workspace.shape))
              for n, m in managers.items()}
    qmodel.train()
    for _ in range(3):
        qmodel(x).sum().backward()
    after = {n: (m.range_estimator._workspace.data_ptr(), tuple(m.range_estimator._workspace.shape))
             for n, m in managers.items()}
    channels = {n: m.quantizer.state_shape for n, m in managers.items()}
    return {"before": before, "after": after, "channels": channels}


def check_binding(record_calls: list, launches, qm=None, x=None) -> dict:
    """Five training steps of one quantizer: compiles (calls of ``JITFunction.run``) and launches."""
    record_calls.clear()
    start = launches.count
    if qm is None:
        qm = tquant.QuantizationManager(tquant.QMethods.asymmetric_uniform, tquant.RangeEstimators.running_minmax,
                                        qparams={"n_bits": 8}).train()
        x = torch.randn(6, 40, requires_grad=True)
    for _ in range(5):
        qm(x).sum().backward()
    return {"through_run": len(record_calls), "launches": launches.count - start}


def check_binding_formats(record_calls: list, launches) -> dict:
    """:func:`check_binding` for a group-wise W4 g128 weight quantizer (symmetric, current min/max) and an FP8
    per-tensor activation quantizer (running min/max)."""
    group = tquant.QuantizationManager(tquant.QMethods.symmetric_uniform, tquant.RangeEstimators.current_minmax,
                                       qparams={"n_bits": 4, "group_size": 128, "weight_shape": (16, 300)},
                                       n_channels=16).train()
    fp8 = tquant.QuantizationManager(tquant.QMethods.symmetric_uniform, tquant.RangeEstimators.running_minmax,
                                     qparams={"n_bits": 8, "fmt": "fp8_e4m3"}).train()
    return {"group": check_binding(record_calls, launches, group, torch.randn(16, 300, requires_grad=True)),
            "fp8": check_binding(record_calls, launches, fp8, torch.randn(8, 50, requires_grad=True))}


def check_alignment(record_calls: list) -> dict:
    record_calls.clear()
    qm = tquant.QuantizationManager(tquant.QMethods.symmetric_uniform, tquant.RangeEstimators.running_minmax,
                                    qparams={"n_bits": 8}).train()
    base = torch.randn(2, 1001)
    aligned, misaligned = base[0, :1000], base[1, 1:1001]  # same layout, data pointers 4004 bytes apart
    with torch.no_grad():
        qm(aligned)
        qm(misaligned)
    variants = {}
    for kernel, args, kwargs in record_calls:
        v = triton_offline.bind(kernel, args, kwargs, 90)
        variants.setdefault(v.name, []).append([list(a) for a in v.attrs])
    return {"pointers": [aligned.data_ptr() % 16, misaligned.data_ptr() % 16], "attrs": variants}


def main(path: str) -> None:
    calls: list = []
    record = lambda kernel, args, kwargs: calls.append((kernel, args, kwargs))  # noqa: E731
    report = {}
    with triton_offline.offline(record) as launches, K.use_backend("triton"):
        report["graphs"] = check_graphs()
        report["workspace"] = check_workspace()
        report["alignment"] = check_alignment(calls)
        report["binding"] = check_binding(calls, launches)
        report["binding_formats"] = check_binding_formats(calls, launches)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
