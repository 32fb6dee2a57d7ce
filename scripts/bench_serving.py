"""Benchmark: what serving costs above the kernels, on the default OpenCL device (PoCL's CPU
device on our machines), and a ResNet-50 bottleneck block chained on the device against
onnxruntime running the same graph. Writes benchmarks/serving-pocl.md.

Per ResNet-50 layer at batch 1 (../shared/layers/public.json), with the plan the tuning databases
serve (the shipped ones; nothing of the user's): the kernels' own time, an `autoconv.Conv2d` call
and an `autoconv.conv2d` call on numpy arrays, and the overhead of each call above its kernels.
For a device plan the kernel time is each call's own kernel events (first start to last end), so
the overhead is per call (wall clock minus the span of its kernels); for a plan served on the host
(im2col + numpy's BLAS) it is the same computation called directly (im2col, numpy.matmul, bias,
epilogue), timed in the same rounds. A tiny layer (1x16x8x8, 16 filters 1x1), where overhead is
everything, is measured with its served plan and with each of a device and a host plan forced.

The block (1x1 256->64, 3x3 64->64, 1x1 64->256, the shortcut added before the last ReLU; each
layer's bias and ReLU fused) runs as Conv2d layers chained on device arrays, as the same layers
with host arrays between them, and as onnxruntime's CPU execution provider on the equivalent ONNX
graph (examples/resnet_block.py). The block's layers are tuned first with --block-trials trials
each (what a user of the block would run), into a scratch database.

All methods are interleaved round by round; OpenBLAS and onnxruntime are held to the machine's
cores; medians with their spread (IQR / median).

    pip install '.[bench]' && python scripts/bench_serving.py [--rounds 7] [--repeats 20]
        [--block-trials 20] [--out benchmarks/serving-pocl.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "layers" / "public.json"
OVERHEAD_GOAL_LAYER_US = 50.0
OVERHEAD_GOAL_CONV2D_US = 150.0
SETTLE_S = 0.2  # between blocks of different methods: longer than OpenBLAS's idle spinning


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("resnet_block", ROOT / "examples" / "resnet_block.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def stats(samples: list[float]) -> tuple[float, float]:
    median = statistics.median(samples)
    if len(samples) < 2 or median == 0:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, (q3 - q1) / abs(median)


class Method:
    """One way of running a layer: a call, and how to read the kernel time of the call just made
    (None: a host computation, whose kernel time is the direct call measured beside it).

    A block of calls runs with the BLAS held to `blas_threads` (one for device plans: OpenBLAS's
    idle threads spin after a call and would take the cores PoCL runs on, the tuner's rule), and
    starts after SETTLE_S and a few untimed calls, so that threads another method left spinning
    (OpenBLAS's spin for about 0.1 s after a call) have stopped."""

    def __init__(self, call: Callable[[], Any], kernel_ms: Callable[[], float | None] | None = None, *,
                 blas_threads: int = 1) -> None:
        self.call, self.kernel_ms, self.blas_threads = call, kernel_ms, blas_threads
        self.wall: list[float] = []
        self.kernels: list[float] = []
        self.overheads: list[float] = []

    def sample(self, repeats: int, warmup: int = 3) -> None:
        from threadpoolctl import threadpool_limits

        time.sleep(SETTLE_S)
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            for _ in range(warmup):
                self.call()
            self._timed(repeats)

    def _timed(self, repeats: int) -> None:
        for _ in range(repeats):
            start = time.perf_counter()
            self.call()
            wall = (time.perf_counter() - start) * 1e3
            self.wall.append(wall)
            kernel = self.kernel_ms() if self.kernel_ms else None
            if kernel is not None:
                self.kernels.append(kernel)
                self.overheads.append((wall - kernel) * 1e3)


def span_reader(conv: Any) -> Callable[[], float | None] | None:
    """The kernel time of a prepared conv's latest call, from its events (device plans)."""
    if not hasattr(conv, "last_events"):
        return None
    return lambda: conv.runtime.span_ms(conv.last_events)


def driver_floor(conv: Any) -> Method | None:
    """The plan's per-call kernels launched with pyopencl alone, on buffers made once, and waited
    for: what the driver itself costs per call (None for a plan on the host)."""
    if not hasattr(conv, "sources") or getattr(conv.runtime, "name", "") != "opencl":
        return None
    import pyopencl as cl

    from autoconv.algorithms import get_algorithm
    from autoconv.backends.base import conv_buffers

    runtime, spec = conv.runtime, conv.spec
    sizes = conv_buffers(spec, get_algorithm(conv.plan.algorithm).scratch_bytes(spec, conv.plan.params))
    buffers = {kind: cl.Buffer(runtime.context, cl.mem_flags.READ_WRITE, max(4, size)) for kind, size in sizes.items()}
    launches = []
    for source in conv.sources:
        if source.once_per_weights:
            continue
        kernel = runtime.kernel(source)  # the backend's own build of the source (its program cache)
        kernel.set_args(*(np.int32(arg.value) if arg.kind == "int" else buffers[arg.kind] for arg in source.args))
        launches.append((kernel, source.global_size, source.local_size))
    last: list[Any] = []

    def call() -> None:
        assert buffers  # the kernels' arguments: pyopencl keeps no reference to them
        events = [cl.enqueue_nd_range_kernel(runtime.queue, kernel, size, local) for kernel, size, local in launches]
        events[-1].wait()
        last[:] = events

    return Method(call, lambda: (last[-1].profile.end - last[0].profile.start) * 1e-6)


def measure(spec: Any, plan_algorithm: str | None, db: str | None, rounds: int, repeats: int) -> dict:
    """Conv2d and conv2d on one layer (its served plan, or one algorithm forced), and the host
    computation called directly."""
    import autoconv
    from autoconv.algorithms import get_algorithm
    from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

    x, w, b = operands = random_operands(spec, seed=1)
    reference = reference_output(spec, operands)
    threads = os.cpu_count() or 1
    layer = autoconv.Conv2d(w, b, spec.stride, spec.padding, spec.dilation, spec.groups, db=db,
                            algorithm=plan_algorithm)
    plan = layer.prepare(x.shape)
    session = autoconv.default_session()
    backend = autoconv.get_backend("opencl")
    assert autoconv.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups, db=db,
                           algorithm=plan_algorithm) is not None
    functional = session.runner(spec, backend, session.choose_plan(spec, backend, db, algorithm=plan_algorithm))
    host = get_algorithm("im2col_blas")
    from autoconv import epilogue

    on_host = not hasattr(layer.prepared(x.shape), "last_events")
    blas = threads if on_host else 1  # the host BLAS gets every core when it does the work
    methods = {
        "Conv2d": Method(lambda: layer(x), span_reader(layer.prepared(x.shape)), blas_threads=blas),
        "conv2d": Method(lambda: autoconv.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups,
                                                 db=db, algorithm=plan_algorithm), span_reader(functional.conv),
                         blas_threads=blas),
        "numpy directly": Method(lambda: epilogue.apply(spec, host.run_host(spec, x, w, b), None), blas_threads=threads),
    }
    floor = driver_floor(layer.prepared(x.shape))
    for name, method in methods.items():  # the driver floor's buffers hold no data: not checked
        error = relative_error(np.asarray(method.call()), reference)
        if not error < TOLERANCE:
            raise SystemExit(f"{spec}: {name} ({plan.describe()}) is wrong: relative error {error:.1e}")
    if floor is not None:
        floor.call()
        methods["driver floor"] = floor
    for _ in range(rounds):
        for method in methods.values():
            method.sample(repeats)
    return {"spec": spec, "plan": plan, "on_host": on_host, "methods": methods}


def overhead_us(row: dict, name: str) -> tuple[float, float]:
    """A call's overhead above its kernels: per call from its events (device plans), or the
    difference of the medians against the direct host computation (host plans)."""
    method = row["methods"][name]
    if method.overheads:
        return stats(method.overheads)
    direct = statistics.median(row["methods"]["numpy directly"].wall)
    median, spread = stats(method.wall)
    return (median - direct) * 1e3, spread * median * 1e3 / max(abs(median - direct) * 1e3, 1e-9)


def kernel_ms(row: dict) -> tuple[float, float]:
    method = row["methods"]["Conv2d"]
    return stats(method.kernels) if method.kernels else stats(row["methods"]["numpy directly"].wall)


def fmt(value: tuple[float, float], unit: str = "ms", digits: int = 3) -> str:
    median, spread = value
    return f"{median:.{digits}f} {unit} ±{spread * 100:.0f}%"


def layer_table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| layer | plan | kernels | Conv2d call | Conv2d overhead | conv2d call | conv2d overhead | driver floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows:
        plan = row["plan"]
        where = " (host)" if row["on_host"] else ""
        layer_over, conv_over = overhead_us(row, "Conv2d"), overhead_us(row, "conv2d")
        floor = f"{overhead_us(row, 'driver floor')[0]:.0f} µs" if "driver floor" in row["methods"] else "-"
        lines.append(f"| {name} | {plan.algorithm}{where}, {plan.source} | {fmt(kernel_ms(row))} | "
                     f"{fmt(stats(row['methods']['Conv2d'].wall))} | {layer_over[0]:.0f} µs | "
                     f"{fmt(stats(row['methods']['conv2d'].wall))} | {conv_over[0]:.0f} µs | {floor} |")
    return lines


def measure_block(example: Any, db: str, rounds: int, repeats: int, threads: int) -> dict:
    import autoconv

    weights = example.BlockWeights.random()
    x = np.random.default_rng(1).standard_normal((1, weights.channels, 56, 56)).astype(np.float32)
    layers = example.autoconv_block(weights, db)
    x_device = autoconv.to_device(x)
    session = example.onnxruntime_session(example.onnx_block(weights, x.shape), threads)
    methods = {
        "autoconv, chained on the device": lambda: example.run_chained(layers, x_device),
        "autoconv, host round trips": lambda: example.run_round_trips(layers, x),
        "onnxruntime (same graph)": lambda: session.run(None, {"x": x})[0],
    }
    expected = example.reference_block(weights, x)
    errors = {name: example.relative_error(np.asarray(run()), expected) for name, run in methods.items()}
    for name, error in errors.items():
        if not error < example.TOLERANCE:
            raise SystemExit(f"bottleneck block: {name} is wrong: relative error {error:.1e}")
    example.interleaved(methods, 1, 3)  # warm-up
    samples = example.interleaved(methods, rounds, repeats, settle_s=SETTLE_S)
    plans = [next(iter(layer.plans.values())).describe() for layer in layers]
    # The chain's own kernels: each layer's kernel events in chained runs (device plans only).
    convs = [layer.prepared(shape, residual=index == 2) for index, (layer, shape) in
             enumerate(zip(layers, (x.shape, *[(1, weights.w1.shape[0], 56, 56)] * 2)))]
    readers = [span_reader(conv) for conv in convs]
    kernels: list[float] = []
    if all(readers):
        time.sleep(SETTLE_S)
        for _ in range(rounds * repeats):
            example.run_chained(layers, x_device)
            kernels.append(sum(read() for read in readers))
    return {"times": {name: stats(values) for name, values in samples.items()}, "errors": errors, "plans": plans,
            "specs": weights.specs(1, 56), "kernels": stats(kernels) if kernels else None,
            "per_layer": block_layers(example, weights, layers, x, rounds, repeats, threads)}


def block_layers(example: Any, weights: Any, layers: tuple, x: np.ndarray, rounds: int, repeats: int,
                 threads: int) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """Each of the block's convolutions alone: the layer's call against onnxruntime's single Conv
    (+ Relu, + Add) node on the same input, interleaved: where the block's time goes."""
    from onnx import TensorProto, helper, numpy_helper

    specs = weights.specs(1, 56)
    inputs = [x, np.random.default_rng(5).uniform(0, 1, specs[1].input_shape).astype(np.float32),
              np.random.default_rng(6).uniform(0, 1, specs[2].input_shape).astype(np.float32)]
    residual = np.random.default_rng(7).standard_normal(specs[2].output_shape).astype(np.float32)
    rows = []
    parameters = ((weights.w1, weights.b1), (weights.w2, weights.b2), (weights.w3, weights.b3))
    for index, (spec, layer, data, (weight, bias)) in enumerate(zip(specs, layers, inputs, parameters)):
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[spec.r, spec.s],
                                  pads=[spec.padding[0], spec.padding[1]] * 2)]
        feeds = {"x": data}
        if spec.residual:
            nodes.append(helper.make_node("Add", ["c", "r"], ["a"]))
            feeds["r"] = residual
        nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["y"]))
        graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))
                        for name, value in feeds.items()]
        graph = helper.make_graph(nodes, "conv", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        session = example.onnxruntime_session(model.SerializeToString(), threads)
        extra = residual if spec.residual else None
        timed = example.interleaved({"autoconv": lambda: layer(data, residual=extra),
                                     "onnxruntime": lambda: session.run(None, feeds)}, rounds, repeats,
                                    settle_s=SETTLE_S)
        rows.append((f"conv{index + 1} {spec}", stats(timed["autoconv"]), stats(timed["onnxruntime"])))
    return rows


def tune_block(example: Any, db: Path, trials: int) -> float:
    """Tune the block's three layers (with their fused epilogues) as `autoconv tune` would."""
    import autoconv
    from autoconv.store import SQLiteStore
    from autoconv.tuning.tuner import tune_layers

    specs = example.BlockWeights.random().specs(1, 56)
    start = time.perf_counter()
    with SQLiteStore(db) as store:
        tune_layers([(f"block/conv{i + 1}", spec) for i, spec in enumerate(specs)], autoconv.get_backend("opencl"),
                    store, trials=trials)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-trials", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "serving-pocl.md"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="autoconv-bench-serving-"))
    os.environ["AUTOCONV_DB"] = str(scratch / "user.db")  # the shipped databases only, and the block's tuning
    import autoconv
    from autoconv.layers import model_layers
    from threadpoolctl import threadpool_info

    threads = os.cpu_count() or 1
    example = load_example()
    block_db = scratch / "block.db"
    tuning_s = tune_block(example, block_db, args.block_trials) if args.block_trials else 0.0
    backend = autoconv.get_backend("opencl")
    layers = [layer for layer in model_layers("resnet50", 1)]
    if SHARED.exists():
        import json

        wanted = {row["name"] for row in json.loads(SHARED.read_text())["resnet50"]}
        layers = [layer for layer in layers if layer.name in wanted]
    tiny = autoconv.ConvSpec(1, 16, 8, 8, 16, 1, 1)
    # Each method holds the BLAS threads it runs with (Method.sample).
    rows = [(layer.label, measure(layer.spec, None, None, args.rounds, args.repeats)) for layer in layers]
    print("measured the ResNet-50 layers", file=sys.stderr)
    tiny_rows = [(f"tiny 1x16x8x8 * 16x16x1x1 ({label})", measure(tiny, forced, None, args.rounds, args.repeats))
                 for label, forced in (("served", None), ("implicit_gemm forced", "implicit_gemm"),
                                       ("im2col_blas forced", "im2col_blas"))]
    block = measure_block(example, str(block_db), args.rounds, max(3, args.repeats // 4), threads)
    blas = [f"{pool['internal_api']} {pool['version']} ({pool.get('architecture', '?')})"
            for pool in threadpool_info() if pool["user_api"] == "blas"]
    import onnxruntime

    device = backend.device
    out = [f"# Serving overhead and a chained ResNet-50 block — {device.name}", "",
           f"Measured {datetime.date.today().isoformat()} by `scripts/bench_serving.py --rounds {args.rounds} "
           f"--repeats {args.repeats} --block-trials {args.block_trials}` (autoconv {autoconv.__version__}, "
           f"onnxruntime {onnxruntime.__version__}) on {device.platform}, driver {device.driver}, "
           f"{device.compute_units} compute units, host memory \"{backend.host_memory}\"; host {platform.machine()}, "
           f"{threads} cores, numpy BLAS: {', '.join(blas) or 'unknown'} held to {threads} threads.", "",
           "Every method was checked against the float64 reference (relative error < 1e-4) before it was timed; "
           f"the methods took turns in {args.rounds} rounds of {args.repeats} calls. Cells: median ±spread "
           "(IQR / median). **Kernels**: for a device plan, each call's own kernel events (first start to last "
           "end), and the **overhead** is per call, wall clock minus that span (median over calls); for a plan "
           "served on the host, the same computation called directly (im2col, numpy.matmul, bias, epilogue), and "
           "the overhead is the difference of the medians. `Conv2d` is a layer made once from the weights; "
           "`conv2d` the functional call, given the weights each time. **Driver floor**: the same per-call kernels "
           "launched with pyopencl alone, on buffers made once, and waited for (wall clock minus the kernels' span, "
           "per call): what the OpenCL driver itself costs per call, below which no caller can go. Each method's "
           f"turn starts {SETTLE_S} s after the last one's, with 3 untimed calls, its BLAS held to one thread for a "
           "device plan (OpenBLAS's idle threads spin for about 0.1 s after a call and take the cores PoCL runs "
           "on) and to every core for a host plan.", "",
           "## ResNet-50 layers, batch 1 (plans from the shipped database)", "",
           *layer_table(rows), "", "## A tiny layer, where overhead is everything", "", *layer_table(tiny_rows), ""]
    times, errors = block["times"], block["errors"]
    ort = times["onnxruntime (same graph)"][0]
    out += ["## The ResNet-50 bottleneck block (res2, 1x256x56x56)", "",
            f"The block's layers were tuned first ({args.block_trials} trials each, {tuning_s:.0f} s); plans: "
            + "; ".join(f"conv{i + 1} {plan}" for i, plan in enumerate(block["plans"])) + ".", "",
            "| method | time | vs onnxruntime | relative error |", "|---|---:|---:|---:|"]
    for name, value in times.items():
        out.append(f"| {name} | {fmt(value)} | {ort / value[0]:.2f}x | {errors[name]:.1e} |")
    out += ["", "Each convolution of the block alone (its `Conv2d` call on host arrays; onnxruntime's Conv, "
                "Add and Relu nodes on the same input):", "", "| layer | autoconv | onnxruntime | autoconv vs onnxruntime |",
            "|---|---:|---:|---:|"]
    for name, ours, theirs in block["per_layer"]:
        out.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} | {theirs[0] / ours[0]:.2f}x |")
    if block["kernels"] is not None:
        out += ["", f"The chained block's kernels alone (the three layers' kernel events, summed per run): "
                    f"{fmt(block['kernels'])}; the chain adds "
                    f"{times['autoconv, chained on the device'][0] - block['kernels'][0]:.3f} ms to them."]
    device_rows = [row for _, row in rows + tiny_rows if not row["on_host"]]
    all_rows = rows + tiny_rows
    layer_met = [name for name, row in all_rows if overhead_us(row, "Conv2d")[0] <= OVERHEAD_GOAL_LAYER_US]
    conv_met = [name for name, row in all_rows if overhead_us(row, "conv2d")[0] <= OVERHEAD_GOAL_CONV2D_US]
    chained = times["autoconv, chained on the device"][0]
    own = [overhead_us(row, "Conv2d")[0] - overhead_us(row, "driver floor")[0] for _, row in all_rows
           if "driver floor" in row["methods"]]
    out += ["", "## Against the goals", "",
            f"- `Conv2d` call at most {OVERHEAD_GOAL_LAYER_US:.0f} µs above its kernels: met on {len(layer_met)} of "
            f"{len(all_rows)} rows ({len(device_rows)} with a device plan); worst "
            f"{max(overhead_us(row, 'Conv2d')[0] for _, row in all_rows):.0f} µs. On the device plans, the call's "
            f"overhead less the driver floor (autoconv's own share) is {statistics.median(own):.0f} µs at the median "
            f"(from {min(own):.0f} to {max(own):.0f} µs)." if own else "",
            f"- `conv2d` on numpy arrays at most {OVERHEAD_GOAL_CONV2D_US:.0f} µs above its kernels: met on "
            f"{len(conv_met)} of {len(all_rows)} rows; worst {max(overhead_us(row, 'conv2d')[0] for _, row in all_rows):.0f} µs.",
            f"- The chained bottleneck block at least as fast as onnxruntime running the same graph: "
            f"{'met' if chained <= ort else 'not met'} ({ort / chained:.2f}x onnxruntime's speed).", ""]
    missed = [name for name, _ in all_rows if name not in layer_met]
    if missed:
        out.append("Rows where `Conv2d`'s overhead is above the goal: " + ", ".join(missed) + ".")
    missed = [name for name, _ in all_rows if name not in conv_met]
    if missed:
        out.append("Rows where `conv2d`'s overhead is above the goal: " + ", ".join(missed) + ".")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
