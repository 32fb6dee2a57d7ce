"""One generic launcher: runs any algorithm's kernels on any device runtime (OpenCL, CUDA).

A runtime offers the few primitives the launcher needs (compile, allocate, copy, launch, time);
the launcher binds each KernelSource's arguments by buffer kind, enqueues the kernels in order,
rotates input copies when timing, and checks buffers against the device before allocating."""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

import numpy as np

from autoconv.algorithms import get_algorithm
from autoconv.backends.base import Timing, calibrated_runs, check_fits, conv_buffers
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError
from autoconv.plan import Plan
from autoconv.render import Dialect, KernelSource
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands


class Runtime(Protocol):
    """A device's primitives. Errors of the underlying library become KernelCompileError (kernel)
    or KernelLaunchError (launch, copy, wait)."""

    device: DeviceInfo
    dialect: Dialect
    lock: threading.RLock  # one queue or stream: runs from several threads take turns
    has_library_gemm: bool

    def kernel(self, source: KernelSource) -> Any:
        """The compiled kernel for a source (cached per source hash and device)."""
        ...

    def alloc(self, nbytes: int) -> Any:
        ...

    def upload(self, buffer: Any, host: np.ndarray) -> None:
        ...

    def download(self, host: np.ndarray, buffer: Any) -> None:
        ...

    def copy(self, dst: Any, src: Any) -> None:
        ...

    def launch(self, kernel: Any, source: KernelSource, args: tuple) -> Any:
        """Enqueue one kernel with its arguments (buffers and np.int32 values) in order."""
        ...

    def elapsed_ms(self, enqueue: Callable[[], list[Any]]) -> float:
        """Run `enqueue` (which launches kernels) and return the device time it took, in ms."""
        ...

    def library_gemm(self, spec: ConvSpec, buffers: dict[str, Any]) -> None:
        """out = weight x scratch (+ bias) with the runtime's BLAS, for library_gemm algorithms."""
        ...


def runtime_algorithms(runtime_has_library_gemm: bool) -> tuple[str, ...]:
    """What a device runtime runs: every algorithm with device kernels, and the library-GEMM ones
    where it has a BLAS."""
    from autoconv.algorithms import list_algorithms

    return tuple(name for name in list_algorithms()
                 if get_algorithm(name).device_kernels or (runtime_has_library_gemm and get_algorithm(name).library_gemm))


def prepare_on(runtime: Runtime, algorithms: tuple[str, ...], spec: ConvSpec, plan: Plan) -> "LaunchedConv":
    """Validate a plan for a runtime, check it fits, compile its kernels and allocate its buffers."""
    if plan.algorithm not in algorithms:
        raise InvalidParamsError(f"algorithm: the {runtime.device.backend} backend runs {algorithms}, "
                                 f"not {plan.algorithm!r}")
    algorithm = get_algorithm(plan.algorithm)
    algorithm.space.check(plan.params, runtime.device.limits(), spec)
    reason = algorithm.supports(spec, runtime.device)
    if reason is not None:
        raise InvalidParamsError(f"algorithm: {plan.algorithm} does not support {spec}: {reason}")
    sources = algorithm.kernels(spec, plan.params, runtime.dialect)
    scratch = algorithm.scratch_bytes(spec, plan.params)
    check_fits(runtime.device, spec, scratch, sources)
    return LaunchedConv(runtime, spec, plan, sources, scratch, library_gemm=algorithm.library_gemm)


class LaunchedConv:
    """Device buffers and compiled kernels for one ConvSpec under one Plan; reused across runs."""

    def __init__(self, runtime: Runtime, spec: ConvSpec, plan: Plan, sources: list[KernelSource],
                 scratch_bytes: int, *, library_gemm: bool = False) -> None:
        self.runtime, self.spec, self.plan, self.sources = runtime, spec, plan, sources
        self.library_gemm = library_gemm
        self._kernels = [runtime.kernel(source) for source in sources]
        self._weight_stage = [(k, s) for k, s in zip(self._kernels, sources) if s.once_per_weights]
        self._call_stage = [(k, s) for k, s in zip(self._kernels, sources) if not s.once_per_weights]
        # A private copy of the weights and bias now on the device: a call with equal ones (the
        # same array again, unless the caller changed it) skips their upload and the filter
        # transform. Compared by contents, so an array changed in place is never served stale.
        self._resident: tuple[np.ndarray, np.ndarray | None] | None = None
        self.buffers: dict[str, Any] = {name: runtime.alloc(size) for name, size in conv_buffers(spec, scratch_bytes).items()}
        self.buffers.setdefault("scratch", None)
        self._scratch_bytes = scratch_bytes

    def _args(self, source: KernelSource, buffers: dict[str, Any]) -> tuple:
        return tuple(np.int32(arg.value) if arg.kind == "int" else buffers[arg.kind] for arg in source.args)

    def _enqueue(self, buffers: dict[str, Any], stage: str = "call") -> list[Any]:
        kernels = self._weight_stage if stage == "weights" else self._call_stage
        events = [self.runtime.launch(kernel, source, self._args(source, buffers)) for kernel, source in kernels]
        if self.library_gemm and stage == "call":
            self.runtime.library_gemm(self.spec, buffers)
        return events

    def _weights_resident(self, weight: np.ndarray, bias: np.ndarray | None) -> bool:
        if self._resident is None:
            return False
        kept_weight, kept_bias = self._resident
        return np.array_equal(kept_weight, weight) and (
            (kept_bias is None and bias is None)
            or (kept_bias is not None and bias is not None and np.array_equal(kept_bias, bias)))

    def _upload(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> None:
        check_operands(self.spec, x, weight, bias)
        self.runtime.upload(self.buffers["input"], np.ascontiguousarray(x, dtype=np.float32))
        if self._weights_resident(weight, bias):
            return
        self._resident = None
        kept_weight = np.array(weight, dtype=np.float32, order="C")
        kept_bias = None if bias is None else np.array(bias, dtype=np.float32, order="C")
        self.runtime.upload(self.buffers["weight"], kept_weight)
        if kept_bias is not None:
            self.runtime.upload(self.buffers["bias"], kept_bias)
        self._enqueue(self.buffers, "weights")
        self._resident = (kept_weight, kept_bias)

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            *, poison: bool = False) -> np.ndarray:
        out = np.empty(self.spec.output_shape, dtype=np.float32)
        with self.runtime.lock:
            self._upload(x, weight, bias)
            if poison:
                out.fill(np.nan)
                self.runtime.upload(self.buffers["output"], out)
            self._enqueue(self.buffers)
            self.runtime.download(out, self.buffers["output"])
        return out

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             *, warmup: int = 2, repeats: int = 10, rotate: int = 3, stage: str = "call",
             min_sample_ms: float = 0.0) -> Timing:
        if stage not in ("call", "weights"):
            raise InvalidParamsError(f"stage: expected 'call' or 'weights', got {stage!r}")
        copies_needed = max(1, rotate) - 1
        if copies_needed:  # the rotated copies of the inputs must fit beside the conv's own buffers
            check_fits(self.runtime.device, self.spec.replace(n=self.spec.n * (copies_needed + 1)),
                       self._scratch_bytes)
        with self.runtime.lock:
            self._upload(x, weight, bias)
            rotations = [self.buffers]
            for _ in range(copies_needed):
                copy = dict(self.buffers)
                for name in ("input", "weight"):
                    copy[name] = self.runtime.alloc(conv_buffers(self.spec, 0)[name])
                    self.runtime.copy(copy[name], self.buffers[name])
                rotations.append(copy)
            last_ms = 0.0
            for i in range(max(1, warmup)):
                last_ms = self.runtime.elapsed_ms(lambda: self._enqueue(rotations[i % len(rotations)], stage))

            def time_runs(runs: int, first: int = 0) -> float:
                return self.runtime.elapsed_ms(lambda: [
                    event for j in range(runs) for event in self._enqueue(rotations[(first + j) % len(rotations)], stage)])

            runs = calibrated_runs(time_runs, last_ms, min_sample_ms)
            samples = [time_runs(runs, i * runs) / runs for i in range(repeats)]
        return Timing(tuple(samples))
