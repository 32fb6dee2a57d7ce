"""The Backend contract that the numpy, OpenCL and CUDA backends all implement."""

from __future__ import annotations

import math
import threading
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np

from autoconv.device import DeviceInfo
from autoconv.plan import Plan
from autoconv.render import KernelSource
from autoconv.resources import check_device, check_int_args
from autoconv.spec import ConvSpec


def conv_buffers(spec: ConvSpec, scratch_bytes: int) -> dict[str, int]:
    """The device buffers a conv's kernels read and write, by name, in bytes."""
    return {"input": spec.input_bytes, "weight": spec.weight_bytes, "bias": spec.k * spec.itemsize,
            "output": spec.output_bytes, **({"residual": spec.output_bytes} if spec.residual else {}),
            **({"scratch": scratch_bytes} if scratch_bytes else {})}


def check_fits(device: DeviceInfo, spec: ConvSpec, scratch_bytes: int, sources: Iterable[KernelSource] = ()) -> None:
    """Raise ResourceLimitError, before anything is allocated, when the conv's buffers exceed the
    device's limits or a kernel's int argument exceeds 32 bits."""
    check_device(device.name, device.max_alloc_bytes, device.global_mem_bytes, conv_buffers(spec, scratch_bytes))
    check_int_args((f"{source.entry}.{arg.name}", arg.value) for source in sources for arg in source.args
                   if arg.kind == "int")
    check_int_args((f"{source.entry} global size", size) for source in sources for size in source.global_size)


# At most this many back-to-back runs make one sample, however tiny the kernel.
MAX_RUNS_PER_SAMPLE = 1000
CALIBRATIONS = 4


def runs_per_sample(one_run_ms: float, min_sample_ms: float) -> int:
    """How many runs one timing sample spans so it lasts at least `min_sample_ms` (TVM's
    min_repeat_ms): a tiny kernel timed alone is mostly timer resolution and launch jitter."""
    if min_sample_ms <= 0 or one_run_ms >= min_sample_ms:
        return 1
    return min(MAX_RUNS_PER_SAMPLE, math.ceil(min_sample_ms / max(one_run_ms, min_sample_ms / MAX_RUNS_PER_SAMPLE)))


def calibrated_runs(time_runs: Callable[[int], float], one_run_ms: float, min_sample_ms: float) -> int:
    """runs_per_sample from a first estimate, grown until `time_runs(k)` (the ms k back-to-back
    runs take) reaches `min_sample_ms`: a warm-up run is often slower than the runs after it."""
    runs = runs_per_sample(one_run_ms, min_sample_ms)
    for _ in range(CALIBRATIONS):
        if runs == 1 or runs >= MAX_RUNS_PER_SAMPLE:
            break
        took = time_runs(runs)
        if took >= min_sample_ms:
            break
        runs = min(MAX_RUNS_PER_SAMPLE, math.ceil(runs * 1.2 * min_sample_ms / max(took, 1e-6)))
    return runs


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one run, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how far the repeats disagree."""
        if len(self.samples_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return (q3 - q1) / self.median_ms if self.median_ms > 0 else float("inf")

    def gflops(self, spec: ConvSpec) -> float:
        return spec.flops / (self.median_ms * 1e6)


@runtime_checkable
class PreparedConv(Protocol):
    """One ConvSpec made ready on a device under one Plan: kernels compiled, buffers allocated.

    `run` and `time` take every operand each time (the tuner's and the tests' way); a layer
    serves through `load_weights` once and `call` after, which reads only the input (and the
    residual of a layer that adds one)."""

    spec: ConvSpec
    plan: Plan

    @property
    def lock(self) -> threading.RLock:
        """Held by each call while it enqueues: a caller that loads weights and calls under it
        runs with its own weights, whoever calls next."""
        ...

    @property
    def transforms_weights(self) -> bool:
        """Whether it runs kernels on the weights alone when they change (a filter transform)."""
        ...

    @property
    def lends_weights(self) -> bool:
        """Whether `call(weight=...)` may read the caller's weights in place."""
        ...

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            residual: np.ndarray | None = None, *, poison: bool = False) -> np.ndarray:
        """Convolve host arrays and return a new float array of spec.output_shape; the residual
        (the output's shape) is given exactly when spec.residual.

        poison=True first fills the output with NaN, so an element the kernels never write shows.
        """
        ...

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             residual: np.ndarray | None = None, *, warmup: int = 2, repeats: int = 10, rotate: int = 3,
             stage: str = "call", min_sample_ms: float = 0.0) -> Timing:
        """Time the computation alone (inputs already on the device): warm-up runs, then repeats.

        stage="call" times what every call runs; stage="weights" what runs only when the weights
        change (a filter transform; 0 ms where there is none).

        The runs take `rotate` copies of the inputs in turn, so caches warmed by one run do not
        flatter the next. Each sample is one whole run (every kernel of the plan), event-timed on
        devices; with `min_sample_ms`, a run shorter than that is repeated back to back within a
        sample until the sample lasts that long, and the sample is their mean.
        """
        ...

    def load_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Keep a copy of the weights and bias (on the device, transformed if the plan does) for
        the calls that follow."""
        ...

    def ensure_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """load_weights unless these are the weights loaded (compared by contents)."""
        ...

    def call(self, x: Any, residual: Any = None, *, weight: np.ndarray | None = None,
             bias: np.ndarray | None = None, device_output: bool = False, poison: bool = False) -> Any:
        """Convolve float32 C-ordered host arrays of the spec's shapes (or a device backend's
        buffers of its device arrays) with the loaded weights, or with `weight`/`bias` read in
        place for this call where `lends_weights`. A new host array, or a new device array with
        `device_output` (device backends only)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A place convolutions run.

    Contract: `algorithms` names the registered algorithms it runs; `prepare(spec, plan)` accepts
    any valid ConvSpec and any plan whose algorithm is in `algorithms` (InvalidParamsError naming
    the algorithm otherwise); it raises InvalidParamsError for params that break the device's
    constraints and ResourceLimitError for buffers beyond its memory (both before compiling or
    allocating), KernelCompileError / KernelLaunchError for kernels that fail, and
    BackendUnavailableError when the device is gone. The prepared conv's results match the float64
    reference to 1e-4 relative error for float32 and write every output element.
    """

    name: str
    device: DeviceInfo
    algorithms: tuple[str, ...]

    def prepare(self, spec: ConvSpec, plan: Plan) -> PreparedConv:
        ...


def select_index(names: list[str], device: int | str, label: str) -> int:
    """The device an explicit selector names: an index into `names`, or the first name containing
    the fragment (case-insensitive). BackendUnavailableError naming what was found otherwise."""
    from autoconv.errors import BackendUnavailableError

    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        if not 0 <= device < len(names):
            raise BackendUnavailableError(f"device: {label} index {device} is out of range (found {len(names)})")
        return int(device)
    fragment = str(device).strip().lower()
    matches = [i for i, name in enumerate(names) if fragment and fragment in name.lower()]
    if not matches:
        raise BackendUnavailableError(f"device: no {label} device matches {device!r} (found: {', '.join(names)})")
    return matches[0]
