"""QAT training step (forward + backward + SGD step), float vs tquant vs torch.ao, eager and compiled.

Models: ``mlp`` and ``cnn`` (small, the CPU default), ``resnet50`` (torchvision, batch 128, 224x224,
channels_last) and ``encoder`` (8 x ``nn.TransformerEncoderLayer(2048, 16, 8192, norm_first=True)``,
8 x 1024 tokens) — the GPU default (``--device cuda``), where every step runs under bf16 autocast.

Variants, side by side in one process on the same batch and the same initial weights:

- ``float``: the plain model;
- ``tquant``: ``tquant.convert_to_quantized`` with 8-bit per-channel symmetric weights
  (``current_minmax``) and 8-bit output activations (``running_minmax``), the default
  conversions (``append_default_conversions``), backend ``auto`` (Triton on CUDA tensors);
- ``torch.ao``: eager-mode ``torch.ao.quantization`` QAT — ``QuantStub``/``DeQuantStub``
  around the model, Linear/Conv + ReLU fused with ``fuse_modules_qat`` where the model names
  them, the default ``x86`` QAT qconfig (fused moving-average observer/fake-quant for
  activations, per-channel symmetric weights), ``prepare_qat``;
- ``float+compile`` / ``tquant+compile``: the same models under ``torch.compile`` (default
  inductor backend; ``--no-compile`` leaves them out).

Reported: the median step time of each variant, its overhead over the float step of the same
mode (``tquant / float``, ``tquant+compile / float+compile``), and on CUDA the peak memory of a
step. Results go to ``./tquant-bench-results/<device>/qat.{csv,json,md,png}`` unless ``--out``.

Run: ``python -m tquant.benchmarks.bench_qat [--quick] [--device cuda]`` or ``tquant bench qat``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import common, options

VARIANTS = ("float", "tquant", "torch.ao", "float+compile", "tquant+compile")
MODELS = options.QAT_MODELS
DEFAULT_MODELS = {"cpu": ("mlp", "cnn"), "cuda": ("resnet50", "encoder")}
BASELINE = {"tquant": "float", "torch.ao": "float", "tquant+compile": "float+compile", "float+compile": "float"}
BATCH = 64
CSV_FIELDS = [
    "run_id",
    "device",
    "torch",
    "model",
    "batch",
    "variant",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "n",
    "overhead_vs_float",
    "fake_quantizers",
    "peak_mem_mb",
]


class MLP(nn.Module):
    """``in -> hidden -> hidden -> 10`` with ReLUs (named for ``fuse_modules_qat``)."""

    def __init__(self, in_features: int = 512, hidden: int = 1024, classes: int = 10):
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(in_features, hidden), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(hidden, hidden), nn.ReLU()
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (32, 64, 128 channels, the last two strided) + global pool + linear."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, width, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


FUSE = {
    "mlp": [["fc1", "relu1"], ["fc2", "relu2"]],
    "cnn": [["conv1", "relu1"], ["conv2", "relu2"], ["conv3", "relu3"]],
}


def build_model(name: str, quick: bool, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The float model on ``device``, an input batch and its targets (seeded; smaller with ``quick``)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = MLP(256, 256) if quick else MLP()
        x = torch.randn(BATCH, model.fc1.in_features, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
    elif name == "cnn":
        model = SmallCNN(8) if quick else SmallCNN()
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
    elif name == "resnet50":
        try:
            from torchvision.models import resnet50
        except ImportError as err:
            raise RuntimeError("the resnet50 model needs torchvision") from err
        batch, size = (8, 64) if quick else (128, 224)
        model = resnet50(weights=None).to(memory_format=torch.channels_last)  # random weights: no download
        x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), generator=gen)
    elif name == "encoder":
        d, heads, ff, layers, batch, tokens = (256, 4, 1024, 2, 2, 128) if quick else (2048, 16, 8192, 8, 8, 1024)
        model = nn.Sequential(*[nn.TransformerEncoderLayer(d, heads, ff, norm_first=True, batch_first=True)
                                for _ in range(layers)])
        x = torch.randn(batch, tokens, d, generator=gen)
        y = torch.randn(batch, tokens, d, generator=gen)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device), x.to(device), y.to(device)


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for the classifiers, mean squared error for the encoder (fp32)."""
    if name == "encoder":
        return F.mse_loss(out.float(), y)
    return F.cross_entropy(out.float(), y)


def tquant_model(model: nn.Module) -> nn.Module:
    """8-bit per-channel weights and 8-bit activations with tquant's default conversions."""
    import tquant

    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, True, True)
    qmap.default_qconfig.activation_quant.n_bits = 8
    tquant.append_default_conversions(qmap)
    with warnings.catch_warnings():  # the conversion summary (attention stays float) is not news here
        warnings.simplefilter("ignore")
        return tquant.convert_to_quantized(copy.deepcopy(model), qmap)


class _AOWrapper(nn.Module):
    """QuantStub -> model -> DeQuantStub, as eager-mode torch.ao QAT requires."""

    def __init__(self, body: nn.Module):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.body, self.dequant = QuantStub(), body, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


def _fp32_fake_quant(module: nn.Module) -> None:
    """Run a torch.ao fake-quant module in fp32 on half/bf16 input and hand back the input's dtype: its
    fused op takes fp32 only ("expected scalar type BFloat16 but found Float" under bf16 autocast), so a
    bf16 user pays these two casts."""
    forward = module.forward

    def fp32_forward(x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return forward(x.float()).to(x.dtype)
        return forward(x)

    module.forward = fp32_forward


def torch_ao_model(model: nn.Module, name: str) -> nn.Module:
    """Eager torch.ao QAT: fuse Linear/Conv+ReLU, default ``x86`` QAT qconfig, ``prepare_qat``.

    ``nn.MultiheadAttention`` keeps no qconfig (eager torch.ao QAT cannot swap its projections), so for
    the encoder torch.ao quantizes the feed-forward linears only; fake quantizers run in fp32 (see
    :func:`_fp32_fake_quant`)."""
    with warnings.catch_warnings():  # torch.ao's deprecation and reduce_range notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import FakeQuantizeBase, fuse_modules_qat, get_default_qat_qconfig, prepare_qat

        body = copy.deepcopy(model).train()
        if name in FUSE:
            body = fuse_modules_qat(body, FUSE[name])
        wrapped = _AOWrapper(body).train()
        wrapped.qconfig = get_default_qat_qconfig("x86")
        for module in wrapped.modules():
            if isinstance(module, nn.MultiheadAttention):
                module.qconfig = None
        prepared = prepare_qat(wrapped)
        for module in prepared.modules():
            if isinstance(module, FakeQuantizeBase):
                _fp32_fake_quant(module)
        return prepared


def count_fake_quantizers(model: nn.Module) -> int:
    """Quantizer modules in a model (tquant managers or torch.ao fake-quant modules)."""
    from torch.ao.quantization import FakeQuantizeBase

    try:
        from tquant import QuantizationManager
    except ImportError:  # pragma: no cover
        QuantizationManager = ()
    return sum(isinstance(m, (FakeQuantizeBase, QuantizationManager)) for m in model.modules())


def make_step(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step: zero grads, forward (bf16 autocast on CUDA), loss, backward, SGD (momentum 0.9)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = x.is_cuda

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = loss_fn(name, out, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_variants(model: nn.Module, name: str, compile_: bool, log=print) -> dict[str, nn.Module]:
    """The variants of one float model (a variant that cannot be built here is left out, with a note)."""
    variants = {"float": copy.deepcopy(model), "tquant": tquant_model(model)}
    try:
        variants["torch.ao"] = torch_ao_model(model, name)
    except Exception as err:  # noqa: BLE001 - torch.ao cannot prepare every model
        log(f"  {name}: torch.ao left out ({type(err).__name__}: {err})")
    if compile_:
        variants["float+compile"] = torch.compile(copy.deepcopy(model))
        variants["tquant+compile"] = torch.compile(tquant_model(model))
    return variants


def step_peak_mb(step: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated during one step on CUDA (MiB), None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_benchmark(models, *, quick: bool, reps: int | None, warmup: int | None, device: torch.device | str = "cpu",
                  compile_: bool = True, log=print) -> list[dict]:
    """Time every variant of every model, interleaved; returns the rows."""
    device = torch.device(device)
    rows = []
    for name in models:
        model, x, y = build_model(name, quick, device)
        variants = build_variants(model, name, compile_, log)
        steps = {}
        for v, m in variants.items():
            step = make_step(m, name, x, y)
            try:
                step()  # compiles the compiled variants; fails fast for a variant that cannot run here
            except Exception as err:  # noqa: BLE001
                log(f"  {name}: {v} left out ({type(err).__name__}: {str(err).splitlines()[0]})")
                continue
            steps[v] = step
        samples = common.bench_interleaved(
            steps,
            reps=reps or (4 if quick else (80 if name == "mlp" else 40)),
            warmup=warmup if warmup is not None else (1 if quick else 5),
            device=device,
            max_seconds=None if quick else 60.0,
            desc=f"qat {name}",
        )
        stats = {v: common.summarize(s) for v, s in samples.items()}
        for v, st in stats.items():
            base = stats.get(BASELINE.get(v, "float"), stats["float"])["median"]
            rows.append(
                {
                    "model": name,
                    "batch": x.shape[0],
                    "variant": v,
                    "median_ms": st["median"],
                    "p20_ms": st["p20"],
                    "p80_ms": st["p80"],
                    "n": st["n"],
                    "overhead_vs_float": st["median"] / base,
                    "fake_quantizers": count_fake_quantizers(variants[v]),
                    "peak_mem_mb": step_peak_mb(steps[v], device),
                }
            )
        log(
            f"{name:<8} "
            + "  ".join(f"{r['variant']}={r['median_ms']:.3f}ms (x{r['overhead_vs_float']:.3f})"
                        for r in rows if r["model"] == name)
        )
    return rows


def write_markdown(path: Path, env: dict, rows: list[dict], history: list[dict]) -> None:
    """The run's table, the acceptance verdict per model, and the overheads of every recorded run."""
    parts = [
        f"# QAT training step, 8-bit weights and activations — {env['device']}",
        "",
        "Generated by `python -m tquant.benchmarks.bench_qat`. One step = zero_grad, forward (bf16 autocast on "
        "CUDA), loss, backward, SGD (momentum); medians of interleaved repetitions; overhead = variant step / "
        "float step of the same mode (compiled variants over `float+compile`). MLP 512-1024-1024-10 and CNN "
        "(3x3 convs 32/64/128 channels on 32x32 inputs, global pool, linear) at batch 64; torchvision ResNet-50 "
        "at batch 128, 224x224, channels_last; encoder = 8 x TransformerEncoderLayer(2048, 16, 8192, "
        "norm_first) on 8 x 1024 tokens. tquant: 8-bit per-channel symmetric weights (current min/max), "
        "running-min/max 8-bit output activations. torch.ao: eager QAT, Linear/Conv+ReLU fused where named, "
        "default x86 QAT qconfig (per-channel weights, fused moving-average observer/fake-quant activations), "
        "QuantStub at the input. Peak = memory allocated at the peak of one step (CUDA only).",
        "",
        common.environment_markdown(env),
        "",
        common.markdown_table(
            rows,
            [
                ("model", "model", ""),
                ("variant", "variant", ""),
                ("median_ms", "step ms", ".3f"),
                ("p20_ms", "p20 ms", ".3f"),
                ("p80_ms", "p80 ms", ".3f"),
                ("overhead_vs_float", "overhead vs float", ".3f"),
                ("fake_quantizers", "quantizers", ""),
                ("peak_mem_mb", "peak MiB", ".0f"),
            ],
        ),
        "",
    ]
    for model in MODELS:
        by = {r["variant"]: r for r in rows if r["model"] == model}
        if "tquant" in by and "torch.ao" in by:
            t, a = by["tquant"]["overhead_vs_float"], by["torch.ao"]["overhead_vs_float"]
            verdict = "no more than" if t <= a else "MORE than"
            parts.append(
                f"- **Acceptance, {model}:** tquant's overhead ({t:.3f}x) is {verdict} torch.ao's ({a:.3f}x)."
            )
        if "tquant" in by and "tquant+compile" in by:
            e, c = by["tquant"]["median_ms"], by["tquant+compile"]["median_ms"]
            verdict = "not slower than" if c <= e else "SLOWER than"
            parts.append(
                f"- **Compiled, {model}:** the compiled tquant step ({c:.3f} ms) is {verdict} the eager one "
                f"({e:.3f} ms); overhead over compiled float {by['tquant+compile']['overhead_vs_float']:.3f}x."
            )
    parts.append("")
    runs: dict[tuple, dict] = {}
    for r in history:
        if r.get("variant") in ("tquant", "torch.ao"):
            runs.setdefault((r["run_id"], r["model"]), {"run": r["run_id"], "model": r["model"]})[
                r["variant"]
            ] = r["overhead_vs_float"]
    if runs:
        parts += [
            "## Overheads in every run recorded in qat.csv",
            "",
            common.markdown_table(
                list(runs.values()),
                [
                    ("run", "run", ""),
                    ("model", "model", ""),
                    ("tquant", "tquant overhead", ".3f"),
                    ("torch.ao", "torch.ao overhead", ".3f"),
                ],
            ),
            "",
        ]
    path.write_text("\n".join(parts), encoding="utf-8")


def plot(path: Path, env: dict, rows: list[dict]) -> bool:
    """Grouped bars of the step-time overhead over float per model. False without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return False
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [
            next((r["overhead_vs_float"] for r in rows if r["model"] == m and r["variant"] == v), 0.0)
            for m in models
        ]
        bars = ax.bar([k + (i - (len(variants) - 1) / 2) * width for k in range(len(models))], vals, width, label=v)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("step time / float step")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend()
    ax.set_title(f"QAT step overhead, 8-bit W/A — {env['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Command-line options (shared with ``tquant bench qat``)."""
    parser = parser or argparse.ArgumentParser(prog="python -m tquant.benchmarks.bench_qat",
                                               description=__doc__.splitlines()[0])
    return options.qat(parser)


def main(args: argparse.Namespace) -> int:
    """Run, write ``qat.{csv,json,md,png}`` into the results folder, print where."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_qat: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    models = args.models or list(DEFAULT_MODELS[device.type])
    out = common.resolve_out_dir(args, device)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment(device)
    print(
        f"bench_qat on {env['device']} ({env['threads']} threads, load {env['loadavg_1m']}), "
        f"torch {env['torch']}"
    )
    rows = run_benchmark(models, quick=args.quick, reps=args.reps, warmup=args.warmup, device=device,
                         compile_=not getattr(args, "no_compile", False))
    history = common.record_run(out, "qat", env, rows, CSV_FIELDS)
    write_markdown(out / "qat.md", env, rows, history)
    if not args.no_plot and not plot(out / "qat.png", env, rows):
        print("matplotlib not installed: no plot")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
