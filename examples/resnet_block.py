"""A ResNet-50 bottleneck block, relu(conv1x1(relu(conv3x3(relu(conv1x1(x))))) + x), with random
weights, run three ways and checked against a float64 reference:

- autoconv layers chained on the device: each Conv2d fuses its bias and ReLU (the last one also
  the shortcut) into its kernels, and the arrays between them never leave the device;
- the same layers with host arrays between them (a round trip per layer);
- onnxruntime's CPU execution provider running the same graph, built with the onnx helper (its
  optimiser fuses Conv+Relu and Conv+Add+Relu the same way).

    pip install '.[bench]' && python examples/resnet_block.py [--batch 1] [--size 56] [--rounds 7]

It prints the relative errors and the median time of each (with its spread, IQR / median) over
interleaved rounds; scripts/bench_serving.py measures the same block for benchmarks/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import autoconv
from autoconv.tuning.verify import reference_output, relative_error

TOLERANCE = 1e-4


@dataclass(frozen=True)
class BlockWeights:
    """The three convolutions of a bottleneck block (ResNet-50's res2 identity block by default)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    @classmethod
    def random(cls, channels: int = 256, width: int = 64, seed: int = 0) -> "BlockWeights":
        rng = np.random.default_rng(seed)

        def he(*shape: int) -> np.ndarray:  # He initialisation: activations keep their scale
            return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

        def small(k: int) -> np.ndarray:
            return rng.uniform(-0.1, 0.1, k).astype(np.float32)

        return cls(he(width, channels, 1, 1), small(width), he(width, width, 3, 3), small(width),
                   he(channels, width, 1, 1), small(channels))

    @property
    def channels(self) -> int:
        return self.w1.shape[1]

    def specs(self, batch: int, size: int) -> tuple[autoconv.ConvSpec, ...]:
        """The three layers as ConvSpecs, each with its fused epilogue."""
        c, width = self.channels, self.w1.shape[0]
        return (autoconv.ConvSpec(batch, c, size, size, width, 1, 1, bias=True, activation="relu"),
                autoconv.ConvSpec(batch, width, size, size, width, 3, 3, padding=1, bias=True, activation="relu"),
                autoconv.ConvSpec(batch, width, size, size, c, 1, 1, bias=True, activation="relu", residual=True))


def autoconv_block(weights: BlockWeights, db: str | None = None) -> tuple[autoconv.Conv2d, ...]:
    return (autoconv.Conv2d(weights.w1, weights.b1, activation="relu", db=db),
            autoconv.Conv2d(weights.w2, weights.b2, padding=1, activation="relu", db=db),
            autoconv.Conv2d(weights.w3, weights.b3, activation="relu", db=db))


def run_chained(layers: tuple[autoconv.Conv2d, ...], x_device: Any) -> np.ndarray:
    """The block on device arrays; only the result comes home."""
    c1, c2, c3 = layers
    return np.asarray(c3(c2(c1(x_device)), residual=x_device))


def run_round_trips(layers: tuple[autoconv.Conv2d, ...], x: np.ndarray) -> np.ndarray:
    """The block on host arrays: every layer's result is brought home and sent back."""
    c1, c2, c3 = layers
    return c3(c2(c1(x)), residual=x)


def onnx_block(weights: BlockWeights, input_shape: tuple[int, ...]) -> bytes:
    """The same block as an ONNX graph (opset 13), weights as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    channels = input_shape[1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c3", "x"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
    ]
    initializers = [numpy_helper.from_array(getattr(weights, name), name)
                    for name in ("w1", "b1", "w2", "b2", "w3", "b3")]
    graph = helper.make_graph(
        nodes, "bottleneck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [input_shape[0], channels, *input_shape[2:]])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime releases of the last years all read
    return model.SerializeToString()


def onnxruntime_session(model: bytes, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def reference_block(weights: BlockWeights, x: np.ndarray) -> np.ndarray:
    """The block in float64, layer after layer (direct loops)."""
    s1, s2, s3 = weights.specs(x.shape[0], x.shape[2])
    y1 = reference_output(s1, (x, weights.w1, weights.b1))
    y2 = reference_output(s2, (y1, weights.w2, weights.b2))
    return reference_output(s3, (y2, weights.w3, weights.b3, x.astype(np.float64)))


def interleaved(methods: dict[str, Callable[[], Any]], rounds: int, repeats: int,
                warmup: int = 2, settle_s: float = 0.2) -> dict[str, list[float]]:
    """Wall-clock ms of each method, `repeats` runs per round, the methods taking turns each round
    (so a slow stretch of the machine falls on all of them). Each turn starts after `settle_s`
    and `warmup` untimed runs: thread pools the previous method left spinning (onnxruntime's,
    OpenBLAS's, which spin for about 0.1 s after a call) have stopped before the timed ones."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, run in methods.items():
            time.sleep(settle_s)
            for _ in range(warmup):
                run()
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def median_and_spread(samples: list[float]) -> tuple[float, float]:
    median = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, (q3 - q1) / median


def missing_extras() -> list[str]:
    """What this example needs beyond autoconv's main install (pip install '.[bench]' brings both)."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True
    return [name for name in ("onnx", "onnxruntime") if absent(name)]


def main() -> int:
    missing = missing_extras()
    if missing:
        print(f"resnet_block.py needs {' and '.join(missing)}, which autoconv's main install leaves out: "
              "pip install '.[bench]' (from the autoconv checkout)", file=__import__("sys").stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=56, help="input height and width (ResNet-50's res2: 56)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--db", default=None, help="tuning database (default: autoconv's usual ones)")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threads = os.cpu_count() or 1
    weights = BlockWeights.random()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, weights.channels, args.size, args.size)).astype(np.float32)
    layers = autoconv_block(weights, args.db)
    x_device = autoconv.to_device(x)
    session = onnxruntime_session(onnx_block(weights, x.shape), threads)
    methods = {
        "autoconv, chained on the device": lambda: run_chained(layers, x_device),
        "autoconv, host round trips": lambda: run_round_trips(layers, x),
        "onnxruntime": lambda: session.run(None, {"x": x})[0],
    }
    expected = reference_block(weights, x)
    with threadpool_limits(limits=threads, user_api="blas"):
        results = {name: np.asarray(run()) for name, run in methods.items()}
        samples = interleaved(methods, args.rounds, args.repeats)
    ok = True
    print(f"ResNet-50 bottleneck block, input {x.shape}, {threads} threads; plans:")
    for index, layer in enumerate(layers, 1):
        print(f"  conv{index}: " + "; ".join(plan.describe() for plan in layer.plans.values()))
    for name, result in results.items():
        error = relative_error(result, expected)
        ok &= error < TOLERANCE
        median, spread = median_and_spread(samples[name])
        print(f"  {name:34s} {median:8.3f} ms ±{spread:4.0%}   relative error {error:.1e}")
    agreement = relative_error(results["autoconv, chained on the device"], results["onnxruntime"].astype(np.float64))
    ok &= agreement < TOLERANCE
    print(f"  autoconv vs onnxruntime: relative difference {agreement:.1e} (< {TOLERANCE:.0e}: {'yes' if ok else 'NO'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
