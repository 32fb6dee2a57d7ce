"""Benchmark: the onnx package's nine model-zoo graphs run whole by autoconv (`autoconv.onnx.load`)
and by onnxruntime, end to end at batch 1, in one run. Writes benchmarks/models-pocl.md.

Each graph (onnx/backend/test/data/light/light_*.onnx) gets random weights (scripts/zoo.py). Per
model: autoconv's latency untuned (the plans the shipped databases and the fallbacks serve), and
for the models named by --tune (ResNet-50 by default) after `autoconv tune --onnx MODEL
--time-budget BUDGET` into a scratch database; onnxruntime's (CPUExecutionProvider, default
session options, intra-op threads = the machine's cores); the relative error of autoconv's output
against onnxruntime's; and autoconv's non-conv share (the numpy and onnx.reference steps'
time over all steps', from `Model.timed_run`). Methods interleaved round by round; medians over
rounds with their spread (IQR / median).

    pip install '.[bench]' && python scripts/bench_models.py [--rounds 5] [--repeats 5]
        [--tune light_resnet50.onnx] [--time-budget 300] [--out benchmarks/models-pocl.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import random_weight_model, zoo_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTLE_S = 0.2
GOAL_ERROR, GOAL_RESNET, GOAL_NON_CONV = 1e-4, 1.0, 0.05


def stats(samples: list[float]) -> tuple[float, float]:
    median = statistics.median(samples)
    if len(samples) < 2 or median == 0:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, (q3 - q1) / abs(median)


def timed(call: Callable[[], Any], repeats: int) -> float:
    time.sleep(SETTLE_S)
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune", default="light_resnet50.onnx", help="comma-separated models to tune first")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds of tuning per tuned model")
    parser.add_argument("--models", default=None, help="comma-separated (default: all nine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "models-pocl.md"))
    args = parser.parse_args()

    import onnxruntime as ort
    from threadpoolctl import threadpool_limits

    import autoconv
    import autoconv.onnx as aonnx

    threads = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="bench-models-"))
    names = args.models.split(",") if args.models else zoo_models()
    to_tune = set(filter(None, args.tune.split(",")))
    rng = np.random.default_rng(0)
    rows = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        model = random_weight_model(name, 0)
        path = scratch / name
        path.write_bytes(model.SerializeToString())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallbacks said once; reported below
            untuned = aonnx.load(model)
        feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in untuned._prepared.inputs}
        methods: dict[str, Any] = {"autoconv untuned": untuned}
        tune_s = None
        if name in to_tune:
            db = scratch / f"{name}.db"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "autoconv.cli", "tune", "--onnx", str(path), "--db", str(db),
                            "--time-budget", str(args.time_budget)], check=True, stdout=subprocess.DEVNULL)
            tune_s = time.perf_counter() - start
            methods["autoconv tuned"] = aonnx.load(model, db=str(db))
        expected = session.run(None, feed)
        errors = {}
        for label, loaded in methods.items():
            got = loaded.run(None, feed)
            errors[label] = max(float(np.abs(g.astype(np.float64) - e).max() / max(np.abs(e).max(), 1e-30))
                                for g, e in zip(got, expected))
        times: dict[str, list[float]] = {label: [] for label in [*methods, "onnxruntime"]}
        shares: dict[str, list[float]] = {label: [] for label in methods}
        for _ in range(args.rounds):
            with threadpool_limits(limits=threads, user_api="blas"):
                times["onnxruntime"].append(timed(lambda: session.run(None, feed), args.repeats))
                for label, loaded in methods.items():
                    times[label].append(timed(lambda: loaded.run(None, feed), args.repeats))
                    _, steps = loaded.timed_run(feed)
                    total = sum(ms for _, ms in steps)
                    shares[label].append(sum(ms for row, ms in steps if row.runs_on != "autoconv layer") / total)
        described = methods.get("autoconv tuned", untuned).describe()
        reference = sorted({row.ops for row in described if row.runs_on == "onnx.reference"})
        fallbacks = sum(1 for row in described if row.runs_on == "autoconv layer" and "(tuned)" not in row.plan)
        rows.append(dict(name=name, times={k: stats(v) for k, v in times.items()},
                         shares={k: statistics.median(v) for k, v in shares.items()}, errors=errors, tune_s=tune_s,
                         reference=reference, convs=sum(1 for row in described if row.runs_on == "autoconv layer"),
                         fallbacks=fallbacks))

    info = autoconv.Conv2d(np.ones((1, 1, 1, 1), np.float32)).device
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def cell(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{value[0]:.2f} ±{value[1] * 100:.0f}%"

    out = [f"# Whole models: autoconv vs onnxruntime — {getattr(info, 'name', info)}", "",
           f"Measured {now} by `scripts/bench_models.py --rounds {args.rounds} --repeats {args.repeats} "
           f"--tune {args.tune} --time-budget {args.time_budget:.0f}` (autoconv {autoconv.__version__}, onnxruntime "
           f"{ort.__version__}); host {platform.machine()}, {threads} cores. Graphs: the onnx package's light_*.onnx with "
           "random weights, batch 1, float32. Latency in ms (median over rounds ±spread); speed = onnxruntime's "
           "time / autoconv's.", "",
           "| model | convs | autoconv untuned | autoconv tuned (tune wall) | onnxruntime | speed untuned | speed tuned "
           "| error vs ort | non-conv share | onnx.reference ops |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["times"]
        ort_ms = t["onnxruntime"][0]
        tuned = t.get("autoconv tuned")
        tuned_cell = "-" if tuned is None else f"{cell(tuned)} ({r['tune_s'] / 60:.1f} min)"
        share = r["shares"].get("autoconv tuned", r["shares"]["autoconv untuned"])
        out.append(f"| {r['name']} | {r['convs']} | {cell(t['autoconv untuned'])} | {tuned_cell} | "
                   f"{cell(t['onnxruntime'])} | {ort_ms / t['autoconv untuned'][0]:.2f}x | "
                   f"{'-' if tuned is None else f'{ort_ms / tuned[0]:.2f}x'} | "
                   f"{max(r['errors'].values()):.1e} | {share * 100:.1f}% | {', '.join(r['reference']) or '-'} |")
    worst_error = max(max(r["errors"].values()) for r in rows)
    resnet = next((r for r in rows if r["name"] == "light_resnet50.onnx"), None)
    worst_share = max(max(r["shares"].values()) for r in rows)
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    out += ["", "## Against the goals", "",
            f"- All {len(rows)} run, each output within {GOAL_ERROR:.0e} relative error of onnxruntime's: "
            f"{met(worst_error < GOAL_ERROR)} (largest {worst_error:.1e})."]
    if resnet is not None and "autoconv tuned" in resnet["times"]:
        speed = resnet["times"]["onnxruntime"][0] / resnet["times"]["autoconv tuned"][0]
        out.append(f"- ResNet-50 at batch 1, after tuning, at least {GOAL_RESNET:.1f}x onnxruntime end to end: "
                   f"{met(speed >= GOAL_RESNET)} ({speed:.2f}x).")
    out += [f"- Non-conv operators at most {GOAL_NON_CONV * 100:.0f}% of autoconv's model time: "
            f"{met(worst_share <= GOAL_NON_CONV)} (largest {worst_share * 100:.1f}%: "
            + ", ".join(f"{r['name']} {max(r['shares'].values()) * 100:.1f}%" for r in rows) + ")."]
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
