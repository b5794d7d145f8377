"""Tiny model builders for model-level tests: a ResNet-style CNN, a transformer block, an MLP.

Each ``*_case`` returns ``(float_model, quantization_map, example_input, sample_fn)``:
``quantization_map`` converts every default layer (plus ``QuantBatchNorm2d`` for the CNN) and
quantizes the inputs of the layers that follow a float op (``QuantizedInputModule``), so that
every conv/matmul sits between DequantizeLinear inputs and a QuantizeLinear output in ONNX;
``sample_fn(batch)`` draws calibration/test inputs. :func:`calibrated` converts and calibrates.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import tquant


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity (or 1x1 strided projection), relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + s)


class ResNetCNN(nn.Module):
    """stem (conv, bn, relu, maxpool) → 2 basic blocks → global average pool → linear."""

    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TransformerBlock(nn.Module):
    """Token + position embedding → pre-LN self-attention (q/k/v/o) → pre-LN GELU MLP → LN → head."""

    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, seq: int = 16):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        h = self.ln1(x)
        d_head = h.shape[-1] // self.heads
        q, k, v = (p(h).view(b, t, self.heads, d_head).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_head), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x))


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_qmap(
    w_bits: int = 8,
    a_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    input_quant: tuple[str, ...] = (),
    batch_norm: bool = False,
) -> tquant.QuantizationMap:
    """Default conversions at the given bits; ``input_quant`` names get an input quantizer."""
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(w_bits, symmetric, per_channel)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(a_bits, symmetric)
    tquant.append_default_conversions(qmap)
    if batch_norm:
        qmap.module_qconfig_map[nn.BatchNorm2d] = tquant.QuantizedModuleConfig(
            tquant.QuantBatchNorm2d,
            tquant.QuantizationConfig(tquant.ActivationQuantConfig(a_bits, symmetric)),
        )
    for name in input_quant:
        qmap.input_activation_qconfig_map[name] = tquant.ActivationQuantConfig(a_bits, symmetric)
    return qmap


CNN_INPUTS = ("stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut", "fc")
TRANSFORMER_INPUTS = ("o", "fc2")
MLP_INPUTS = ("fc1",)


def cnn_case(**qkw):
    torch.manual_seed(0)
    model = ResNetCNN()
    return (
        model,
        make_qmap(input_quant=CNN_INPUTS, batch_norm=True, **qkw),
        lambda b: torch.randn(b, 3, 16, 16),
    )


def transformer_case(**qkw):
    torch.manual_seed(0)
    model = TransformerBlock()
    return model, make_qmap(input_quant=TRANSFORMER_INPUTS, **qkw), lambda b: torch.randint(0, 256, (b, 16))


def mlp_case(**qkw):
    torch.manual_seed(0)
    model = MLP()
    return model, make_qmap(input_quant=MLP_INPUTS, **qkw), lambda b: torch.randn(b, 64)


CASES = {"cnn": cnn_case, "transformer": transformer_case, "mlp": mlp_case}


def calibrated(model: nn.Module, qmap: tquant.QuantizationMap, sample, batches: int = 3, batch: int = 8):
    """Convert, run a few training forwards to set every range (and BN statistics), fix, eval."""
    torch.manual_seed(1)
    qmodel = tquant.convert_to_quantized(model, qmap)
    qmodel.train()
    with torch.no_grad():
        for _ in range(batches):
            qmodel(sample(batch))
    qmodel.eval()
    tquant.fix_ranges(qmodel)
    return qmodel
