"""Benchmark: every algorithm per layer, tuned with one fixed budget, against onnxruntime's CPU
Conv, on the ResNet-50 and VGG-16 layers of ../shared/layers/public.json at batch 1 and 8.

Per layer: `autoconv tune` with --trials per layer (every algorithm's default first, then the
tunable ones within 2x of the best); then, on fresh data and checked against the float64
reference first, each algorithm's best, the plan autoconv serves (the lookup's answer), the
served plan through `autoconv.conv2d` end to end, and onnxruntime's Conv are timed together in
interleaved rounds (ABAB..., so drift hits every method alike; each turn starts 0.2 s after the
last, once the thread pools it left spinning have stopped, with one untimed call). OpenBLAS and
onnxruntime are held to the machine's cores (threadpoolctl, session options); generated kernels
are event-timed, host methods wall-clock. Medians with their spread (IQR / median) are reported.

    pip install '.[bench]'
    python scripts/bench_algorithms.py [--trials 20] [--batches 1,8] [--out benchmarks/algorithms-pocl.md]
                                       [--ship tuning_db/pocl-cpu.db]

--ship also writes the tuning database (without its measurements) where autoconv's shipped
databases live.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import autoconv
from autoconv import ConvSpec
from autoconv.algorithms import DIRECT, IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD
from autoconv.backends import get_backend
from autoconv.compare import extra_memory
from autoconv.layers import model_layers
from autoconv.serve.api import backend_for
from autoconv.store import SQLiteStore
from autoconv.tuning.tuner import tune_layers
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

SHARED = Path(__file__).resolve().parents[2] / "shared" / "layers" / "public.json"
DIRECT_LIMIT_GFLOP = 1.0  # direct loops are 10-30x slower: above this they are neither tuned nor timed
SETTLE_S = 0.2  # before each method's turn: longer than OpenBLAS's idle threads spin after a call


def public_layers(models: list[str], batch: int) -> list:
    wanted = None
    if SHARED.exists():
        shared = json.loads(SHARED.read_text())
        wanted = {(m, row["name"]) for m in models for row in shared.get(m, [])}
    return [layer for m in models for layer in model_layers(m, batch) if wanted is None or (m, layer.name) in wanted]


def stats(samples: list[float]) -> tuple[float, float]:
    """Median and spread (IQR / median)."""
    median = statistics.median(samples)
    if len(samples) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, (q3 - q1) / median


class OrtConv:
    """onnxruntime's CPU Conv on the same layer, threads held to the machine's cores."""

    def __init__(self, spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, threads: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        inputs = ["x", "w"] + (["b"] if bias is not None else [])
        node = helper.make_node("Conv", inputs, ["y"], strides=list(spec.stride), dilations=list(spec.dilation),
                                pads=[spec.padding[0], spec.padding[1], spec.padding[0], spec.padding[1]],
                                group=spec.groups)
        initializers = [numpy_helper.from_array(weight, "w")]
        if bias is not None:
            initializers.append(numpy_helper.from_array(bias, "b"))
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]

    def samples(self, x: np.ndarray, repeats: int) -> list[float]:
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(x)
            out.append((time.perf_counter() - start) * 1e3)
        return out


def measure_layer(layer, backend, db_path: Path, args, threads: int) -> dict:
    from threadpoolctl import threadpool_limits

    spec = layer.spec
    x, w, b = operands = random_operands(spec, seed=1)  # not the data the tuner saw
    reference = reference_output(spec, operands)
    methods: dict[str, tuple] = {}  # name -> (sampler, extra bytes, rel error, plan text)
    weight_stage: dict[str, tuple[float, float]] = {}  # once-per-weights kernels (Winograd's filter transform)
    session = autoconv.default_session()
    for name in autoconv.list_algorithms():
        if name == DIRECT and spec.flops / 1e9 > DIRECT_LIMIT_GFLOP:
            continue
        if autoconv.get_algorithm(name).supports(spec, backend.device) is not None:
            continue
        plan = session.lookup(spec, backend, db_path, algorithm=name, shipped=False)
        runner = backend_for(plan, backend)
        conv = runner.prepare(spec, plan)
        error = relative_error(conv.run(*operands, poison=True), reference)
        if any(source.once_per_weights for source in getattr(conv, "sources", ())):
            weight_stage[name] = stats(list(conv.time(*operands, warmup=1, repeats=args.repeats, stage="weights").samples_ms))
        methods[name] = (lambda c=conv: list(c.time(*operands, warmup=1, repeats=args.repeats, rotate=3).samples_ms),
                         extra_memory(spec, plan, runner is not backend), error, plan.describe())
    served = session.lookup(spec, backend, db_path, shipped=False)

    def conv2d_wall() -> list[float]:
        out = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            autoconv.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups, db=db_path)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    error = relative_error(autoconv.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups, db=db_path),
                           reference)
    methods["conv2d"] = (conv2d_wall, 0, error, served.describe())
    ort = OrtConv(spec, w, b, threads)
    methods["onnxruntime"] = (lambda: ort.samples(x, args.repeats), 0, relative_error(ort.run(x), reference),
                              "CPUExecutionProvider")
    # conv.time warms up itself; the wall-clock methods get one untimed call.
    warm = {name: (lambda: None) for name in methods}
    warm["conv2d"] = lambda: autoconv.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups,
                                             db=db_path)
    warm["onnxruntime"] = lambda: ort.run(x)
    for name, (_, _, err, plan) in methods.items():
        if not err < TOLERANCE:
            raise SystemExit(f"{layer.label}: {name} ({plan}) is wrong: relative error {err:.1e}")
    for sampler, *_ in methods.values():  # warm every method once before the timed rounds
        sampler()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    with threadpool_limits(threads):
        for _ in range(args.rounds):
            for name, (sampler, *_) in methods.items():
                # Each method's turn starts once the thread pools the one before left spinning
                # (OpenBLAS's for about 0.1 s, onnxruntime's) have stopped, and after one
                # untimed call: else each method is timed beside the last one's spinning threads.
                time.sleep(SETTLE_S)
                warm[name]()
                samples[name] += sampler()
    return {"layer": layer, "served": served, "methods": methods, "weight_stage": weight_stage,
            "times": {name: stats(values) for name, values in samples.items()}}


def fmt_ms(value: tuple[float, float] | None, spec: ConvSpec) -> str:
    if value is None:
        return "-"
    median, spread = value
    return f"{median:.3f} ±{spread * 100:.0f}% ({spec.flops / (median * 1e6):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="tuning budget per layer (all algorithms together)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--models", default="resnet50,vgg16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/algorithms-pocl.md")
    parser.add_argument("--ship", default=None, help="also write the tuned DB here (e.g. tuning_db/pocl-cpu.db)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--layers", default=None, help="only these layer names (a quick look)")
    args = parser.parse_args()

    device = int(args.device) if args.device and args.device.isdigit() else args.device
    backend = get_backend("opencl", device)
    info = backend.device
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="autoconv-algorithms-"))
    db_path = work / "tuning.db"
    models = args.models.split(",")
    rows: dict[int, list[dict]] = {}
    tuning: dict[tuple[int, str], float] = {}
    started_all = time.monotonic()
    for batch in (int(v) for v in args.batches.split(",")):
        layers = [layer for layer in public_layers(models, batch)
                  if args.layers is None or layer.name in args.layers.split(",")]
        rows[batch] = []
        for layer in layers:
            algorithms = tuple(a for a in autoconv.list_algorithms()
                               if a != DIRECT or layer.spec.flops / 1e9 <= DIRECT_LIMIT_GFLOP)
            print(f"[{time.monotonic() - started_all:6.0f}s] tuning {layer.label} n={batch} ...", file=sys.stderr,
                  flush=True)
            with SQLiteStore(db_path) as db:
                (report,) = tune_layers([(layer.label, layer.spec)], backend, db, trials=args.trials,
                                        algorithms=algorithms)
            tuning[(batch, layer.label)] = report.wall_s
            print(f"[{time.monotonic() - started_all:6.0f}s] measuring {layer.label} n={batch} ...", file=sys.stderr,
                  flush=True)
            rows[batch].append(measure_layer(layer, backend, db_path, args, threads))

    names = [n for n in autoconv.list_algorithms()]
    lines = [
        f"# Algorithms per layer vs onnxruntime — {info.name}",
        "",
        f"Measured {datetime.date.today().isoformat()} by `scripts/bench_algorithms.py --trials {args.trials} "
        f"--batches {args.batches}` (autoconv {autoconv.__version__}, onnxruntime {_ort_version()}) on {info.platform}, "
        f"driver {info.driver}, {info.compute_units} compute units; host {platform.machine()}, {threads} cores, "
        f"{_blas()}. Layers: {', '.join(models)} of `shared/layers/public.json`, float32, NCHW.",
        "",
        f"Each layer was tuned with {args.trials} trials (all algorithms together: each default first, then the "
        "tunable algorithms within 2x of the best so far), then re-measured on fresh data: every method checked "
        f"against the float64 reference (relative error < {TOLERANCE:.0e}), then {args.rounds} interleaved rounds of "
        f"{args.repeats} runs each, each method's turn starting {SETTLE_S} s after the last one's (once the thread "
        "pools it left spinning have stopped) with one untimed call. Cells: median ms ±spread (IQR / median) and (GFLOP/s, direct-convolution FLOPs "
        "for every method, Winograd's included). Generated kernels "
        "(im2col_gemm, implicit_gemm, winograd, blocked_direct, direct) are OpenCL kernel-event times per call (Winograd's filter "
        "transform, run once per weights, is timed on its own in the last column); im2col_blas (numpy + OpenBLAS), "
        "`conv2d` (autoconv.conv2d end to end on numpy arrays: layer spec, plan lookup, the served plan) and onnxruntime (`Conv`, "
        f"CPUExecutionProvider, intra-op threads = {threads}) are wall-clock. OpenBLAS was held to {threads} threads. "
        f"Direct loops are skipped above {DIRECT_LIMIT_GFLOP:.0f} GFLOP (10-30x slower than the rest). \"served\" "
        "is the plan `autoconv.lookup` gives after tuning (its kernel time is that algorithm's column).",
    ]
    goals = []
    for batch, layer_rows in rows.items():
        lines += ["", f"## Batch {batch}", "",
                  "| layer | GFLOP | " + " | ".join(names) + " | served | conv2d wall | onnxruntime | served vs ort | "
                  "extra memory (im2col_gemm / implicit_gemm / winograd) | winograd error | winograd filter transform |",
                  "|---|---:|" + "---:|" * len(names) + "---|---:|---:|---:|---|---:|---:|"]
        for row in layer_rows:
            spec, times, methods = row["layer"].spec, row["times"], row["methods"]
            served = row["served"].algorithm
            served_ms = times[served][0] if served in times else math.nan
            ort_ms = times["onnxruntime"][0]
            mem = " / ".join(f"{methods[n][1] / 2**20:.1f} MiB" if n in methods else "-"
                             for n in (IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD))
            wino_error = f"{methods[WINOGRAD][2]:.1e}" if WINOGRAD in methods else "-"
            wino_filter = (f"{row['weight_stage'][WINOGRAD][0]:.3f} ms (once per weights)"
                           if WINOGRAD in row["weight_stage"] else "-")
            lines.append(f"| {row['layer'].label} | {spec.flops / 1e9:.3f} | "
                         + " | ".join(fmt_ms(times.get(n), spec) for n in names)
                         + f" | {served} | {fmt_ms(times['conv2d'], spec)} | {fmt_ms(times['onnxruntime'], spec)} | "
                         f"{ort_ms / served_ms:.2f}x | {mem} | {wino_error} | {wino_filter} |")
        resnet = [r for r in layer_rows if r["layer"].model == "resnet50"]
        wins = [r for r in resnet if r["times"]["onnxruntime"][0] >= r["times"][r["served"].algorithm][0]]
        wins_wall = [r for r in resnet if r["times"]["onnxruntime"][0] >= r["times"]["conv2d"][0]]
        goals.append(f"- Batch {batch}: the served plan's kernels are at least as fast as onnxruntime on "
                     f"{len(wins)} of {len(resnet)} ResNet-50 layers ({', '.join(r['layer'].name for r in wins) or 'none'}); "
                     f"`conv2d` end to end on {len(wins_wall)} of {len(resnet)}.")
        pointwise_or_strided = [r for r in layer_rows if r["layer"].spec.r == 1 or r["layer"].spec.stride != (1, 1)]
        ratios = [(r["layer"].name, r["times"][IM2COL_GEMM][0] / r["times"][IMPLICIT_GEMM][0],
                   r["methods"][IMPLICIT_GEMM][1]) for r in pointwise_or_strided]
        goals.append(f"- Batch {batch}: implicit GEMM vs im2col+GEMM (both tuned) on the 1x1 and stride-2 layers: "
                     + ", ".join(f"{name} {ratio:.2f}x ({extra / 2**20:.1f} MiB extra)" for name, ratio, extra in ratios)
                     + f"; at least 1.0x on {sum(r >= 1.0 for _, r, _ in ratios)} of {len(ratios)}.")
        winograd_rows = [r for r in layer_rows if WINOGRAD in r["times"]]
        vs_gemm = [(r["layer"].label, r["times"][IM2COL_GEMM][0] / r["times"][WINOGRAD][0],
                    r["times"]["onnxruntime"][0] / r["times"][WINOGRAD][0]) for r in winograd_rows]
        goals.append(f"- Batch {batch}: tuned winograd on the 3x3 stride-1 layers, vs tuned im2col+GEMM (goal 1.5x) / "
                     "vs onnxruntime (goal 1.2x): " + ", ".join(f"{label} {g:.2f}x / {o:.2f}x" for label, g, o in vs_gemm)
                     + f"; both goals met on {sum(g >= 1.5 and o >= 1.2 for _, g, o in vs_gemm)} of {len(vs_gemm)}"
                     + (f" (geomean {statistics.geometric_mean([g for _, g, _ in vs_gemm]):.2f}x / "
                        f"{statistics.geometric_mean([o for _, _, o in vs_gemm]):.2f}x)." if vs_gemm else "."))
        served_counts = {}
        for r in layer_rows:
            served_counts[r["served"].algorithm] = served_counts.get(r["served"].algorithm, 0) + 1
        goals.append(f"- Batch {batch}: served algorithms: "
                     + ", ".join(f"{name} {count}" for name, count in sorted(served_counts.items())) + ".")
    lines += ["", "## Against the goals", "", *goals, "",
              "Tuning wall time per layer (s): " + ", ".join(f"{label} n={batch} {s:.0f}" for (batch, label), s in
                                                             tuning.items()), "",
              "Served plans:", ""]
    for batch, layer_rows in rows.items():
        lines += [f"- n={batch} {r['layer'].label}: {r['served'].describe()}" for r in layer_rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))
    if args.ship:
        ship(db_path, Path(args.ship))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def ship(db_path: Path, target: Path) -> None:
    """A shipped database: rollback journal (no -wal beside it), no measurements, written atomically."""
    with SQLiteStore(db_path) as db:
        db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.db.disable_wal()
        db.db.execute("delete from measurements")
        db.db.conn.commit()
        db.db.vacuum()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(db_path, tmp)
    os.replace(tmp, target)
    print(f"shipped database written to {target}", file=sys.stderr)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _blas() -> str:
    from threadpoolctl import threadpool_info

    found = [f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')})" for i in threadpool_info()
             if i.get("user_api") == "blas"]
    return "numpy BLAS: " + (", ".join(found) or "unknown")


if __name__ == "__main__":
    sys.exit(main())
