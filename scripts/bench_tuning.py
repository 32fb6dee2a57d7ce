"""Benchmark of the tuner itself, in one run, writing benchmarks/tuning-pocl.md and a PNG:

1. Search quality, per ResNet-50 layer (one tunable algorithm, --algorithm, default im2col_gemm,
   whose space is the largest): best-so-far vs trial index for cold TPE, warm-started TPE and
   random search (--trials each), against a long TPE run (--reference-trials) as the reference
   best. Warm start reads the shipped PoCL database leaving out the layer itself at every batch
   size, as for a model never tuned here. Early stopping and re-timing are off, so every run
   spends its whole budget; each run is a fresh in-memory study.
2. The whole of ResNet-50 tuned as a user would (`autoconv tune --model resnet50 --trials N`: the defaults otherwise,
   warm start from earlier layers of the run, early stopping, re-timing) with the build pool
   (--jobs 2) and without (--jobs 1), each in its own process with an empty PoCL kernel cache and
   no shipped database: wall time per layer, tuned vs default with the stored spreads, and the
   stored baseline spreads.

    python scripts/bench_tuning.py [--layers res2_1x1a,res2_3x3,res3_down,res5_3x3] [--trials 20]
        [--reference-trials 200] [--out benchmarks/tuning-pocl.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import autoconv
from autoconv.algorithms import IM2COL_BLAS
from autoconv.backends import get_backend
from autoconv.layers import model_layers
from autoconv.serve.lookup import DatabaseContents
from autoconv.serve.session import read_contents
from autoconv.store import SQLiteStore, fastest
from autoconv.tuning.tuner import EARLY_STOP_GAIN, EARLY_STOP_TRIALS, DeviceEvaluator, tune_layer
from autoconv.tuning.verify import TOLERANCE, reference_output, relative_error

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "layers" / "public.json"
SHIPPED = REPO / "tuning_db" / "pocl-cpu.db"
INF = float("inf")


def public_resnet50_names() -> list[str]:
    if SHARED.exists():
        return [row["name"] for row in json.loads(SHARED.read_text())["resnet50"]]
    return [layer.name for layer in model_layers("resnet50")]


def interleaved_medians(convs: dict[str, object], operands: tuple, rounds: int, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in convs}
    for _ in range(rounds):
        for name, conv in convs.items():
            samples[name] += conv.time(*operands, warmup=1, repeats=repeats).samples_ms
    return {name: statistics.median(values) for name, values in samples.items()}


def checked_methods(backend, spec, tuned, operands: tuple, label: str, extra: dict | None = None) -> dict:
    """The tuned algorithm's default config, its tuned one and the BLAS baseline (plus `extra`)
    prepared for a layer, each checked against the float64 reference before anything is timed
    (used by scripts/bench_cuda.py)."""
    from autoconv import Plan, get_algorithm

    host = get_backend("numpy")
    default = Plan(tuned.algorithm, get_algorithm(tuned.algorithm).heuristic(spec, backend.device), "heuristic")
    convs = {
        "default": backend.prepare(spec, default),
        "tuned": backend.prepare(spec, tuned),
        "blas": (backend if IM2COL_BLAS in backend.algorithms else host).prepare(spec, Plan(IM2COL_BLAS)),
        **(extra or {}),
    }
    reference = reference_output(spec, operands)
    for name, conv in convs.items():
        error = relative_error(conv.run(*operands, poison=True), reference)
        if not error < TOLERANCE:
            raise SystemExit(f"{label}: {name} is wrong (relative error {error:.1e})")
    return convs


def best_so_far(storage) -> list[float]:
    """The best verified time after each completed trial of the only study in a storage."""
    import optuna
    from optuna.trial import TrialState

    (name,) = optuna.study.get_all_study_names(storage)
    best, curve = INF, []
    for trial in sorted(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False),
                        key=lambda t: t.number):
        if trial.state != TrialState.COMPLETE:
            continue
        if trial.user_attrs.get("status") == "ok" and isinstance(trial.value, float) and math.isfinite(trial.value):
            best = min(best, trial.value)
        curve.append(best)
    return curve


def search(backend, spec, algorithm: str, trials: int, *, sampler: str, records, seed: int) -> list[float]:
    import optuna

    storage = optuna.storages.InMemoryStorage()
    with tempfile.TemporaryDirectory() as work, SQLiteStore(Path(work) / "t.db") as db:
        tune_layer(spec, backend.device, DeviceEvaluator(backend, spec, repeats=5, seed=seed), db, trials=trials,
                   storage=storage, algorithms=(algorithm,), records=records, early_stop=None, retime=False,
                   sampler=sampler, seed=seed, jobs=2)
    return best_so_far(storage)


def leave_layer_out(contents: DatabaseContents, spec) -> list[DatabaseContents]:
    """The shipped results without the layer itself at any batch size: a model never tuned here."""
    kept = tuple(r for r in contents.results if r.spec.replace(n=1) != spec.replace(n=1))
    return [DatabaseContents(kept, contents.devices)]


def full_model_run(jobs: int, trials: int, work: Path) -> tuple[float, list[dict], Path]:
    """`autoconv tune --model resnet50 --jobs N` in a fresh process with an empty PoCL kernel cache."""
    db = work / f"jobs{jobs}.db"
    cache = work / f"pocl-cache-{jobs}"
    cache.mkdir()
    env = {**os.environ, "POCL_CACHE_DIR": str(cache), "AUTOCONV_SHIPPED_DB_DIR": ""}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "autoconv.cli", "tune", "--model", "resnet50", "--jobs", str(jobs),
                           "--trials", str(trials), "--db", str(db), "--json"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"autoconv tune --jobs {jobs} failed:\n{done.stderr}")
    return wall, json.loads(done.stdout), db


# Early-stopping rules tried on the reference runs: (window in trials, minimum gain).
STOP_WINDOWS = (6, 8, 10, 12, 16, 20, 30)
STOP_GAINS = (0.01, 0.02, 0.05)
MAX_STOP_LOSS = 0.10


def stop_index(curve: list[float], window: int, gain: float) -> int:
    """How many trials a run with this early-stopping rule would have measured (the tuner's
    AlgorithmStudy.stalled: no more than `gain` better over the last `window` trials)."""
    for done in range(window + 1, len(curve) + 1):
        before, now = curve[done - window - 1], curve[done - 1]
        if math.isfinite(before) and now >= before * (1 - gain):
            return done
    return len(curve)


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def plot(curves: dict[str, list[list[float]]], references: list[float], walls: dict[int, list[dict]],
         path: Path, trials: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6), dpi=100)
    for label, per_layer in curves.items():
        length = min(len(c) for c in per_layer)
        ratios = [geomean([c[i] / ref for c, ref in zip(per_layer, references)]) for i in range(length)]
        left.plot(range(1, length + 1), ratios, marker="o" if length <= trials else None, markersize=3, label=label)
    left.axhline(1.05, color="grey", linestyle="--", linewidth=1, label="within 5% of the reference best")
    left.axvline(trials, color="grey", linestyle=":", linewidth=1)
    left.set_xscale("log")
    left.set_xlabel("trial index (log scale)")
    left.set_ylabel("best time so far / reference best (geomean over layers)")
    left.set_title("Search quality")
    left.legend()
    names = [row["layer"].split("/")[-1] for row in walls[1]]
    positions = range(len(names))
    width = 0.4
    for offset, jobs in ((-width / 2, 1), (width / 2, 2)):
        right.bar([p + offset for p in positions], [row["wall_s"] for row in walls[jobs]], width,
                  label=f"--jobs {jobs}")
    right.set_xticks(list(positions), names, rotation=30, ha="right")
    right.set_ylabel("tuning wall time per layer (s)")
    right.set_title("autoconv tune --model resnet50, empty kernel cache")
    right.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="res2_1x1a,res2_3x3,res3_down,res5_3x3",
                        help="ResNet-50 layers for the search curves")
    parser.add_argument("--algorithm", default="im2col_gemm")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--reference-trials", type=int, default=200)
    parser.add_argument("--model-trials", type=int, default=20, help="--trials of the whole-model runs")
    parser.add_argument("--out", default="benchmarks/tuning-pocl.md")
    args = parser.parse_args()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = get_backend("opencl")
    info = backend.device
    by_name = {layer.name: layer for layer in model_layers("resnet50", batch=1)}
    chosen = [by_name[name] for name in args.layers.split(",")]
    shipped = read_contents(SHIPPED) if SHIPPED.is_file() else DatabaseContents()

    curves: dict[str, list[list[float]]] = {"cold TPE": [], "warm-started TPE": [], "random search": [],
                                            f"reference TPE ({args.reference_trials} trials)": []}
    references: list[float] = []
    for layer in chosen:
        spec = layer.spec
        print(f"{layer.name}: reference ({args.reference_trials} trials) ...", file=sys.stderr, flush=True)
        reference = search(backend, spec, args.algorithm, args.reference_trials, sampler="tpe", records=None, seed=100)
        runs = {
            "cold TPE": search(backend, spec, args.algorithm, args.trials, sampler="tpe", records=None, seed=1),
            "warm-started TPE": search(backend, spec, args.algorithm, args.trials, sampler="tpe",
                                       records=leave_layer_out(shipped, spec), seed=1),
            "random search": search(backend, spec, args.algorithm, args.trials, sampler="random", records=None, seed=1),
        }
        for label, curve in runs.items():
            curves[label].append(curve)
        curves[f"reference TPE ({args.reference_trials} trials)"].append(reference)
        # The reference best: the best any run found (a short run can beat the long one by luck or noise).
        references.append(min(min(reference), *(min(c) for c in runs.values())))
        print(f"  best {references[-1]:.3f} ms; cold {min(runs['cold TPE']):.3f}, warm "
              f"{min(runs['warm-started TPE']):.3f}, random {min(runs['random search']):.3f}",
              file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="autoconv-bench-tuning-"))
    walls: dict[int, list[dict]] = {}
    totals: dict[int, float] = {}
    dbs: dict[int, Path] = {}
    for jobs in (2, 1):
        print(f"autoconv tune --model resnet50 --jobs {jobs} ...", file=sys.stderr, flush=True)
        totals[jobs], walls[jobs], dbs[jobs] = full_model_run(jobs, args.model_trials, work)
        print(f"  {totals[jobs]:.0f} s", file=sys.stderr, flush=True)

    out = Path(args.out)
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "layers": [layer.name for layer in chosen], "algorithm": args.algorithm, "references_ms": references,
        "curves_ms": curves, "model_runs": {str(jobs): {"total_s": totals[jobs], "layers": walls[jobs]}
                                            for jobs in walls}}, indent=1) + "\n")
    plot(curves, references, walls, png, args.trials)

    def within(curve: list[float], ref: float, n: int) -> int | None:
        """The first trial index (1-based) within 5% of the reference best, if within n trials."""
        return next((i + 1 for i, value in enumerate(curve[:n]) if value <= 1.05 * ref), None)

    lines = [
        f"# Tuning the tuner — {info.name}",
        "",
        f"Measured {datetime.date.today().isoformat()} by `scripts/bench_tuning.py --layers {args.layers} "
        f"--algorithm {args.algorithm} --trials {args.trials} --reference-trials {args.reference_trials} "
        f"--model-trials {args.model_trials}` "
        f"(autoconv {autoconv.__version__}) on {info.platform}, driver {info.driver}, {info.compute_units} compute "
        f"units; host {platform.machine()}, {os.cpu_count()} cores; batch 1, float32. Plot: `{png.name}`.",
        "",
        "## 1. Search quality",
        "",
        f"Best time so far vs trial index for {args.algorithm} (its default config is trial 1 of every run). The "
        "reference best is the best any run found on the layer. Warm start read the shipped database without "
        "the layer itself at any batch size (its nearest same-family shapes on this device). Early stopping "
        "and re-timing off; kernel-event medians of 5 runs; the build pool on (2 jobs).",
        "",
        f"| layer | reference best ms | cold TPE @{args.trials} | warm TPE @{args.trials} | random @{args.trials} | "
        "warm within 5% at trial | cold within 5% at trial | random within 5% at trial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    warm_ok = 0
    for i, layer in enumerate(chosen):
        ref = references[i]
        cells = [f"{min(curves[label][i][:args.trials]) / ref:.3f}"
                 for label in ("cold TPE", "warm-started TPE", "random search")]
        firsts = [within(curves[label][i], ref, args.trials) for label in ("warm-started TPE", "cold TPE",
                                                                          "random search")]
        warm_ok += firsts[0] is not None
        lines.append(f"| {layer.name} | {ref:.3f} | " + " | ".join(cells) + " | "
                     + " | ".join(str(f) if f else f"not in {args.trials}" for f in firsts) + " |")
    for label in ("cold TPE", "warm-started TPE", "random search"):
        ratio = geomean([min(c[:args.trials]) / ref for c, ref in zip(curves[label], references)])
        lines.append(f"- {label}: best after {args.trials} trials is {ratio:.3f}x the reference best (geomean).")
    lines += [
        f"- Goal, warm-started TPE within 5% of the reference best in <= {args.trials} trials: met on {warm_ok} of "
        f"{len(chosen)} layers.",
        "",
        "Early stopping, replayed on the reference runs: trials a study would have measured under each rule, and "
        "how far its best then was from the reference best (mean and worst over the layers).",
        "",
        "| window | min gain | trials measured (mean) | best / reference best (mean) | worst |",
        "|---:|---:|---:|---:|---:|",
    ]
    reference_curves = curves[f"reference TPE ({args.reference_trials} trials)"]
    fitting = []
    for window in STOP_WINDOWS:
        for gain in STOP_GAINS:
            stops = [stop_index(curve, window, gain) for curve in reference_curves]
            losses = [curve[stop - 1] / ref for curve, stop, ref in zip(reference_curves, stops, references)]
            lines.append(f"| {window} | {gain:.0%} | {statistics.fmean(stops):.0f} | {statistics.fmean(losses):.3f} | "
                         f"{max(losses):.3f} |")
            if max(losses) <= 1 + MAX_STOP_LOSS:
                fitting.append((window, -gain, gain))
    chosen_rule = min(fitting)[::2] if fitting else None
    lines += [
        "",
        f"- Rule for the defaults: the shortest window (then the largest gain) whose worst loss is within "
        f"{MAX_STOP_LOSS:.0%}: " + (f"{chosen_rule[0]} trials, {chosen_rule[1]:.0%}" if chosen_rule else "none")
        + f". autoconv's defaults: {EARLY_STOP_TRIALS} trials, {EARLY_STOP_GAIN:.0%}.",
    ]
    lines += [
        "",
        "## 2. The whole of ResNet-50, as a user tunes it",
        "",
        f"`autoconv tune --model resnet50 --trials {args.model_trials}` (at most {args.model_trials} trials per layer; "
        "otherwise the defaults: early stopping, warm start from the layers already tuned in the run, re-timing), "
        "each run in a fresh process with an empty PoCL "
        "kernel cache and no shipped database, with the build pool and without.",
        "",
        "| layer | trials, --jobs 2 / 1 | wall s, --jobs 2 | wall s, --jobs 1 | served | tuned ms (spread) | "
        "default ms | tuned vs default | baseline ms (spread) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    with SQLiteStore(dbs[2], readonly=True) as db:
        results = db.results()
    baseline_spreads = []
    for row2, row1 in zip(walls[2], walls[1]):
        spec = next(layer.spec for layer in model_layers("resnet50") if layer.label == row2["layer"])
        mine = [r for r in results if r.spec == spec]
        generated = fastest([r for r in mine if r.algorithm != IM2COL_BLAS])
        baseline = next((r for r in mine if r.algorithm == IM2COL_BLAS), None)
        served = fastest(mine)
        spread = lambda r: f"±{r.spread:.0%}" if r is not None and r.spread is not None else "n/a"  # noqa: E731
        if baseline is not None and baseline.spread is not None:
            baseline_spreads.append(baseline.spread)
        vs_default = (f"{generated.default_ms / generated.median_ms:.2f}x"
                      if generated is not None and generated.default_ms else "n/a")
        lines.append(
            f"| {row2['layer'].split('/')[-1]} | {row2['trials']} / {row1['trials']} | {row2['wall_s']:.0f} | "
            f"{row1['wall_s']:.0f} | {served.algorithm if served else 'none'} | "
            f"{generated.median_ms:.3f} ({spread(generated)}) | "
            f"{generated.default_ms:.3f} | {vs_default} | "
            f"{baseline.median_ms:.3f} ({spread(baseline)}) |" if generated and generated.default_ms and baseline else
            f"| {row2['layer'].split('/')[-1]} | {row2['trials']} / {row1['trials']} | {row2['wall_s']:.0f} | "
            f"{row1['wall_s']:.0f} | {served.algorithm if served else 'none'} | n/a | n/a | n/a | n/a |")
    lines += [
        "",
        f"- Whole ResNet-50 ({len(walls[2])} layers): {totals[2]:.0f} s with --jobs 2, {totals[1]:.0f} s with "
        f"--jobs 1 (process wall time, start-up included); the pool's speed-up {totals[1] / totals[2]:.2f}x. "
        f"Goal <= 180 s: {'met' if totals[2] <= 180 else 'not met'}.",
        f"- Stored baseline spreads: max {max(baseline_spreads):.1%} over {len(baseline_spreads)} layers; goal under "
        f"10%: {'met' if baseline_spreads and max(baseline_spreads) < 0.10 else 'not met'} (a baseline whose "
        "spread is 10% or more is not stored at all)." if baseline_spreads else "- No baseline was stored.",
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
