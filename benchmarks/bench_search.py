"""MSE / cross-entropy range searches: tquant vs aihwkit's algorithm, side by side in one process.

One estimator call (``forward`` of the range estimator on a weight, after one warm-up call that
fixes the search space), for the searches of aihwkit's ``MSE_Estimator`` and
``CrossEntropyEstimator`` (8 bits, 100 candidates, ``range_margin=0.5``, per tensor):

- ``grid-sym``: 1-D grid, symmetric quantizer, Student-t (3 dof) 1024x1024 weight (the issue's case);
- ``grid-asym``: 2-D grid (100 ranges x 64 skews x 2 signs), asymmetric, same weight;
- ``golden-sym`` / ``golden-asym``: golden-section search (aihwkit: scipy's bounded Brent), same weight;
- ``ce-grid-sym``: cross-entropy 1-D grid on 256x1000 logits (softmax over dim 1).

Providers:

- ``tquant``: ``tquant.MSE_Estimator`` / ``CrossEntropyEstimator`` on the device (the torch path on the
  CPU, the Triton kernel on CUDA);
- ``aihwkit``: aihwkit 1.2.0's own estimator classes, when ``aihwkit.simulator.digital_low_precision``
  imports (aihwkit's pure-Python package; ``TQUANT_AIHWKIT_SRC=/path/to/aihwkit-1.2.0/src`` makes
  an unpacked source archive importable without building aihwkit's C++ extension);
- ``aihwkit-algo``: a faithful eager re-implementation of aihwkit's algorithm (a per-tensor temporary
  quantizer per candidate, Python loops, scipy ``minimize_scalar``), used when aihwkit itself is not
  importable (or asked for with ``--providers``).

Reported: medians of interleaved repetitions, speed-up = aihwkit time / tquant time, and whether the
two picked the same range. Results go to ``results/<device>/search.{csv,json,md,png}``; with CUDA
present the cases also run on the GPU (results in the GPU's folder).

Run: ``python -m tquant.benchmarks.bench_search [--quick]`` or ``tquant bench search``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from . import common, options

CASES = {
    # name: (symmetric, opt_method name, loss, data kind)
    "grid-sym": (True, "grid", "mse", "weight"),
    "grid-asym": (False, "grid", "mse", "weight"),
    "golden-sym": (True, "golden_section", "mse", "weight"),
    "golden-asym": (False, "golden_section", "mse", "weight"),
    "ce-grid-sym": (True, "grid", "cross_entropy", "logits"),
}
PROVIDERS = options.SEARCH_PROVIDERS
N_BITS = 8
TARGETS = {"cpu": {"grid-sym": 3.0, "grid-asym": 2.0, "golden-sym": 1.0},
           "cuda": {"grid-sym": 50.0, "grid-asym": 50.0, "golden-sym": 5.0}}
"""Acceptance speed-ups (aihwkit time / tquant time) of issue 10, per device type."""

CSV_FIELDS = [
    "run_id", "device", "torch", "case", "shape", "num_candidates", "provider", "median_ms", "p20_ms",
    "p80_ms", "n", "speedup_vs_aihwkit", "baseline", "x_min", "x_max", "same_range", "loadavg_1m",
]


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def make_data(kind: str, quick: bool, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "weight":
        shape = (64, 64) if quick else (1024, 1024)
        torch.manual_seed(0)  # StudentT samples from the global generator
        t = torch.distributions.StudentT(torch.tensor(3.0)).sample(shape) * 0.02
        return t.to(device)
    shape = (16, 10) if quick else (256, 1000)
    return (torch.randn(shape, generator=gen) * 3.0).to(device)


# -- providers: each returns an estimator whose forward(x) -> (x_min, x_max) --------------------
def setup_tquant(symmetric: bool, opt: str, loss: str, num_candidates: int):
    import tquant
    from tquant.quantizers import AsymmetricUniformQuantizer, SymmetricUniformQuantizer

    q = (SymmetricUniformQuantizer if symmetric else AsymmetricUniformQuantizer)(N_BITS)
    cls = tquant.MSE_Estimator if loss == "mse" else tquant.CrossEntropyEstimator
    return cls(num_candidates, getattr(tquant.OptMethod, opt), 0.5, quantizer=q)


def _import_aihwkit():
    src = os.environ.get("TQUANT_AIHWKIT_SRC")
    if src and src not in sys.path:
        sys.path.insert(0, src)
    try:
        from aihwkit.simulator.digital_low_precision import quantizers, range_estimators
    except Exception as err:  # ImportError, or a broken install
        raise Skip(f"aihwkit: not importable ({type(err).__name__}: {err})") from err
    return quantizers, range_estimators


def setup_aihwkit(symmetric: bool, opt: str, loss: str, num_candidates: int):
    aq, are = _import_aihwkit()
    q = (aq.SymmetricUniformQuantizer if symmetric else aq.AsymmetricUniformQuantizer)(N_BITS)
    cls = are.MSE_Estimator if loss == "mse" else are.CrossEntropyEstimator
    return cls(num_candidates, getattr(are.OptMethod, opt), 0.5, quantizer=q)


class AihwkitAlgo:
    """aihwkit 1.2.0's ``MSE_Estimator`` / ``CrossEntropyEstimator`` algorithm, re-implemented eagerly.

    Same loops and the same per-candidate work: the candidate range goes through a temporary
    per-tensor quantizer (aihwkit's ``set_quant_range`` math, then ``scale * (clamp(round(x / scale)
    + zp, qmin, qmax) - zp)``), the loss is taken per candidate and read back to the host
    (aihwkit's ``to_numpy``), golden section is scipy's bounded ``minimize_scalar``. It skips
    aihwkit's per-candidate ``deepcopy`` of the quantizer, so it is if anything faster than aihwkit.
    """

    def __init__(self, symmetric: bool, opt: str, loss: str, num_candidates: int):
        self.symmetric, self.opt, self.loss, self.n = symmetric, opt, loss, num_candidates
        self.skew = 2**N_BITS // 4
        self.loss_array = None

    def quantize(self, x, neg, pos):
        x_min = min(float(neg), 0.0)
        x_max = max(float(pos), 1e-8)
        t_min, t_max = torch.tensor(x_min).float(), torch.tensor(x_max).float()
        if self.symmetric:
            signed = bool(t_min < 0)  # aihwkit's ``signed`` property reads the flag back (.item())
            qmax = 2.0 ** (N_BITS - 1) - 1 if signed else 2.0**N_BITS - 1
            qmin = -(2.0 ** (N_BITS - 1)) if signed else 0.0
            scale = torch.clamp(torch.maximum(t_min.abs(), t_max) / qmax, min=1e-8).to(x.device)
            return scale * torch.clamp(torch.round(x / scale), qmin, qmax)
        full = 2.0**N_BITS - 1
        delta = (t_max - t_min) / full
        zp = torch.clamp(torch.round(-t_min / delta), 0, full).to(x.device)
        scale = torch.clamp(delta, min=1e-8).to(x.device)
        return scale * (torch.clamp(torch.round(x / scale) + zp, 0, full) - zp)

    def loss_fx(self, x, neg, pos):
        y = self.quantize(x, neg, pos)
        if self.loss == "mse":
            return float(torch.sum(((x - y) ** 2).view(len(x), -1), dim=1).sum())
        return float(torch.sum(-torch.softmax(x, dim=1) * torch.log_softmax(y, dim=1)))

    def __call__(self, x):
        import numpy as np
        from scipy.optimize import minimize_scalar

        if self.loss_array is None:
            self.one_sided = bool((x.min() >= 0).item())
            if self.one_sided or self.symmetric:
                self.max_pos = max(abs(float(x.min())), float(x.max())) + 0.5
                self.max_neg, self.search = -self.max_pos, self.max_pos
                self.loss_array = np.zeros(self.n + 1)
            else:
                self.max_pos, self.max_neg = float(x.max()) + 0.5, float(x.min()) - 0.5
                self.search = max(abs(self.max_pos), abs(self.max_neg))
                self.loss_array = np.zeros((self.n + 1, self.skew, 2))
            self.loss_array[0] = np.inf
        step = self.search / self.n
        one_d = self.one_sided or self.symmetric
        if self.opt == "grid" and one_d:
            for i in range(1, self.n + 1):
                self.loss_array[i] += self.loss_fx(x, 0 if self.one_sided else -step * i, step * i)
            i = int(self.loss_array.argmin())
            return (0.0 if self.one_sided else -step * i), step * i
        if self.opt == "grid":
            for i in range(1, self.n + 1):
                start, finish = -step * i, step * i
                delta = float(finish - start) / (2**N_BITS - 1)
                for shift in range(self.skew):
                    for rev in range(2):
                        skew = ((-1) ** rev) * shift * delta
                        self.loss_array[i, shift, rev] += self.loss_fx(
                            x, max(start + skew, self.max_neg), min(finish + skew, self.max_pos))
            i, shift, rev = np.unravel_index(self.loss_array.argmin(), self.loss_array.shape)
            delta = 2 * step * i / (2**N_BITS - 1)
            skew = ((-1) ** rev) * shift * delta
            return max(-step * i + skew, self.max_neg), min(step * i + skew, self.max_pos)
        bounds = (0.01 * self.search, self.search)
        if one_d:
            res = minimize_scalar(lambda r: self.loss_fx(x, 0 if self.one_sided else -r, r), bounds=bounds,
                                  method="Bounded")
            return (0.0 if self.one_sided else -res.x), res.x

        def inner(r):
            m = 2 * r / (2**N_BITS - 1) * self.skew
            return minimize_scalar(lambda s: self.loss_fx(x, -r + s, r + s), bounds=(-m, m), method="Bounded")

        res = minimize_scalar(lambda r: inner(r).fun, bounds=bounds, method="Bounded")
        s = inner(res.x).x
        return -res.x + s, res.x + s


def setup_aihwkit_algo(symmetric: bool, opt: str, loss: str, num_candidates: int):
    try:
        import scipy.optimize  # noqa: F401
    except ImportError as err:
        raise Skip("aihwkit-algo: needs scipy (aihwkit's golden section is scipy's minimize_scalar)") from err
    return AihwkitAlgo(symmetric, opt, loss, num_candidates)


SETUP: dict[str, Callable] = {"tquant": setup_tquant, "aihwkit": setup_aihwkit, "aihwkit-algo": setup_aihwkit_algo}


def _timed_call(est, x: torch.Tensor, results: dict, name: str) -> Callable[[], None]:
    """One estimator forward on ``x``; the last result is kept in ``results[name]``."""

    def fn():
        with torch.no_grad():
            results[name] = est(x)

    return fn


def _range_of(out) -> tuple[float, float]:
    lo, hi = out
    as_float = [float(torch.as_tensor(v).reshape(-1)[0]) for v in (lo, hi)]
    return as_float[0], as_float[1]


# -- the run ---------------------------------------------------------------------------------
def run_benchmark(cases, providers, device, *, quick: bool, reps: int | None, warmup: int | None,
                  num_candidates: int, keep_algo: bool = False, log=print) -> tuple[list[dict], list[str]]:
    """Measure every (case, provider) on ``device``; returns the rows and notes on skipped providers."""
    notes: list[str] = []
    rows: list[dict] = []
    skipped: set[str] = set()
    for case in cases:
        symmetric, opt, loss, kind = CASES[case]
        x = make_data(kind, quick, device)
        estimators, results = {}, {}
        for name in providers:
            if name in skipped:
                continue
            try:
                estimators[name] = SETUP[name](symmetric, opt, loss, num_candidates)
            except Skip as err:
                skipped.add(name)
                notes.append(str(err))
                log(f"  skip: {err}")
        if "aihwkit" in estimators and "aihwkit-algo" in estimators and not keep_algo:
            del estimators["aihwkit-algo"]  # aihwkit itself is the baseline

        fns = {name: _timed_call(est, x, results, name) for name, est in estimators.items()}
        slow = case == "grid-asym" and not quick
        samples = common.bench_interleaved(
            fns, reps=reps or (3 if slow else (5 if quick else 7)),
            warmup=warmup if warmup is not None else 1, device=device,
            max_seconds=None if quick else 120.0,
        )
        stats = {name: common.summarize(s) for name, s in samples.items()}
        base_name = "aihwkit" if "aihwkit" in stats else ("aihwkit-algo" if "aihwkit-algo" in stats else None)
        base = stats[base_name]["median"] if base_name else None
        ranges = {name: _range_of(results[name]) for name in results}
        ref_range = ranges.get(base_name)
        for name, st in stats.items():
            lo, hi = ranges[name]
            same = None
            if ref_range is not None:
                # aihwkit returns Python floats rounded to fp32 at different points: compare in fp32
                same = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip((lo, hi), ref_range))
            rows.append({
                "case": case, "shape": "x".join(map(str, x.shape)), "num_candidates": num_candidates,
                "provider": name, "median_ms": st["median"], "p20_ms": st["p20"], "p80_ms": st["p80"],
                "n": st["n"], "speedup_vs_aihwkit": (base / st["median"]) if base else None,
                "baseline": base_name, "x_min": lo, "x_max": hi, "same_range": same,
                "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            })
        log(f"{case:<12} " + "  ".join(f"{n}={s['median']:.2f}ms" for n, s in stats.items())
            + (f"  speed-up {base / stats['tquant']['median']:.2f}x" if base and "tquant" in stats else ""))
    return rows, notes


# -- reporting -------------------------------------------------------------------------------
def write_markdown(path, env: dict, rows: list[dict], history: list[dict], notes: list[str]) -> None:
    dev_type = env["device_type"]
    parts = [
        f"# MSE / cross-entropy range searches: tquant vs aihwkit — {env['device']}",
        "",
        "Generated by `python -m tquant.benchmarks.bench_search` (`tquant bench search`). One estimator "
        f"forward after a warm-up call, {N_BITS} bits, per tensor; medians of interleaved repetitions "
        "(20th–80th percentile in the CSV); speed-up = aihwkit time / tquant time (> 1: tquant is faster); "
        "`same range` = tquant picked aihwkit's range (grid: exactly, up to fp32; golden section: "
        "a different optimiser, see the ranges).",
        "",
        common.environment_markdown(env),
        "",
    ]
    table = []
    for case in CASES:
        crow = [r for r in rows if r["case"] == case]
        if not crow:
            continue
        entry = {"case": case, "shape": crow[0]["shape"]}
        for r in crow:
            entry[r["provider"]] = r["median_ms"]
            if r["provider"] == "tquant":
                entry["x"] = r["speedup_vs_aihwkit"]
                entry["baseline"] = r["baseline"] or "-"
                entry["range"] = f"[{r['x_min']:.5g}, {r['x_max']:.5g}]"
                entry["same"] = {True: "yes", False: "no", None: "-"}[r["same_range"]]
            elif r["provider"] == r["baseline"]:
                entry["ref_range"] = f"[{r['x_min']:.5g}, {r['x_max']:.5g}]"
        target = TARGETS.get(dev_type, {}).get(case)
        entry["target"] = f">= {target:g}x" if target else "-"
        if target and entry.get("x") is not None:
            entry["ok"] = "yes" if entry["x"] >= target else "NO"
        table.append(entry)
    cols = [("case", "case", ""), ("shape", "data", "")]
    cols += [(p, f"{p} ms", ".1f") for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    cols += [("baseline", "baseline", ""), ("x", "speed-up", ".2f"), ("target", "target", ""), ("ok", "met", ""),
             ("range", "tquant range", ""), ("ref_range", "aihwkit range", ""), ("same", "same range", "")]
    parts += [common.markdown_table(table, cols), ""]
    runs: dict[tuple, dict] = {}
    for r in history:
        if r.get("provider") == "tquant":
            runs[(r["run_id"], r["case"])] = r
    if runs:
        parts += ["## Every run recorded in search.csv (tquant rows)", "",
                  common.markdown_table(list(runs.values()), [
                      ("run_id", "run", ""), ("case", "case", ""), ("median_ms", "tquant ms", ".1f"),
                      ("speedup_vs_aihwkit", "speed-up", ".2f"), ("baseline", "vs", ""),
                      ("loadavg_1m", "load", "")]), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")


def plot(path, env: dict, rows: list[dict]) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    trows = [r for r in rows if r["provider"] == "tquant" and r["speedup_vs_aihwkit"]]
    if not trows:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["case"] for r in trows]
    ax.bar(names, [r["speedup_vs_aihwkit"] for r in trows], color="tab:blue")
    targets = TARGETS.get(env["device_type"], {})
    for i, n in enumerate(names):
        if n in targets:
            ax.hlines(targets[n], i - 0.4, i + 0.4, colors="red", linestyles="--")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs aihwkit (x)")
    ax.set_title(f"range searches, {env['device']} (red: target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Command-line options (shared with ``tquant bench search``)."""
    parser = parser or argparse.ArgumentParser(prog="python -m tquant.benchmarks.bench_search",
                                               description=__doc__.splitlines()[0])
    return options.search(parser)


def main(args: argparse.Namespace) -> int:
    """Run on each device, write ``search.{csv,json,md,png}`` into its results folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = list(args.providers or PROVIDERS)
    cases = list(args.cases or CASES)
    num_candidates = args.num_candidates or (20 if args.quick else 100)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for dev in devices:
        device = torch.device(dev)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        out = common.resolve_out_dir(args, device)
        out.mkdir(parents=True, exist_ok=True)
        env = common.environment(device)
        print(f"bench_search on {env['device']} ({env['threads']} threads, load {env['loadavg_1m']}), "
              f"torch {env['torch']}")
        rows, notes = run_benchmark(cases, providers, device, quick=args.quick, reps=args.reps,
                                    warmup=args.warmup, num_candidates=num_candidates,
                                    keep_algo=bool(args.providers and "aihwkit-algo" in args.providers))
        if "aihwkit" not in {r["provider"] for r in rows} and any(r["provider"] == "aihwkit-algo" for r in rows):
            notes.append("baseline: aihwkit-algo, the eager re-implementation of aihwkit's algorithm "
                         "(aihwkit itself was not importable)")
        history = common.record_run(out, "search", env, rows, CSV_FIELDS, notes)
        write_markdown(out / "search.md", env, rows, history, notes)
        if not args.no_plot and not plot(out / "search.png", env, rows):
            print("matplotlib not installed (or nothing to plot): no plot")
        print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
