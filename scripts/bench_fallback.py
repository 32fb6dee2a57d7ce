"""Benchmark: what a new user's first call runs, untuned. On a device that neither the user's
database nor a shipped one describes (the shipped PoCL rows come from another CPU), every layer
is served by the lookup's last step, the heuristic. Per layer of the built-in models at batch 1:
`autoconv.Conv2d` as served by that fallback now, the same layer forced to the generated im2col +
GEMM (what the fallback served before on every device), and onnxruntime's CPU Conv of the same
layer, as anchor.

Every method takes a host array and returns a host array (autoconv: `numpy.asarray` of the
layer's result; onnxruntime: `InferenceSession.run`), wall-clock, the methods interleaved round by
round, each turn 0.2 s after the last (the thread pools it left spinning stopped) and after 50 ms
of untimed calls; each method is checked against the float64 reference first. OpenBLAS is held to one thread
while autoconv runs (PoCL computes on the same cores), onnxruntime to the machine's cores. Medians
of the rounds' medians with their spread (IQR / median). Shipped databases are switched off
(AUTOCONV_SHIPPED_DB_DIR empty) and the user's database is a fresh empty file.

    pip install '.[bench]' && python scripts/bench_fallback.py [--models resnet50,vgg16,alexnet,mobilenet_v2]
        [--rounds 5] [--repeats 5] [--out benchmarks/fallback-pocl.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ["AUTOCONV_SHIPPED_DB_DIR"] = ""  # before autoconv reads its settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_algorithms import OrtConv, _ort_version, stats  # noqa: E402

import autoconv  # noqa: E402
from autoconv.algorithms import BLOCKED_DIRECT, IM2COL_GEMM  # noqa: E402
from autoconv.layers import model_layers  # noqa: E402
from autoconv.store import SQLiteStore  # noqa: E402
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Each method starts this long after the last one: onnxruntime's pool threads spin for a while after
# a run and would take the cores PoCL's threads compute on.
SETTLE_S = 0.2
# ... and first runs untimed for this long: after the pause the cores come back at a low clock.
WARM_MS = 50.0


def wall_ms(call, x: np.ndarray, repeats: int) -> float:
    """The median wall time of `repeats` calls, host array in, host array out."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(call(x))
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


def warm(call, x: np.ndarray) -> None:
    """Untimed calls for WARM_MS (at least one): the caches, the queue and the cores' clocks up."""
    start = time.perf_counter()
    while True:
        np.asarray(call(x))
        if (time.perf_counter() - start) * 1e3 >= WARM_MS:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg16,alexnet,mobilenet_v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "fallback-pocl.md"))
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    threads = os.cpu_count() or 1
    db = Path(tempfile.mkdtemp(prefix="autoconv-fallback-")) / "empty.db"
    SQLiteStore(db).close()
    info = autoconv.get_backend("opencl").device
    rows = []
    for model in args.models.split(","):
        for layer in model_layers(model, 1):
            spec = layer.spec
            x, weight, bias = random_operands(spec, 0)[:3]
            reference = reference_output(spec, (x, weight, bias))
            common = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups, db=str(db))
            served = autoconv.Conv2d(weight, bias, **common)
            methods = {"served": served}
            if autoconv.get_algorithm(IM2COL_GEMM).supports(spec, info) is None:
                methods["im2col_gemm"] = autoconv.Conv2d(weight, bias, algorithm=IM2COL_GEMM, **common)
            served_algorithm = autoconv.lookup(spec, info, str(db)).algorithm
            if served_algorithm != BLOCKED_DIRECT and autoconv.get_algorithm(BLOCKED_DIRECT).supports(spec, info) is None:
                # Where the fallback chose another algorithm (Winograd), the direct one it passed over.
                methods[BLOCKED_DIRECT] = autoconv.Conv2d(weight, bias, algorithm=BLOCKED_DIRECT, **common)
            ort = OrtConv(spec, weight, bias, threads)
            with threadpool_limits(1, user_api="blas"):
                errors = {name: relative_error(np.asarray(layer_(x)), reference) for name, layer_ in methods.items()}
            errors["onnxruntime"] = relative_error(ort.run(x), reference)
            bad = {name: error for name, error in errors.items() if not error < TOLERANCE}
            if bad:
                raise SystemExit(f"{layer.label}: wrong results {bad}")
            medians: dict[str, list[float]] = {name: [] for name in (*methods, "onnxruntime")}
            for _ in range(args.rounds):
                with threadpool_limits(1, user_api="blas"):
                    for name, layer_ in methods.items():
                        time.sleep(SETTLE_S)
                        warm(layer_, x)
                        medians[name].append(wall_ms(layer_, x, args.repeats))
                with threadpool_limits(threads, user_api="blas"):
                    time.sleep(SETTLE_S)
                    warm(ort.run, x)
                    medians["onnxruntime"].append(wall_ms(ort.run, x, args.repeats))
            plan = served.plans[next(iter(served.plans))]
            rows.append(dict(model=model, label=layer.label, spec=str(spec), plan=plan.describe(),
                             **{name: stats(values) for name, values in medians.items()}))
            print(f"{layer.label}: {plan.algorithm} {rows[-1]['served'][0]:.3f} ms", file=sys.stderr)
    write(Path(args.out), rows, info, args)
    return 0


def fmt(value: tuple[float, float] | None) -> str:
    return "n/a" if value is None else f"{value[0]:.3f} ±{value[1] * 100:.0f}%"


def ratio(other: tuple[float, float] | None, served: tuple[float, float]) -> str:
    return "n/a" if other is None else f"{other[0] / served[0]:.2f}x"


def write(path: Path, rows: list[dict], info, args) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# The untuned fallback: what a new user's first call runs — {info.name}", "",
             f"Measured {now} by `scripts/bench_fallback.py --models {args.models} --rounds {args.rounds} "
             f"--repeats {args.repeats}` (autoconv {autoconv.__version__}, onnxruntime {_ort_version()}) on "
             f"{info.platform}, driver {info.driver}, {info.compute_units} compute units; host {platform.machine()}, "
             f"{os.cpu_count()} cores. No tuning database describes this device (shipped databases off, an empty "
             "user database): every plan is the lookup's heuristic.", "",
             "Per layer at batch 1: `autoconv.Conv2d` as the fallback serves it now (plan and time), the same "
             "layer forced to the generated im2col + GEMM (what the fallback served on every device before), and "
             "onnxruntime's CPU Conv of the layer; host array in, host array out, wall-clock medians of the rounds' "
             "medians ±spread (IQR / median). Speed-ups are the other method's time over the served plan's "
             "(above 1: the served plan faster). Where the fallback serves another algorithm than the "
             "register-blocked direct convolution on a layer that one runs (Winograd), that one's time too.", "",
             "| model | layer | served plan | served ms | im2col_gemm ms | vs im2col_gemm | blocked_direct ms | "
             "vs blocked_direct | onnxruntime ms | vs onnxruntime |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        old, ort, new, direct = row.get("im2col_gemm"), row["onnxruntime"], row["served"], row.get(BLOCKED_DIRECT)
        lines.append(f"| {row['model']} | {row['label'].split('/', 1)[-1]} ({row['spec']}) | {row['plan']} | {fmt(new)} | "
                     f"{fmt(old)} | {ratio(old, new)} | {fmt(direct)} | {ratio(direct, new)} | {fmt(ort)} | "
                     f"{ratio(ort, new)} |")
        total = totals.setdefault(row["model"], dict(served=0.0, im2col_gemm=0.0, onnxruntime=0.0, same=1.0))
        total["served"] += new[0]
        total["onnxruntime"] += ort[0]
        if old is None:
            total["same"] = 0.0  # a layer im2col + GEMM does not run: no like-for-like sum
        else:
            total["im2col_gemm"] += old[0]
    lines += ["", "| model | served, sum ms | im2col_gemm, sum ms | vs im2col_gemm | onnxruntime, sum ms | vs onnxruntime |",
              "|---|---:|---:|---:|---:|---:|"]
    for model, total in totals.items():
        old = f"{total['im2col_gemm']:.2f} | {total['im2col_gemm'] / total['served']:.2f}x" if total["same"] else "n/a | n/a"
        lines.append(f"| {model} | {total['served']:.2f} | {old} | {total['onnxruntime']:.2f} | "
                     f"{total['onnxruntime'] / total['served']:.2f}x |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
