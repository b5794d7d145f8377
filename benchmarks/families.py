"""Five model families written the way users write them, for the deployment benchmark and tests.

None of them is built for tquant: ReLUs and residual adds live in ``forward``, batch norms follow
convs, pooling is functional. Each ``build_*`` returns ``(model, sample)`` where ``sample(batch)``
draws random inputs of the right shape (seeded by the caller). ``size="small"`` gives a model that
tests convert and export in about a second; ``"bench"`` the benchmark size.

- :class:`ResNetStyle`: stem conv-BN-ReLU, three stages of basic blocks (conv-BN-ReLU-conv-BN + identity
  or 1x1 conv-BN projection, ``F.relu(out + identity)``), ``F.adaptive_avg_pool2d``, ``torch.flatten``,
  a linear head;
- :class:`MobileNetV2Style`: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, BN and
  ReLU6 in ``nn.Sequential``, ``x + block(x)`` when the shape allows), ``x.mean((2, 3))``, a head;
- :class:`VGGStyle`: ``nn.Sequential`` features (3x3 conv + ``nn.ReLU``, ``nn.MaxPool2d``), flatten,
  a two-layer classifier with dropout;
- :class:`MLP`: ``x.flatten(1)``, linear layers with ``F.relu`` in ``forward``;
- :class:`TransformerStyle`: a linear token embedding plus a learned positional ``nn.Parameter``,
  pre-norm blocks with ``nn.MultiheadAttention`` and a GELU MLP, ``x.mean(1)`` pooling, a head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FAMILIES", "MLP", "MobileNetV2Style", "ResNetStyle", "TransformerStyle", "VGGStyle", "build"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetStyle(nn.Module):
    def __init__(self, width: int = 16, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Style(nn.Module):
    def __init__(self, width: int = 16, n_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(w, w, 1, 1),
            InvertedResidual(w, 3 * w // 2, 2, 6),
            InvertedResidual(3 * w // 2, 3 * w // 2, 1, 6),
            InvertedResidual(3 * w // 2, 2 * w, 2, 6),
            InvertedResidual(2 * w, 2 * w, 1, 6),
        )
        self.head = nn.Sequential(nn.Conv2d(2 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * w, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


class VGGStyle(nn.Module):
    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        w = width
        cfg = [w, w, "M", 2 * w, 2 * w, "M", 4 * w, "M"]
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * 4 * 4, 8 * w), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(8 * w, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    def __init__(self, hidden: int = 1024, n_in: int = 784, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerStyle(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, depth: int = 2, seq: int = 32, features: int = 64,
                 n_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def _images(size: int) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randn(batch, 3, size, size)


SIZES = {
    "resnet": {"small": dict(width=8), "bench": dict(width=16)},
    "mobilenet": {"small": dict(width=8), "bench": dict(width=16)},
    "vgg": {"small": dict(width=8), "bench": dict(width=32)},
    "mlp": {"small": dict(hidden=64, n_in=64), "bench": dict(hidden=1024, n_in=784)},
    "transformer": {"small": dict(d=32, heads=2, depth=1, seq=8, features=16),
                    "bench": dict(d=128, heads=4, depth=2, seq=32, features=64)},
}


def build(family: str, size: str = "bench", seed: int = 0) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """``(model in eval mode, sample)`` for a family name of :data:`FAMILIES` (seeded initialisation).

    Batch-norm running statistics are set to non-trivial values (as after training), so folding is
    exercised and the float model's outputs spread over the classes.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in ("small", "bench"):
        raise ValueError(f"size must be 'small' or 'bench', got {size!r}")
    torch.manual_seed(seed)
    kwargs = SIZES[family][size]
    model = FAMILIES[family](**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model.eval()
    if family == "mlp":
        side = int(kwargs["n_in"] ** 0.5)
        return model, lambda batch: torch.randn(batch, 1, side, side)
    if family == "transformer":
        return model, lambda batch: torch.randn(batch, kwargs["seq"], kwargs["features"])
    return model, _images(32)


FAMILIES: dict[str, type[nn.Module]] = {
    "resnet": ResNetStyle,
    "mobilenet": MobileNetV2Style,
    "vgg": VGGStyle,
    "mlp": MLP,
    "transformer": TransformerStyle,
}
"""Family name -> model class."""
