"""``tquant selfcheck``: convert, train one step and evaluate a tiny model on each backend."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .config import QuantizationMap
from .conversion import append_default_conversions, convert_to_quantized


def add_parser(subparsers) -> None:
    subparsers.add_parser("selfcheck", help="quick check that quantized training works on this machine")


def _one_backend(device: str) -> str:
    torch.manual_seed(0)
    qmap = QuantizationMap()
    qmap.default_qconfig.weight_quant.n_bits = 8
    qmap.default_qconfig.activation_quant.n_bits = 8
    append_default_conversions(qmap)
    model = convert_to_quantized(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), qmap).to(device)
    x = torch.randn(64, 16, device=device)
    model(x).square().mean().backward()
    model.eval()
    codes = model(x).unique().numel()
    return f"ok ({codes} distinct 8-bit outputs <= 256)" if codes <= 256 else f"FAILED ({codes} distinct outputs)"


def run(args) -> int:
    from . import __version__

    print(f"tquant {__version__}, torch {torch.__version__}, backend {kernels.get_backend()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        result = _one_backend(device)
        ok &= result.startswith("ok")
        print(f"  {device}: {result}")
    return 0 if ok else 1
