"""A whole model on autoconv against onnxruntime (what the user runs today): end-to-end latency on the
same random input, interleaved round by round with the thread pools held to the same count, the
outputs compared, the time per operator type and per step, and the conv layers on fallback plans.
What `autoconv model bench` and scripts/bench_models.py report."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from autoconv.graph.prepare import UnsupportedModelError, load_proto, onnx_module, with_batch
from autoconv.graph.runner import Model, StepRow

SETTLE_S = 0.2  # between methods: longer than OpenBLAS's and onnxruntime's idle spinning


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # IQR / median over rounds


@dataclass(frozen=True)
class ModelComparison:
    name: str
    batch: int
    autoconv: Timing
    onnxruntime: Timing
    error: float  # largest relative error of autoconv's outputs against onnxruntime's
    per_op: dict[str, float]  # op type (a fused group by its ops) -> ms per run
    steps: list[tuple[StepRow, float]]  # each step and its ms in one timed run
    fallbacks: list[StepRow]  # conv layers served an untuned plan

    @property
    def speed(self) -> float:
        """onnxruntime's time over autoconv's (above 1: autoconv is faster)."""
        return self.onnxruntime.median_ms / self.autoconv.median_ms

    @property
    def non_conv_share(self) -> float:
        total = sum(ms for _, ms in self.steps)
        return sum(ms for row, ms in self.steps if row.runs_on != "autoconv layer") / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.name, "batch": self.batch, "autoconv_ms": self.autoconv.median_ms,
                "autoconv_spread": self.autoconv.spread, "onnxruntime_ms": self.onnxruntime.median_ms,
                "onnxruntime_spread": self.onnxruntime.spread, "speed_vs_onnxruntime": self.speed,
                "max_relative_error": self.error, "non_conv_share": self.non_conv_share, "per_op_ms": self.per_op,
                "steps": [{"name": r.name, "ops": r.ops, "runs_on": r.runs_on, "plan": r.plan, "ms": ms}
                          for r, ms in self.steps],
                "fallback_layers": [r.name for r in self.fallbacks]}


def timing(samples: list[float]) -> Timing:
    """The median of `samples` and their spread (IQR / median; 0 for fewer than two)."""
    median = statistics.median(samples)
    if len(samples) < 2 or median == 0:
        return Timing(median, 0.0)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Timing(median, (q3 - q1) / median)


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """The median wall time in ms of `repeats` calls, after SETTLE_S and `warmup` untimed calls
    (caches warm, the other method's spinning threads gone)."""
    time.sleep(SETTLE_S)
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def compare_model(model: Any, *, batch: int | None = None, rounds: int = 5, repeats: int = 5, db: str | None = None,
                  backend: str | None = None, device: int | str | None = None, threads: int | None = None,
                  seed: int = 0, name: str = "model", layout: str | None = None) -> ModelComparison:
    """Run `model` (a path or ModelProto) on autoconv (`layout`: as autoconv.onnx.load's) and on
    onnxruntime's CPU execution provider (default session options, `threads` intra-op threads: the
    machine's cores by default)."""
    import os

    try:
        import onnxruntime as ort
    except ImportError:
        raise UnsupportedModelError("comparing with onnxruntime needs it: pip install onnxruntime "
                                    "(autoconv's [bench] extra)") from None
    from threadpoolctl import threadpool_limits

    from autoconv.graph.prepare import prepare

    onnx_module()
    proto = load_proto(model)
    if batch is not None:
        proto = with_batch(proto, batch)
    threads = threads or os.cpu_count() or 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallbacks are listed in the result instead
        loaded = Model(prepare(proto), device=device, backend=backend, db=db, layout=layout)
    rng = np.random.default_rng(seed)
    feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in loaded.inputs}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = session.run(loaded.output_names, feed)
    got = loaded.run(None, feed)
    error = max(float(np.abs(g.astype(np.float64) - e).max() / max(float(np.abs(e).max()), 1e-30))
                for g, e in zip(got, expected))
    ours, theirs = [], []
    # The BLAS may use every core (onnxruntime's Gemm does not use it); the model runner holds it to
    # one thread itself where its kernels share the CPU.
    with threadpool_limits(limits=threads, user_api="blas"):
        for _ in range(rounds):
            theirs.append(median_ms(lambda: session.run(None, feed), repeats))
            ours.append(median_ms(lambda: loaded.run(None, feed), repeats))
        _, steps = loaded.timed_run(feed)
    per_op: dict[str, float] = {}
    for row, ms in steps:
        per_op[row.ops] = per_op.get(row.ops, 0.0) + ms
    fallbacks = [row for row, _ in steps if row.runs_on == "autoconv layer" and "(tuned" not in row.plan]
    return ModelComparison(name, loaded.inputs[0][1][0] if loaded.inputs else 1,
                           timing(ours), timing(theirs), error, per_op, steps, fallbacks)
