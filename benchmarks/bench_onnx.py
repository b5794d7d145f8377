"""onnxruntime latency of tquant's int8 ONNX export against float and onnxruntime's own quantizer.

Subjects (CPU, onnxruntime CPU provider, 1 intra-op thread, batch 32):

- ``digits``: the demo's CNN (:class:`tquant.demo.DigitsCNN`) on scikit-learn's bundled digits,
  trained in float, then
  - ``float``: the float model exported with :func:`tquant.export.export_onnx`;
  - ``quantize_static``: onnxruntime's post-training quantizer on that float file (QDQ,
    per-channel, uint8 activations, int8 weights, a calibration reader over 8 training batches);
  - ``tquant W8A8``: QAT with the demo's map (folded ReLUs, one quantization per tensor) and the
    default export (int8 weights, uint8 activations, Linear as Gemm);
  - ``tquant W8A8 calibrated``: the same map, calibrated only (no QAT: post-training quantization);
  - ``tquant W8A8 unfolded``: the same QAT recipe with aihwkit's default conversion (no folding,
    every layer input quantized) exported with uint8-shifted weights (the export before issue 11);
  - ``tquant W8A8 recipe``: the deployment recipe of the model families (:func:`deploy.deploy_int8`:
    the graph path, calibration only), unchanged.
- ``encoder``: ``nn.TransformerEncoder`` (d 256, 4 heads, FFN 1024, 4 layers, sequence 32) on
  random inputs: float, ``quantize_static``, and tquant W8A8 (each layer converted to a
  :class:`~tquant.attention.QuantTransformerEncoderLayer`: quantized projections, attention
  matmuls, softmax, residual adds and norms, int32 biases; calibrated post-training on 4 random
  batches, no QAT); error = relative L2 distance to the float output.

All sessions of a subject are timed interleaved in one process (``common.bench_interleaved``,
order rotated every round); reported are medians and the ratios to float and to
``quantize_static``, the accuracy, the file size, and what onnxruntime's optimiser leaves
(:func:`tquant.export.ort_graph.optimized_graph`: Q/DQ nodes, fused integer nodes, float compute).
Results go to ``results/<device>/onnx.{csv,json,md}``, with the load average of the run.

- the model families of :mod:`tquant.benchmarks.families` (``resnet``, ``mobilenet``, ``vgg``, ``mlp``,
  ``transformer``), random weights and inputs: float, ``quantize_static`` (same 8 calibration
  batches), tquant's deployment recipe (:func:`tquant.benchmarks.deploy.deploy_int8`: the default
  8-bit map, folding, int32 biases and ``example_inputs``; no layer names) and Brevitas graph mode
  when it is installed (``tquant[peers]``); agreement = share of random inputs on which the file's
  argmax equals the float PyTorch model's; ``validates`` = ``validate_onnx(...).ok()``. Latency at
  batch 1 and 32.

Digits accuracy is measured over ``--seeds`` seeds (default :data:`DIGITS_SEEDS`): each seed is
a whole run of its own (the demo's split with that seed, float training, ``quantize_static``,
calibration and QAT), and the accuracy reported for a variant is the mean over the seeds, the
per-seed figures beside it. One test image is 0.22 % of the 450, so a single seed cannot tell
two quantizers apart that differ by less than seed noise; the acceptance check compares the
means. The timed and inspected files are seed 0's.

``--update`` reruns only ``--subjects`` in a results folder: their rows replace those of the previous
``onnx.json``/``onnx.md`` there, the other subjects' rows stay (each keeps its run id; the environment lists
the kept runs and their load), the acceptance lines are recomputed; ``onnx.csv`` gets the new rows only.

Run: ``python -m tquant.benchmarks.bench_onnx [--quick]`` or ``tquant bench onnx``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common, deploy, families, options

SUBJECTS = options.ONNX_SUBJECTS
BATCH = 32
DIGITS_SEEDS = options.DIGITS_SEEDS
CSV_FIELDS = [
    "run_id", "device", "onnxruntime", "subject", "variant", "median_ms", "p20_ms", "p80_ms", "n",
    "vs_float", "vs_quantize_static", "accuracy", "seeds", "accuracy_seeds", "rel_l2", "file_kib", "q_left", "dq_left",
    "integer_nodes", "float_nodes", "loadavg_1m", "median_ms_b1", "vs_float_b1", "vs_quantize_static_b1",
    "agreement", "validates",
]
ACCURACY_TOLERANCE = 1e-9
"""Percent: equal image counts give means that differ in the last bits (a sum of k/450 fractions)."""
TARGETS = {"vs_float": 0.9, "vs_quantize_static": 1.05}
"""Issue 11's acceptance for the digits W8A8 model: <= 0.9x float, <= 1.05x quantize_static."""
FAMILY_TARGETS = {"vs_float": 1.0, "vs_quantize_static": 1.05, "agreement": 95.0}
"""Issue 19's acceptance for each model family's tquant W8A8 file (batch 32): faster than float, no
slower than 1.05x ``quantize_static``, argmax equal to the float model's on >= 95 % of random inputs."""
NO_INTEGER_KERNEL = {"LayerNormalization", "Gelu"}
"""Float compute nodes onnxruntime has no integer kernel for (the only ones a family may keep)."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    return options.onnx(parser or argparse.ArgumentParser(description=__doc__.splitlines()[0]))


# -- onnxruntime ---------------------------------------------------------------------------------
def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def quantize_static_peer(float_path: Path, out_path: Path, batches: list[np.ndarray]) -> None:
    """onnxruntime's quantizer as a new user runs it: QDQ, per-channel, uint8 activations, int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = session(float_path).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: b} for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )


def _graph_fields(path: Path) -> dict:
    from tquant.export.ort_graph import optimized_graph

    g = optimized_graph(path)
    floats: dict[str, int] = {}
    for op, _ in g.float_nodes:
        floats[op] = floats.get(op, 0) + 1
    return {
        "file_kib": path.stat().st_size / 1024,
        "q_left": g.quantize,
        "dq_left": g.dequantize,
        "integer_nodes": " ".join(f"{k}:{v}" for k, v in g.integer_nodes.items()) or "-",
        "float_nodes": " ".join(f"{k}:{v}" for k, v in sorted(floats.items())) or "-",
    }


def time_sessions(paths: dict[str, Path], x: np.ndarray, reps: int, warmup: int) -> dict[str, dict]:
    """Interleaved medians of ``session.run`` on ``x`` for every file."""
    sessions = {name: session(p) for name, p in paths.items()}
    fns = {name: (lambda s=s: run_session(s, x)) for name, s in sessions.items()}
    samples = common.bench_interleaved(fns, reps=reps, warmup=warmup)
    return {name: common.summarize(v) for name, v in samples.items()}


# -- subjects ------------------------------------------------------------------------------------
def _qat(float_model: nn.Module, qmap, data, epochs: int, seed: int) -> nn.Module:
    import tquant
    from tquant import demo

    cpu = torch.device("cpu")
    qmodel = tquant.convert_to_quantized(float_model, qmap)
    demo.calibrate(qmodel, data, cpu)
    tquant.estimate_ranges_train(qmodel)
    demo.train(qmodel, data, epochs, demo.QAT_LR, seed, cpu, "QAT", False)
    tquant.fix_ranges(qmodel)
    return qmodel.eval()


def digits_files(directory: Path, epochs: int, qat_epochs: int, seed: int = 0):
    """Train, quantize and export the digits variants; returns ``(paths, x_test, y_test)``."""
    from tquant import demo
    from tquant.export import export_onnx

    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    data = demo.load_digits_split(seed)
    float_model = demo.DigitsCNN()
    demo.train(float_model, data, epochs, demo.FLOAT_LR, seed, cpu, "float", False)
    float_model.eval()
    example = data.x_test[:BATCH]
    paths = {name: directory / f"digits-{i}.onnx" for i, name in enumerate(
        ("float", "quantize_static", "tquant W8A8", "tquant W8A8 calibrated", "tquant W8A8 unfolded",
         "tquant W8A8 recipe"))}
    export_onnx(float_model, example, paths["float"])
    calib = [data.x_train[i:i + BATCH].numpy() for i in range(0, 8 * BATCH, BATCH)]
    quantize_static_peer(paths["float"], paths["quantize_static"], calib)
    folded = _qat(float_model, demo.quantization_map(8), data, qat_epochs, seed + 8)
    export_onnx(folded, example, paths["tquant W8A8"])
    calibrated = _qat(float_model, demo.quantization_map(8), data, 0, seed + 8)
    export_onnx(calibrated, example, paths["tquant W8A8 calibrated"])
    unfolded = _qat(float_model, demo.quantization_map(8, fold_activations=False), data, qat_epochs, seed + 8)
    export_onnx(unfolded, example, paths["tquant W8A8 unfolded"], signed_weights=False)
    deploy.deploy_int8(float_model, example, [torch.from_numpy(b) for b in calib], paths["tquant W8A8 recipe"])
    return paths, data.x_test.numpy(), data.y_test.numpy()


class Encoder(nn.Module):
    """``nn.TransformerEncoder``: d 256, 4 heads, FFN 1024, 4 layers, batch first, no dropout."""

    def __init__(self, d: int = 256, layers: int = 4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def encoder_files(directory: Path, quick: bool, seq: int = 32):
    """Export the encoder variants; returns ``(paths, x, float reference output)``."""
    import tquant
    from tquant.attention import QuantTransformerEncoderLayer
    from tquant.export import export_onnx

    # the fused eval fast path reads the weights directly and bypasses tquant's layers
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    model = Encoder(layers=1 if quick else 4).eval()
    sample = lambda b: torch.randn(b, seq, 256)  # noqa: E731
    x = sample(BATCH)
    paths = {name: directory / f"encoder-{i}.onnx" for i, name in enumerate(
        ("float", "quantize_static", "tquant W8A8"))}
    export_onnx(model, x, paths["float"])
    quantize_static_peer(paths["float"], paths["quantize_static"], [sample(BATCH).numpy() for _ in range(4)])
    qmap = tquant.QuantizationMap()
    qmap.default_qconfig.weight_quant = tquant.WeightQuantConfig(8, symmetric=True, per_channel=True)
    qmap.default_qconfig.activation_quant = tquant.ActivationQuantConfig(8)
    qmap.input_activation_qconfig_map[""] = tquant.ActivationQuantConfig(8)
    qmap.module_qconfig_map[nn.TransformerEncoderLayer] = tquant.QuantizedModuleConfig(
        QuantTransformerEncoderLayer, copy.deepcopy(qmap.default_qconfig)
    )
    qmap.quantize_bias = True
    tquant.append_default_conversions(qmap)
    qmodel = tquant.convert_to_quantized(model, qmap)
    tquant.estimate_ranges(qmodel)
    qmodel.eval()
    with torch.no_grad():
        for _ in range(4):
            qmodel(sample(BATCH))
    tquant.fix_ranges(qmodel)
    export_onnx(qmodel, x, paths["tquant W8A8"])
    with torch.no_grad():
        reference = model(x).numpy()
    return paths, x.numpy(), reference


def digits_accuracy(paths: dict[str, Path], x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Test accuracy (%) of every file in onnxruntime."""
    return {name: 100.0 * float((run_session(session(p), x_test).argmax(1) == y_test).mean())
            for name, p in paths.items()}


def digits_seeds(directory: Path, epochs: int, qat_epochs: int, seeds: int):
    """:func:`digits_files` for seeds ``0..seeds-1``.

    Returns seed 0's ``paths`` and ``x_test``, the accuracies ``{variant: [per seed]}`` and the
    number of test images per seed.
    """
    accuracies: dict[str, list[float]] = {}
    test_images = 0
    for seed in range(seeds):
        folder = directory / f"digits-seed{seed}"
        folder.mkdir()
        paths, x_test, y_test = digits_files(folder, epochs, qat_epochs, seed)
        for name, acc in digits_accuracy(paths, x_test, y_test).items():
            accuracies.setdefault(name, []).append(acc)
        test_images = len(y_test)
        if seed == 0:
            first = paths, x_test
    return (*first, accuracies, test_images)


def run_subject(subject: str, directory: Path, args) -> list[dict]:
    quick = args.quick
    reps = args.reps or (10 if quick else 300)
    warmup = args.warmup or (2 if quick else 10)
    if subject == "digits":
        epochs = args.epochs if args.epochs is not None else (1 if quick else 15)
        qat_epochs = args.qat_epochs if args.qat_epochs is not None else (1 if quick else 4)
        seeds = args.seeds if args.seeds is not None else (1 if quick else DIGITS_SEEDS)
        paths, x_test, accuracies, test_images = digits_seeds(directory, epochs, qat_epochs, seeds)
        x = np.ascontiguousarray(x_test[:BATCH])
    elif subject == "encoder":
        paths, x, reference = encoder_files(directory, quick)
    else:
        paths, x, agreement, notes = deploy.family_files(subject, directory, quick, BATCH)
        args.notes = getattr(args, "notes", []) + notes
    rows = []
    for name, path in paths.items():
        row = {"subject": subject, "variant": name, **_graph_fields(path)}
        if subject == "digits":
            per_seed = accuracies[name]
            row.update(accuracy=float(np.mean(per_seed)), seeds=len(per_seed), test_images=test_images,
                       accuracy_seeds=" ".join(f"{a:.2f}" for a in per_seed))
        elif subject == "encoder":
            out = run_session(session(path), x)
            row["rel_l2"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        else:
            row["agreement"] = agreement[name]
            if name == "tquant W8A8":
                row["validates"] = agreement["validates"]
        rows.append(row)
    load_before = os.getloadavg()[0]
    stats = time_sessions(paths, x, reps, warmup)
    stats_b1 = time_sessions(paths, np.ascontiguousarray(x[:1]), reps, warmup)
    for row in rows:
        s, s1 = stats[row["variant"]], stats_b1[row["variant"]]
        row.update(median_ms=s["median"], p20_ms=s["p20"], p80_ms=s["p80"], n=s["n"], median_ms_b1=s1["median"])
        row["vs_float"] = s["median"] / stats["float"]["median"]
        row["vs_quantize_static"] = s["median"] / stats["quantize_static"]["median"]
        row["vs_float_b1"] = s1["median"] / stats_b1["float"]["median"]
        row["vs_quantize_static_b1"] = s1["median"] / stats_b1["quantize_static"]["median"]
        row["loadavg_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
    return rows


# -- report ----------------------------------------------------------------------------------------
COLUMNS = [
    ("subject", "model", ""), ("variant", "variant", ""), ("median_ms", "median ms", ".3f"),
    ("vs_float", "x float", ".2f"), ("vs_quantize_static", "x quantize_static", ".2f"),
    ("median_ms_b1", "ms batch 1", ".3f"), ("vs_float_b1", "x float b1", ".2f"),
    ("vs_quantize_static_b1", "x q_static b1", ".2f"), ("agreement", "argmax = float %", ".1f"),
    ("validates", "validates", ""),
    ("accuracy", "accuracy %", ".2f"), ("rel_l2", "rel. L2 vs float", ".4f"), ("file_kib", "KiB", ".0f"),
    ("q_left", "Q left", ""), ("dq_left", "DQ left", ""), ("integer_nodes", "integer nodes", ""),
    ("float_nodes", "float compute nodes", ""), ("loadavg_1m", "load", ".2f"),
]


def _per_seed(row: dict) -> list[float]:
    return [float(a) for a in str(row.get("accuracy_seeds") or "").split()]


def _seeds_note(row: dict, peer: dict) -> str:
    """``" (mean of N seeds; test images vs quantize_static per seed: +1 0 -1)"`` for several seeds."""
    mine, theirs = _per_seed(row), _per_seed(peer)
    if len(mine) < 2 or len(mine) != len(theirs):
        return ""
    n = int(row.get("test_images") or 0)
    images = [round((a - b) * n / 100) for a, b in zip(mine, theirs)]
    diff = " ".join(f"{d:+d}" if d else "0" for d in images)
    return f" (mean of {len(mine)} seeds; test images vs quantize_static per seed: {diff})"


def checks(rows: list[dict]) -> list[str]:
    """The acceptance lines of issue 11 that this run measured, each with PASS/FAIL.

    Digits accuracy compares the means over the seeds (:data:`DIGITS_SEEDS`) of the run.
    """
    lines = []
    by = {(r["subject"], r["variant"]): r for r in rows}
    w8, peer = by.get(("digits", "tquant W8A8")), by.get(("digits", "quantize_static"))
    if w8 and peer:
        for key, target in TARGETS.items():
            ok = w8[key] <= target
            lines.append(f"digits tquant W8A8 {key} = {w8[key]:.2f} (target <= {target}): {'PASS' if ok else 'FAIL'}")
        for name in ("tquant W8A8", "tquant W8A8 calibrated"):
            row = by.get(("digits", name))
            if row is None:
                continue
            ok = row["accuracy"] >= peer["accuracy"] - ACCURACY_TOLERANCE
            if name == "tquant W8A8":
                verdict = "PASS" if ok else "FAIL"
            else:  # calibration without QAT is not the delivered model: shown for reference only
                verdict = "for reference (no QAT; not an acceptance point): " + ("not behind" if ok else "behind")
            lines.append(f"digits {name} accuracy {row['accuracy']:.2f}% vs quantize_static "
                         f"{peer['accuracy']:.2f}%{_seeds_note(row, peer)}: {verdict}")
    lines += family_checks(rows)
    enc, epeer = by.get(("encoder", "tquant W8A8")), by.get(("encoder", "quantize_static"))
    if enc and epeer:
        ok = enc["vs_quantize_static"] <= 1.0
        lines.append(f"encoder tquant x quantize_static = {enc['vs_quantize_static']:.2f} (target <= 1.0): "
                     f"{'PASS' if ok else 'FAIL'}")
        ok = enc["rel_l2"] < epeer["rel_l2"]
        lines.append(f"encoder rel. L2 {enc['rel_l2']:.4f} vs quantize_static {epeer['rel_l2']:.4f}: "
                     f"{'PASS' if ok else 'FAIL'}")
    return lines


def family_checks(rows: list[dict]) -> list[str]:
    """Issue 19's acceptance lines (PASS/FAIL) for each model family this run measured."""
    lines = []
    for family in families.FAMILIES:
        mine = next((r for r in rows if r["subject"] == family and r["variant"] == "tquant W8A8"), None)
        if mine is None:
            continue
        floats = {op for op in str(mine.get("float_nodes") or "-").split() if op != "-"}
        floats = {op.split(":")[0] for op in floats} - NO_INTEGER_KERNEL
        verdicts = [
            ("x float", mine["vs_float"], mine["vs_float"] < FAMILY_TARGETS["vs_float"], "< 1"),
            ("x quantize_static", mine["vs_quantize_static"],
             mine["vs_quantize_static"] <= FAMILY_TARGETS["vs_quantize_static"], "<= 1.05"),
            ("argmax = float %", mine["agreement"], mine["agreement"] >= FAMILY_TARGETS["agreement"], ">= 95"),
        ]
        text = ", ".join(f"{k} {v:.2f} ({t}: {'PASS' if ok else 'FAIL'})" for k, v, ok, t in verdicts)
        text += f", validate_onnx ok: {'PASS' if mine.get('validates') else 'FAIL'}"
        text += f", float ops with an integer kernel left: {', '.join(sorted(floats)) or 'none'} " \
                f"({'PASS' if not floats else 'FAIL'})"
        lines.append(f"{family} tquant W8A8 (batch {BATCH}): {text}")
    return lines


def _seed_table(rows: list[dict]) -> list[str]:
    """The digits accuracy per seed (markdown lines), when the run had more than one seed."""
    from tquant import demo

    digits = [r for r in rows if r["subject"] == "digits" and len(_per_seed(r)) > 1]
    if not digits:
        return []
    n, images = len(_per_seed(digits[0])), int(digits[0].get("test_images") or 0)
    lines = [
        "## Digits accuracy by seed",
        "",
        f"Each seed is a whole run: the demo's stratified split with that seed ({images} test images), "
        "float training, `quantize_static`, calibration and QAT (`tquant.demo` recipe: "
        f"Adam, one-cycle, QAT peak rate {demo.QAT_LR:g}). The accuracy % column above is the mean; "
        f"one test image is {100 / max(images, 1):.2f} %, so a single seed cannot separate variants that "
        "differ by less than the seed-to-seed noise. Timed files: seed 0.",
        "",
        "| variant | " + " | ".join(f"seed {i}" for i in range(n)) + " | mean |",
        "|---|" + "---|" * (n + 1),
    ]
    for r in digits:
        cells = [f"{a:.2f}" for a in _per_seed(r)] + [f"{r['accuracy']:.2f}"]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def kept_results(out: Path, rerun: set[str]) -> tuple[list[dict], list[str], dict[str, dict]]:
    """What ``--update`` keeps of the previous ``out/onnx.json``: the rows of the subjects not in ``rerun``,
    their notes (not the acceptance lines: those are recomputed) and ``{run id: {subjects, load}}`` of the
    runs those rows come from. Nothing when there is no previous file."""
    path = out / "onnx.json"
    if not path.exists():
        return [], [], {}
    previous = json.loads(path.read_text(encoding="utf-8"))
    env, rows = previous.get("environment", {}), previous.get("rows", [])
    kept = [r for r in rows if r.get("subject") not in rerun]
    acceptance = set(checks(rows))
    notes = [n for n in previous.get("notes", []) if n not in acceptance and n.split(" ", 1)[0] not in rerun]
    load_keys = ("loadavg_1m", "loadavg_1m_end", "busy")
    runs: dict[str, dict] = {}
    for r in kept:
        run_id = str(r.get("run_id"))
        earlier = env.get("kept_runs", {}).get(run_id) or {k: env.get(k) for k in load_keys}
        entry = runs.setdefault(run_id, {**{k: earlier.get(k) for k in load_keys}, "subjects": []})
        if r["subject"] not in entry["subjects"]:
            entry["subjects"].append(r["subject"])
    return kept, notes, runs


def _subject_order(row: dict) -> int:
    return SUBJECTS.index(row["subject"]) if row.get("subject") in SUBJECTS else len(SUBJECTS)


def _kept_runs_markdown(env: dict) -> list[str]:
    lines = []
    for run_id, run in env.get("kept_runs", {}).items():
        busy = ", busy" if run.get("busy") else ""
        lines.append(f"- kept with --update: {', '.join(run['subjects'])} from run {run_id} (load "
                     f"{run.get('loadavg_1m')} at the start, {run.get('loadavg_1m_end')} at the end{busy})")
    return lines


def write_markdown(path: Path, env: dict, rows: list[dict], notes: list[str] = ()) -> None:
    text = [
        "# ONNX latency: tquant int8 vs float vs onnxruntime.quantization.quantize_static",
        "",
        f"onnxruntime {env.get('onnxruntime')}, CPU provider, 1 intra-op thread, batch {BATCH}; "
        "interleaved medians in one process (see benchmarks/bench_onnx.py).",
        "",
        common.environment_markdown(env),
        *_kept_runs_markdown(env),
        "",
        common.markdown_table(rows, COLUMNS),
        "",
        *_seed_table(rows),
        "## Acceptance (issue 11: digits and encoder; issue 19: model families)",
        "",
        *[f"- {line}" for line in checks(rows)],
        "",
        *(["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []),
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    """Run, write ``onnx.{csv,json,md}`` into the results folder, print the table and where."""
    import onnxruntime

    torch.set_num_threads(args.threads or 1)
    device = torch.device("cpu")
    out = common.resolve_out_dir(args, device)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment(device)
    env["onnxruntime"] = onnxruntime.__version__
    print(f"bench_onnx on {env['device']} (load {env['loadavg_1m']}), onnxruntime {env['onnxruntime']}, 1 thread")
    kept, kept_notes, kept_runs = kept_results(out, set(args.subjects)) if args.update else ([], [], {})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tquant-bench-onnx-") as tmp:
        for subject in args.subjects:
            rows += run_subject(subject, Path(tmp), args)
    notes = getattr(args, "notes", [])
    common.record_run(out, "onnx", env, rows, CSV_FIELDS, notes=checks(rows) + notes, tags=("onnxruntime",))
    if kept:
        env["kept_runs"] = kept_runs
        rows, notes = sorted(kept + rows, key=_subject_order), notes + kept_notes
        common.write_json(out / "onnx.json", env, rows, checks(rows) + notes)
    write_markdown(out / "onnx.md", env, rows, notes)
    print(common.markdown_table(rows, COLUMNS))
    for line in checks(rows) + notes:
        print(line)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
