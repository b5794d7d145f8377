"""Start-up and whole-job wall times, each in a fresh process: what a user waits for.

Jobs (each run as a new Python process, timed from its start to its exit; compile and import costs
count, nothing is warmed up):

- ``cli:<args>``: the ``tquant`` command with ``--version``, ``--help`` and each subcommand's
  ``--help`` (budget: 0.5 s each);
- ``first-forward``: ``import tquant``, convert a 16-32-4 MLP to 8 bits and run its first
  quantized training forward + backward; the process also reports the import time and the first
  call's time (budget: 0.5 s for the first call);
- ``calibrate-mlp``: convert a 32-64-64-10 MLP, calibrate it on 8 batches (``estimate_ranges``),
  fix the ranges and evaluate;
- ``train-mlp``: 300 QAT steps (Adam) of a 64-256-256-10 MLP, batch 64;
- ``train-cnn``: 100 QAT steps of a two-conv CNN on 1x16x16 images, batch 32;
- ``demo``: ``tquant demo --no-progress`` with its defaults (the bundled digits, the whole job).

Configurations (``--env NAME=VALUE[,NAME=VALUE...]``, repeatable) run every job under other
environment variables, interleaved round by round (e.g. ``--env TQUANT_NUMBA=1 --env TQUANT_NUMBA=0``
compared a numba lane with the numpy one); without ``--env`` the environment as it is. Reports
medians and the ratio of each configuration's time to the first one's. Results go to
``./tquant-bench-results/<device>/startup.{csv,json,md}``.

Run: ``tquant bench startup [--quick] [--jobs ...] [--env ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common, options

CLI_BUDGET_S = 0.5
FIRST_FORWARD_BUDGET_S = 0.5

CLI_JOBS = options.STARTUP_CLI_JOBS

_QMAP = """
import tquant
qmap = tquant.QuantizationMap()
qmap.default_qconfig.weight_quant.n_bits = 8
qmap.default_qconfig.activation_quant.n_bits = 8
tquant.append_default_conversions(qmap)
"""

PY_JOBS = {
    "first-forward": """
import json, time
t0 = time.perf_counter()
import torch
from torch import nn
{qmap}
t1 = time.perf_counter()
model = tquant.convert_to_quantized(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), qmap)
x = torch.randn(64, 16)
t2 = time.perf_counter()
model(x).square().mean().backward()
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_forward_s": t3 - t2}}))
""",
    "calibrate-mlp": """
import torch
from torch import nn
{qmap}
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
qmodel = tquant.convert_to_quantized(model, qmap).eval()
tquant.estimate_ranges(qmodel)
with torch.no_grad():
    for _ in range(8):
        qmodel(torch.randn(64, 32))
tquant.fix_ranges(qmodel)
with torch.no_grad():
    qmodel(torch.randn(64, 32))
""",
    "train-mlp": """
import torch
from torch import nn
{qmap}
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
qmodel = tquant.convert_to_quantized(model, qmap)
opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
for _ in range(300):
    loss = nn.functional.cross_entropy(qmodel(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
""",
    "train-cnn": """
import torch
from torch import nn
{qmap}
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10))
qmodel = tquant.convert_to_quantized(model, qmap)
opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
for _ in range(100):
    loss = nn.functional.cross_entropy(qmodel(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
""",
}
JOBS = options.STARTUP_JOBS
QUICK_JOBS = options.STARTUP_QUICK_JOBS
CSV_FIELDS = ["run_id", "device", "torch", "job", "config", "median_s", "min_s", "max_s", "n", "ratio_vs_first",
              "import_s", "first_forward_s", "budget_s"]


def tquant_command() -> list[str]:
    """The ``tquant`` console script beside this Python (what a user runs), else ``python -m tquant.cli``."""
    script = Path(sys.executable).with_name("tquant")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tquant.cli"]


def command_of(job: str, scratch: Path) -> list[str]:
    if job in CLI_JOBS:
        return tquant_command() + CLI_JOBS[job]
    if job == "demo":
        return tquant_command() + ["demo", "--no-progress", "--out", str(scratch / "demo")]
    return [sys.executable, "-c", PY_JOBS[job].format(qmap=_QMAP)]


def run_once(job: str, env: dict[str, str], scratch: Path) -> tuple[float, dict]:
    """Wall seconds of one fresh process running ``job`` and the timings it printed (a JSON line), if any."""
    t0 = time.perf_counter()
    proc = subprocess.run(command_of(job, scratch), env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=scratch, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{job} exited with status {proc.returncode}: {proc.stderr.strip()[-800:]}")
    inner = {}
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if job in PY_JOBS and last and last[0].startswith("{"):
        inner = json.loads(last[0])
    return wall, inner


def run_benchmark(jobs, configs: list[dict[str, str]], reps: int, log=print) -> list[dict]:
    """Every (job, configuration) ``reps`` times, interleaved round by round; one row per pair."""
    labels = [",".join(f"{k}={v}" for k, v in c.items()) or "as is" for c in configs]
    samples = {(j, label): [] for j in jobs for label in labels}
    inner = {(j, label): [] for j in jobs for label in labels}
    scratch = Path(tempfile.mkdtemp(prefix="tquant-bench-startup-"))
    try:
        for rnd in range(reps):
            for job in jobs:
                for config, label in zip(configs, labels):
                    wall, extra = run_once(job, config, scratch)
                    samples[job, label].append(wall)
                    inner[job, label].append(extra)
                    log(f"round {rnd + 1}/{reps} {job:<28} [{label}] {wall:.3f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for job in jobs:
        first = statistics.median(samples[job, labels[0]])
        for label in labels:
            s = samples[job, label]
            extras = inner[job, label]
            row = {"job": job, "config": label, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                   "n": len(s), "ratio_vs_first": statistics.median(s) / first,
                   "budget_s": CLI_BUDGET_S if job in CLI_JOBS else None}
            for key in ("import_s", "first_forward_s"):
                values = [e[key] for e in extras if key in e]
                row[key] = statistics.median(values) if values else None
            if job == "first-forward":
                row["budget_s"] = FIRST_FORWARD_BUDGET_S
            rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """One line per budgeted row: the figure against its budget."""
    lines = []
    for r in rows:
        if r["budget_s"] is None:
            continue
        figure = r["first_forward_s"] if r["job"] == "first-forward" else r["median_s"]
        what = "first quantized forward + backward" if r["job"] == "first-forward" else f"`tquant {r['job'][4:]}`"
        ok = figure <= r["budget_s"]
        lines.append(f"- {what} [{r['config']}]: {figure:.3f} s, {'within' if ok else 'OVER'} the "
                     f"{r['budget_s']} s budget")
    return lines


def write_markdown(path: Path, env: dict, rows: list[dict], history: list[dict], notes: list[str]) -> None:
    parts = [
        f"# Start-up and whole-job wall times — {env['device']}",
        "",
        "Generated by `tquant bench startup`. Each figure is the median wall time of a fresh process (from its "
        "start to its exit: interpreter, imports and any compilation included), configurations interleaved "
        "round by round; *ratio* is a configuration's median over the first configuration's.",
        "",
        common.environment_markdown(env),
        "",
        "## Budgets",
        "",
        *verdicts(rows),
        "",
        "## This run",
        "",
        common.markdown_table(rows, [("job", "job", ""), ("config", "configuration", ""),
                                     ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"),
                                     ("max_s", "max s", ".3f"), ("n", "runs", ""), ("ratio_vs_first", "ratio", ".2f"),
                                     ("import_s", "import s", ".3f"), ("first_forward_s", "first call s", ".3f")]),
        "",
    ]
    runs = sorted({r["run_id"] for r in history})
    if len(runs) > 1:
        earlier = [r for r in history if r["run_id"] != runs[-1] and not r["job"].startswith("cli:")]
        if earlier:
            parts += ["## Whole jobs in earlier runs (startup.csv)", "",
                      common.markdown_table(earlier, [("run_id", "run", ""), ("job", "job", ""),
                                                      ("config", "configuration", ""), ("median_s", "median s", ".3f"),
                                                      ("ratio_vs_first", "ratio", ".2f"),
                                                      ("first_forward_s", "first call s", ".3f")]), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Command-line options (shared with ``tquant bench startup``)."""
    parser = parser or argparse.ArgumentParser(prog="python -m tquant.benchmarks.bench_startup",
                                               description=__doc__.splitlines()[0])
    return options.startup(parser)


def main(args: argparse.Namespace) -> int:
    """Run, write ``startup.{csv,json,md}`` into the results folder, print where."""
    out = common.resolve_out_dir(args, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or (QUICK_JOBS if args.quick else JOBS)
    configs = args.env or [{}]
    reps = args.reps or (1 if args.quick else 3)
    env = common.environment("cpu")
    print(f"bench startup on {env['device']} (load {env['loadavg_1m']}): {len(jobs)} jobs x {len(configs)} "
          f"configuration(s) x {reps} runs")
    rows = run_benchmark(jobs, configs, reps)
    history = common.record_run(out, "startup", env, rows, CSV_FIELDS, list(args.note))
    write_markdown(out / "startup.md", env, rows, history, list(args.note))
    for line in verdicts(rows):
        print(line[2:])
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
