"""``tquant selfcheck``: convert, train one step and evaluate a tiny model on each backend.

torch and tquant's core load when the check runs, not when the command line is parsed.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    subparsers.add_parser(
        "selfcheck",
        help="quick check that quantized training works on this machine",
        description="Print the versions and the backend, then on each device here (the CPU, and CUDA when "
        "there is one) convert a small model to 8 bits, train it one step and check that its outputs take at "
        "most 256 values: 'ok' per device; exit status 1 when a device fails.",
    )


def _one_backend(device: str) -> str:
    import torch
    from torch import nn

    import tquant

    torch.manual_seed(0)
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    model = tquant.convert_to_quantized(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), qmap)
    model = model.to(device)
    x = torch.randn(64, 16, device=device)
    model(x).square().mean().backward()
    model.eval()
    codes = model(x).unique().numel()
    return f"ok ({codes} distinct 8-bit outputs <= 256)" if codes <= 256 else f"FAILED ({codes} distinct outputs)"


def run(args) -> int:
    import torch

    import tquant

    print(f"tquant {tquant.__version__}, torch {torch.__version__}, backend {tquant.kernels.get_backend()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        result = _one_backend(device)
        ok &= result.startswith("ok")
        print(f"  {device}: {result}")
    return 0 if ok else 1
