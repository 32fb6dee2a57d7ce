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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import random_weight_model, zoo_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOAL_ERROR, GOAL_RESNET, GOAL_NON_CONV = 1e-4, 1.0, 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune", default="light_resnet50.onnx", help="comma-separated models to tune first")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds of tuning per tuned model")
    parser.add_argument("--models", default=None, help="comma-separated (default: all nine)")
    parser.add_argument("--layout", default=None, help="also run each model in this layout (e.g. NCHW; the main columns run in the device's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "models-pocl.md"))
    args = parser.parse_args()

    import onnxruntime as ort

    import autoconv
    from autoconv.graph.compare import compare_model

    from autoconv.graph.runner import model_layout

    threads = os.cpu_count() or 1
    # The tune covers the layout each column runs in: the device's default, and --layout's.
    default_layout = model_layout("opencl", None)
    tuned_layouts = list(dict.fromkeys(["NCHW", default_layout, *([args.layout] if args.layout else [])]))
    scratch = Path(tempfile.mkdtemp(prefix="bench-models-"))
    names = args.models.split(",") if args.models else zoo_models()
    to_tune = set(filter(None, args.tune.split(",")))
    rows = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        model = random_weight_model(name, 0)
        path = scratch / name
        path.write_bytes(model.SerializeToString())
        # Untuned: what a new user gets (no database of theirs: the shipped ones and the fallbacks).
        results = {"untuned": compare_model(model, rounds=args.rounds, repeats=args.repeats, threads=threads,
                                            db=str(scratch / "no-such.db"), name=name)}
        if args.layout:
            results["untuned blocked"] = compare_model(model, rounds=args.rounds, repeats=args.repeats, threads=threads,
                                                       db=str(scratch / "no-such.db"), name=name, layout=args.layout)
        tune_s = None
        if name in to_tune:
            db = scratch / f"{name}.db"
            start = time.perf_counter()
            layouts = ["--layouts", ",".join(tuned_layouts)]
            subprocess.run([sys.executable, "-m", "autoconv.cli", "tune", "--onnx", str(path), "--db", str(db),
                            "--time-budget", str(args.time_budget), *layouts], check=True, stdout=subprocess.DEVNULL)
            tune_s = time.perf_counter() - start
            results["tuned"] = compare_model(model, rounds=args.rounds, repeats=args.repeats, threads=threads,
                                             db=str(db), name=name)
            if args.layout:
                results["tuned blocked"] = compare_model(model, rounds=args.rounds, repeats=args.repeats,
                                                         threads=threads, db=str(db), name=name, layout=args.layout)
        rows.append(dict(name=name, results=results, tune_s=tune_s))

    from autoconv.backends import get_backend

    info = get_backend("opencl").device
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def cell(ms: float, spread: float) -> str:
        return f"{ms:.2f} ±{spread * 100:.0f}%"

    out = [f"# Whole models: autoconv vs onnxruntime — {info.name}", "",
           f"Measured {now} by `scripts/bench_models.py --rounds {args.rounds} --repeats {args.repeats} "
           f"--tune {args.tune} --time-budget {args.time_budget:.0f}` (autoconv {autoconv.__version__}, onnxruntime "
           f"{ort.__version__}) on {info.platform}, driver {info.driver}; host {platform.machine()}, {threads} cores. "
           "Graphs: the onnx package's light_*.onnx with random weights (scripts/zoo.py), batch 1, float32. "
           "`autoconv.graph.compare.compare_model` runs each: onnxruntime (CPUExecutionProvider, default session "
           "options, intra-op threads = the cores) and `autoconv.onnx.load` on the same input, interleaved round by "
           "round, medians over rounds ±spread (IQR / median), ms. Untuned: no database of the user's (the shipped "
           "one and the fallbacks); tuned: after `autoconv tune --onnx MODEL --time-budget` into a scratch "
           "database. Speed = onnxruntime's time / autoconv's, in the same comparison. Non-conv share: the "
           "steps' time other than the conv layers' (device pooling, numpy and onnx.reference) over all steps' in "
           f"one timed run. autoconv runs each model in the layout `autoconv.onnx.load` chooses for it on the device "
           f"({default_layout} here for a chain of convolutions that all run blocked, else NCHW), and the tune "
           f"covers both (`--layouts {','.join(tuned_layouts)}`)."
           + (f" {args.layout} columns: the same model loaded with `layout=\"{args.layout}\"`, compared with "
              "onnxruntime in its own interleaved rounds." if args.layout else ""), ""]
    blocked_head = (f" {args.layout} untuned | speed | {args.layout} tuned | speed |" if args.layout else "")
    out += ["| model | conv layers | autoconv untuned | onnxruntime | speed | autoconv tuned (tune wall) | onnxruntime "
            "| speed tuned | error vs ort | non-conv share | untuned conv layers served a fallback |" + blocked_head,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if args.layout else "")]
    for r in rows:
        u = r["results"]["untuned"]
        tuned = r["results"].get("tuned")
        convs = sum(1 for row, _ in u.steps if row.runs_on == "autoconv layer")
        tuned_cells = ("- | - | -" if tuned is None else
                       f"{cell(tuned.autoconv.median_ms, tuned.autoconv.spread)} ({r['tune_s'] / 60:.1f} min) | "
                       f"{cell(tuned.onnxruntime.median_ms, tuned.onnxruntime.spread)} | {tuned.speed:.2f}x")
        error = max(c.error for c in r["results"].values())
        share = (tuned or u).non_conv_share
        blocked_cells = ""
        if args.layout:
            for key in ("untuned blocked", "tuned blocked"):
                c = r["results"].get(key)
                blocked_cells += " - | - |" if c is None else f" {cell(c.autoconv.median_ms, c.autoconv.spread)} | {c.speed:.2f}x |"
        out.append(f"| {r['name']} | {convs} | {cell(u.autoconv.median_ms, u.autoconv.spread)} | "
                   f"{cell(u.onnxruntime.median_ms, u.onnxruntime.spread)} | {u.speed:.2f}x | {tuned_cells} | "
                   f"{error:.1e} | {share * 100:.1f}% | {len(u.fallbacks)} of {convs} |" + blocked_cells)
    worst_error = max(c.error for r in rows for c in r["results"].values())
    shares = [(r["name"], max(c.non_conv_share for c in r["results"].values())) for r in rows]
    resnet = next((r for r in rows if r["name"] == "light_resnet50.onnx" and "tuned" in r["results"]), None)
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    out += ["", "## Against the goals", "",
            f"- All {len(rows)} run, each output within {GOAL_ERROR:.0e} relative error of onnxruntime's: "
            f"{met(worst_error < GOAL_ERROR)} (largest {worst_error:.1e})."]
    if resnet is not None:
        speed = max(resnet["results"][key].speed for key in ("tuned", "tuned blocked") if key in resnet["results"])
        out.append(f"- ResNet-50 at batch 1, after tuning, at least {GOAL_RESNET:.1f}x onnxruntime end to end: "
                   f"{met(speed >= GOAL_RESNET)} ({speed:.2f}x).")
    out += [f"- Non-conv operators at most {GOAL_NON_CONV * 100:.0f}% of autoconv's model time: "
            f"{met(max(s for _, s in shares) <= GOAL_NON_CONV)} ("
            + ", ".join(f"{name} {share * 100:.1f}%" for name, share in shares) + ")."]
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
