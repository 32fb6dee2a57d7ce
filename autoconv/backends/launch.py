"""One generic launcher: runs any algorithm's kernels on any device runtime (OpenCL, CUDA).

A runtime offers the few primitives the launcher needs (compile, allocate, copy, launch, time,
and how host memory reaches its kernels); the launcher binds each KernelSource's arguments by
buffer kind, enqueues the kernels in order, keeps the weights resident, rotates input copies when
timing, and checks buffers against the device before allocating.

How host arrays reach the kernels is the runtime's `host_memory`:
- "shared": the device computes in host memory (PoCL's CPU device): a host array is lent to the
  kernels as a buffer over the same memory, and a result is written straight into a host array.
  No copy either way, and nothing to map.
- "mapped": the device shares host memory but may cache it (an integrated GPU): the same
  host-pointer buffers, and a result is mapped before the host reads it.
- "staged": the device has memory of its own (a discrete GPU): host arrays are copied through
  page-locked (pinned) staging memory with non-blocking copies, and the call waits once."""

from __future__ import annotations

import queue
import threading
from typing import Any, Mapping

import numpy as np

from autoconv.algorithms import get_algorithm
from autoconv.backends.base import PreparedConv, Timing, calibrated_runs, check_fits, conv_buffers
from autoconv.backends.runtime import Runtime
from autoconv.errors import InvalidParamsError
from autoconv.plan import Plan
from autoconv.render import KernelSource
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands

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
    # A layer the algorithm cannot run is said as such, before any config's constraints on it.
    reason = algorithm.supports(spec, runtime.device)
    if reason is not None:
        raise InvalidParamsError(f"algorithm: {plan.algorithm} does not support {spec}: {reason}")
    algorithm.space.check(plan.params, runtime.device.limits(), spec)
    sources = algorithm.kernels(spec, plan.params, runtime.dialect)
    scratch = algorithm.scratch_bytes(spec, plan.params)
    check_fits(runtime.device, spec, scratch, sources)
    return LaunchedConv(runtime, spec, plan, sources, scratch, library_gemm=algorithm.library_gemm)


def same_values(kept: np.ndarray, given: np.ndarray) -> bool:
    """Whether a float32 array holds exactly the values of a kept copy: bit for bit, read as
    64-bit words where it can be (half the elements numpy.array_equal compares on float32; faster
    in a one-off timing on res5's 9.4 MB weights, not a committed benchmark), so a NaN equals
    itself."""
    if kept.shape != given.shape:
        return False
    if given.dtype != np.float32 or not given.flags.c_contiguous:
        return bool(np.array_equal(kept, given))
    if kept.size % 2 == 0:
        return bool(np.array_equal(kept.reshape(-1).view(np.uint64), given.reshape(-1).view(np.uint64)))
    return bool(np.array_equal(kept.reshape(-1).view(np.uint32), given.reshape(-1).view(np.uint32)))


class LaunchedConv(PreparedConv):
    """Compiled kernels, resident weights and scratch for one ConvSpec under one Plan; reused
    across calls. Calls enqueue on the runtime's one in-order queue, so the scratch buffer is
    never used by two calls at once and concurrent callers get their own results."""

    def __init__(self, runtime: Runtime, spec: ConvSpec, plan: Plan, sources: list[KernelSource],
                 scratch_bytes: int, *, library_gemm: bool = False) -> None:
        self.runtime, self.spec, self.plan, self.sources = runtime, spec, plan, sources
        self.library_gemm = library_gemm
        kernels = [runtime.kernel(source) for source in sources]
        self._weight_stage = [runtime.bind(k, s) for k, s in zip(kernels, sources) if s.once_per_weights]
        self._call_stage = [runtime.bind(k, s) for k, s in zip(kernels, sources) if not s.once_per_weights]
        self._scratch_bytes = scratch_bytes
        sizes = conv_buffers(spec, scratch_bytes)
        self.buffers: dict[str, Any] = {name: runtime.alloc(sizes[name]) for name in ("weight", "bias", "scratch")
                                        if name in sizes}
        self.buffers.setdefault("scratch", None)
        # The device-side input, output and residual that staged copies and timing use, made when
        # first needed (zero-copy calls lend the caller's arrays instead).
        self._home: dict[str, Any] = {}
        self._output_shape = spec.output_array_shape
        self._staging: queue.SimpleQueue[dict[str, np.ndarray]] = queue.SimpleQueue()
        # A private copy of the weights and bias now on the device: a call with equal ones skips
        # their upload and the once-per-weights kernels. Compared by contents, so an array
        # changed in place is never served stale.
        self._resident: tuple[np.ndarray, np.ndarray | None] | None = None
        self.last_events: tuple[Any, ...] = ()  # the latest call's kernel events (benchmarks read their span)
        self._lent: tuple[Any, ...] | None = None  # the weights lent to the latest call, and their buffers

    @property
    def lock(self) -> threading.RLock:
        return self.runtime.lock

    @property
    def transforms_weights(self) -> bool:
        """Whether the plan runs kernels on the weights alone (a filter transform) when they change."""
        return bool(self._weight_stage)

    @property
    def lends_weights(self) -> bool:
        """Whether a call may read the caller's weights in place (`call(weight=...)`): where the
        device reads host memory and nothing is derived from the weights ahead of the call."""
        return self.runtime.host_memory != "staged" and not self._weight_stage

    # Weights ------------------------------------------------------------------------------------

    def weights_loaded(self, weight: np.ndarray, bias: np.ndarray | None) -> bool:
        """Whether these are the weights and bias now on the device (compared by contents)."""
        if self._resident is None:
            return False
        kept_weight, kept_bias = self._resident
        return same_values(kept_weight, weight) and (
            (kept_bias is None and bias is None)
            or (kept_bias is not None and bias is not None and same_values(kept_bias, bias)))

    def load_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Copy the weights and bias to the device and run the once-per-weights kernels; calls
        without weights of their own use these from now on."""
        kept_weight = np.array(weight, dtype=np.float32, order="C")
        kept_bias = None if bias is None else np.array(bias, dtype=np.float32, order="C")
        with self.runtime.lock:
            self._resident = None
            self.runtime.upload(self.buffers["weight"], kept_weight)
            if kept_bias is not None:
                self.runtime.upload(self.buffers["bias"], kept_bias)
            events = self._enqueue(self.buffers, "weights")
            if events:  # not waited for: the kernels after it read its result in order
                self.runtime.retain(events[-1], (events, dict(self.buffers)))
            self._resident = (kept_weight, kept_bias)

    def ensure_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Load the weights and bias unless they are the ones loaded (compared by contents)."""
        with self.runtime.lock:
            if not self.weights_loaded(weight, bias):
                self.load_weights(weight, bias)

    # Calls --------------------------------------------------------------------------------------

    def _home_buffer(self, kind: str) -> Any:
        buffer = self._home.get(kind)
        if buffer is None:
            nbytes = self.spec.input_bytes if kind == "input" else self.spec.output_bytes
            buffer = self._home[kind] = self.runtime.alloc(nbytes)
        return buffer

    def _enqueue(self, buffers: Mapping[str, Any], stage: str = "call") -> list[Any]:
        stages = self._weight_stage if stage == "weights" else self._call_stage
        events = [enqueue(buffers) for enqueue in stages]
        if self.library_gemm and stage == "call":
            self.runtime.library_gemm(self.spec, dict(buffers))
        return events

    def call(self, x: Any, residual: Any = None, *, weight: np.ndarray | None = None,
             bias: np.ndarray | None = None, device_output: bool = False, poison: bool = False) -> Any:
        """Convolve with the loaded weights, or with `weight`/`bias` lent for this call alone.

        `x` and `residual` are host arrays (float32, C order, the spec's input and output
        shapes; the caller checked them) or buffers of this runtime's device arrays. The result
        is a new host array, or with `device_output` a new device array that later kernels on
        this device read in order, before it is complete. Host memory the call reads is never
        touched after the call returns. Lent weights are used in place: only where memory is not
        "staged" and the plan has no once-per-weights kernels (the caller's choice).
        """
        runtime, spec = self.runtime, self.spec
        zero_copy = runtime.host_memory != "staged"
        buffers = dict(self.buffers)
        staged: list[tuple[str, np.ndarray]] = []
        reads_host = False
        for kind, value in (("input", x), ("residual", residual)):
            if value is None:
                continue
            if isinstance(value, np.ndarray):
                reads_host = True
                if zero_copy:
                    buffers[kind] = runtime.wrap(value, writable=False)
                else:
                    staged.append((kind, value))
                    buffers[kind] = self._home_buffer(kind)
            else:
                buffers[kind] = value
        if weight is not None:
            self._lend(buffers, weight, bias)
            reads_host = True
        device_out = host_out = None
        if device_output:
            device_out, buffers["output"] = runtime.new_array(self._output_shape)
        elif zero_copy:
            host_out, buffers["output"] = runtime.host_output(self._output_shape)
        else:
            buffers["output"] = self._home_buffer("output")
        if poison:
            nan = np.full(spec.output_array_shape, np.nan, dtype=np.float32)
            if host_out is not None:
                np.copyto(host_out, nan)
            else:
                runtime.upload(buffers["output"], nan)
        staging = self._take_staging() if staged or (host_out is None and not device_output) else None
        # Every event the call enqueues, copies included, is kept until the call is waited for or
        # retained: a driver may not take an event released while its command is queued.
        copies_in: list[Any] = []
        copy_out: list[Any] = []
        with runtime.lock:
            for kind, value in staged:
                assert staging is not None
                np.copyto(staging[kind].reshape(value.shape), value)
                copies_in.append(runtime.upload(buffers[kind], staging[kind], blocking=False))
            events = self._enqueue(buffers)
            if not device_output and not zero_copy:
                assert staging is not None
                copy_out.append(runtime.download(staging["output"], buffers["output"], blocking=False))
        self.last_events = tuple(events)
        queued = [event for event in (*copies_in, *events, *copy_out) if event is not None]
        if device_output:
            runtime.set_ready(device_out, queued[-1] if queued else None)
            if reads_host:  # the caller may change its arrays once we return
                runtime.wait(queued)
            elif queued:
                runtime.retain(queued[-1], (queued, buffers))
            result = device_out
        else:
            runtime.wait(queued)
            if host_out is not None:
                if runtime.host_memory == "mapped":
                    runtime.expose(buffers["output"], host_out)
                result = host_out
            else:
                assert staging is not None
                result = staging["output"].reshape(spec.output_array_shape).copy()
        if staging is not None:  # every copy through it has finished (waited for above)
            self._staging.put(staging)
        return result

    def _lend(self, buffers: dict[str, Any], weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Bind the caller's weights and bias, read in place, for one call."""
        if not self.lends_weights:
            raise InvalidParamsError(f"weight: {self.plan.algorithm} on {self.runtime.device.name} cannot read "
                                     "the weights in place; load them (load_weights) instead")
        lent = self._lent
        if lent is None or lent[0] is not weight or lent[1] is not bias:
            lent = (weight, bias, self.runtime.wrap(weight, writable=False),
                    None if bias is None else self.runtime.wrap(bias, writable=False))
            # Kept for the next call with the same arrays (conv2d in a loop) only where the kernels
            # read them in place, so contents changed since are seen. A read-only array is lent as
            # a copy (a device buffer over host memory needs it writable), and a read-only view's
            # memory can still change under it: never kept.
            if weight.flags.writeable and (bias is None or bias.flags.writeable):
                self._lent = lent
        buffers["weight"] = lent[2]
        if bias is not None:
            buffers["bias"] = lent[3]

    def _take_staging(self) -> dict[str, np.ndarray]:
        """A set of pinned staging arrays no other call holds (made when all are in use)."""
        try:
            return self._staging.get_nowait()
        except queue.Empty:
            count = {"input": self.spec.input_bytes // 4, "output": self.spec.output_bytes // 4}
            count["residual"] = count["output"]
            return {kind: self.runtime.pinned(n) for kind, n in count.items()}

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            residual: np.ndarray | None = None, *, poison: bool = False) -> np.ndarray:
        check_operands(self.spec, x, weight, bias, residual)
        self.ensure_weights(weight, bias)
        contiguous = None if residual is None else np.ascontiguousarray(residual, dtype=np.float32)
        return self.call(np.ascontiguousarray(x, dtype=np.float32), contiguous, poison=poison)

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             residual: np.ndarray | None = None, *, warmup: int = 2, repeats: int = 10, rotate: int = 3,
             stage: str = "call", min_sample_ms: float = 0.0) -> Timing:
        if stage not in ("call", "weights"):
            raise InvalidParamsError(f"stage: expected 'call' or 'weights', got {stage!r}")
        check_operands(self.spec, x, weight, bias, residual)
        copies_needed = max(1, rotate) - 1
        if copies_needed:  # the rotated copies of the inputs must fit beside the conv's own buffers
            check_fits(self.runtime.device, self.spec.replace(n=self.spec.n * (copies_needed + 1)),
                       self._scratch_bytes)
        with self.runtime.lock:
            self.ensure_weights(weight, bias)
            buffers = dict(self.buffers, input=self._home_buffer("input"), output=self._home_buffer("output"))
            self.runtime.upload(buffers["input"], np.ascontiguousarray(x, dtype=np.float32))
            if residual is not None:
                buffers["residual"] = self._home_buffer("residual")
                self.runtime.upload(buffers["residual"], np.ascontiguousarray(residual, dtype=np.float32))
            rotations = [buffers]
            sizes = conv_buffers(self.spec, 0)
            for _ in range(copies_needed):
                copy = dict(buffers)
                for name in ("input", "weight"):
                    copy[name] = self.runtime.alloc(sizes[name])
                    self.runtime.copy(copy[name], buffers[name])
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
