"""The OpenCL backend on pyopencl: device discovery, program cache, and the launcher's
primitives (buffers, copies, launches, event timing, and how host memory reaches the kernels)."""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoconv.backends.base import select_index
from autoconv.backends.compiler_output import captured_stderr
from autoconv.backends.device_array import DeviceArray
from autoconv.backends.launch import LaunchedConv, prepare_on, runtime_algorithms
from autoconv.backends.runtime import HOST_MEMORY_MODES, DeviceBackend, Enqueue
from autoconv.device import DeviceInfo, normalise_vendor
from autoconv.errors import (BackendUnavailableError, InvalidParamsError, InvalidSpecError, KernelCompileError,
                             KernelLaunchError)
from autoconv.plan import Plan
from autoconv.render import OPENCL, KernelSource
from autoconv.spec import ConvSpec

INSTALL_HINT = (
    "install pyopencl and an OpenCL driver: `pip install pyopencl` and, for the CPU, "
    "`bash scripts/install_pocl.sh` (Debian's pocl-opencl-icd)"
)

_PROBE_SOURCE = "__kernel void probe(__global float* a) { a[get_global_id(0)] += 1.0f; }"


# Result arrays kept for reuse once no caller holds them: at most this many per size, and this
# many bytes in all (a fresh array and its buffer cost more than the kernels of a small layer).
POOLED_PER_SIZE = 4
POOLED_BYTES = 256 * 2**20
# Calls retained (in flight) before the completed ones are looked for and let go: a model enqueues
# its steps far ahead of the device, and checking after each one cost the host (which shares the
# CPU device's cores) more than holding them a little longer.
RELEASE_BACKLOG = 64


class _PooledOutput:
    """A host array kernels write results into, with its buffer, kept by the runtime. Free again
    when nobody but the pool holds either: neither the array (or a view of it: a view holds its
    base) nor its buffer (a DeviceArray, a call in flight). The reference counts of the free state
    are read when the entry is made, so they hold on any CPython."""

    __slots__ = ("host", "buffer", "free_refs")

    def __init__(self, count: int) -> None:
        self.host = np.empty(count, dtype=np.float32)
        self.buffer: Any = None
        self.free_refs: tuple[int, int] = (0, 0)

    def refs(self) -> tuple[int, int]:
        return sys.getrefcount(self.host), sys.getrefcount(self.buffer)


# PoCL's CPU device runs work-groups on one thread per core; unpinned, the Linux scheduler at
# times stacks two of them on one core for hundreds of milliseconds, and a kernel then takes 2x
# as long (bimodal timings: the same config measured 1.5 or 3.0 ms on our 2-core machine; pinned,
# within 1.14x; benchmarks/tuning-pocl.md). PoCL reads this when it first loads; a value the
# user set is kept.
POCL_PINNING = ("POCL_AFFINITY", "1")


def _cl() -> Any:
    os.environ.setdefault(*POCL_PINNING)
    try:
        import pyopencl
    except ImportError:
        raise BackendUnavailableError(f"the opencl backend needs pyopencl: {INSTALL_HINT}") from None
    return pyopencl


@dataclass(frozen=True)
class OpenCLDevice:
    """One device as discovery found it: its index, identity, whether it can build kernels, and
    how host memory reaches its kernels (launch.HOST_MEMORY_MODES)."""

    index: int
    info: DeviceInfo
    usable: bool
    problem: str
    host_memory: str = "staged"


def _describe(cl: Any, platform: Any, device: Any) -> DeviceInfo:
    kinds = [name for name, bit in (("gpu", cl.device_type.GPU), ("cpu", cl.device_type.CPU),
                                     ("accelerator", cl.device_type.ACCELERATOR)) if device.type & bit]
    return DeviceInfo(
        backend="opencl",
        platform=platform.name.strip(),
        vendor=normalise_vendor(device.vendor),
        name=device.name.strip(),
        driver=device.driver_version.strip(),
        device_type=kinds[0] if kinds else "other",
        compute_units=int(device.max_compute_units),
        local_mem_bytes=int(device.local_mem_size),
        max_work_group_size=int(device.max_work_group_size),
        max_work_item_sizes=tuple(int(v) for v in device.max_work_item_sizes),
        max_alloc_bytes=int(device.max_mem_alloc_size),
        global_mem_bytes=int(device.global_mem_size),
    )


def _probe(cl: Any, device: Any) -> tuple[str, str]:
    """Build and run a one-line kernel on a buffer over host memory: ('', how host memory reaches
    the kernels) when the device works, else (why not, "staged")."""
    try:
        context = cl.Context([device])
        queue = cl.CommandQueue(context)
        with captured_stderr():
            program = cl.Program(context, _PROBE_SOURCE).build()
        host = np.zeros(4, dtype=np.float32)
        buffer = cl.Buffer(context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
        cl.Kernel(program, "probe")(queue, (4,), None, buffer).wait()
        in_place = bool(np.all(host == 1.0))  # written where the host reads, without a map
        mapped, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.READ, 0, (4,), np.float32, is_blocking=True)
        result = np.array(mapped)
        mapped.base.release()
        queue.finish()
        if not np.all(result == 1.0):
            return "probe kernel gave a wrong result", "staged"
        return "", _host_memory(cl, device, in_place)
    except Exception as exc:  # noqa: BLE001 - a broken driver may raise anything; report, don't crash
        return (str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__), "staged"


def _host_memory(cl: Any, device: Any, written_in_place: bool) -> str:
    """"shared" for a CPU device computing in host memory itself (its kernels' writes are seen
    without a map: nothing can cache them); "mapped" for other devices that report unified
    memory (CL_DEVICE_HOST_UNIFIED_MEMORY: integrated GPUs, whose caches a map flushes);
    "staged" for devices with memory of their own."""
    try:
        unified = bool(device.host_unified_memory)
    except Exception:  # noqa: BLE001 - an OpenCL 3.0 driver may not answer the deprecated query
        unified = False
    if unified and written_in_place and device.type & cl.device_type.CPU:
        return "shared"
    return "mapped" if unified else "staged"


_discovery_lock = threading.Lock()
_discovered: list[tuple[OpenCLDevice, Any]] | None = None


def _discover() -> list[tuple[OpenCLDevice, Any]]:
    global _discovered
    with _discovery_lock:
        if _discovered is None:
            cl = _cl()
            found: list[tuple[OpenCLDevice, Any]] = []
            try:
                platforms = cl.get_platforms()
            except Exception:  # noqa: BLE001 - pyopencl raises when no ICD is installed at all
                platforms = []
            for platform in platforms:
                for device in platform.get_devices():
                    problem, host_memory = _probe(cl, device)
                    found.append((OpenCLDevice(len(found), _describe(cl, platform, device), not problem, problem,
                                               host_memory), device))
            _discovered = found
        return _discovered


def list_devices() -> list[OpenCLDevice]:
    """Every OpenCL device on this machine, in a stable order, each probed once per process."""
    return [entry for entry, _ in _discover()]


def select_device(device: int | str | None) -> tuple[OpenCLDevice, Any]:
    """The device for an index, a name fragment, or None (a GPU if any, else the first usable one)."""
    found = _discover()
    if not found:
        raise BackendUnavailableError(f"no OpenCL device found: {INSTALL_HINT}")
    if device is None:
        usable = [entry for entry in found if entry[0].usable]
        if not usable:
            problems = "; ".join(f"{e.info.name}: {e.problem}" for e, _ in found)
            raise BackendUnavailableError(f"no usable OpenCL device ({problems}); {INSTALL_HINT}")
        # A GPU when there is one, else the first working device (PoCL's CPU device here).
        return next((e for e in usable if e[0].info.device_type == "gpu"), usable[0])
    chosen = found[select_index([entry.info.name for entry, _ in found], device, "OpenCL")]
    if not chosen[0].usable:
        raise BackendUnavailableError(f"device: {chosen[0].info.name} cannot build kernels: {chosen[0].problem}")
    return chosen


class OpenCLBackend(DeviceBackend):
    """Runs generated kernels on one OpenCL device through one in-order profiling queue (the
    launcher's Runtime for OpenCL).

    host_memory: how host arrays reach the kernels (launch.HOST_MEMORY_MODES); None takes what
    the device supports (PoCL's CPU device: "shared", no copies). A device may always be run
    "staged", and a device that shares host memory "mapped" (tests run every mode on PoCL)."""

    name = "opencl"
    dialect = OPENCL
    has_library_gemm = False  # no BLAS here: the library baseline runs on the host (numpy)
    layout_arrays = True  # autoconv.DeviceArray

    def __init__(self, device: int | str | None = None, *, host_memory: str | None = None) -> None:
        cl = _cl()
        entry, cl_device = select_device(device)
        self.device: DeviceInfo = entry.info
        self.index = entry.index
        self.host_memory = _chosen_host_memory(entry, host_memory)
        self._cl = cl
        self.context = cl.Context([cl_device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self._programs: dict[tuple[str, str], Any] = {}
        # One lock per source being built: callers on several threads build different sources in
        # parallel, and the same source once while its other callers wait.
        self._programs_lock = threading.Lock()
        self._build_locks: dict[tuple[str, str], threading.Lock] = {}
        # pyopencl's generic "Non-empty compiler output encountered" says nothing the captured
        # text does not; the filter is set once, as catch_warnings() is not safe across threads.
        warnings.filterwarnings("ignore", message="Non-empty compiler output encountered",
                                category=cl.CompilerWarning)
        self.lock = threading.RLock()
        self.compiler_output: list[tuple[str, str]] = []  # (kernel entry, what its build printed)
        self.algorithms = runtime_algorithms(self.has_library_gemm)
        mf = cl.mem_flags
        self._read_flags = mf.READ_ONLY | mf.USE_HOST_PTR
        self._write_flags = mf.READ_WRITE | mf.USE_HOST_PTR
        # (event, buffers) of calls whose kernels may still run, oldest first (one in-order queue:
        # they complete in this order).
        self._in_flight: collections.deque[tuple[Any, Any, tuple[int, ...]]] = collections.deque()
        self._in_flight_lock = threading.Lock()
        # How many in-flight calls hold each pooled output buffer (by id): those references do not
        # keep a pooled result from being reused (host_output).
        self._held: collections.Counter[int] = collections.Counter()
        self._complete = cl.command_execution_status.COMPLETE
        self._pool: dict[int, list[_PooledOutput]] = {}
        self._pooled_buffers: set[int] = set()  # ids of the pooled entries' buffers (kept for good)
        self._pooled_bytes = 0
        self._pool_lock = threading.Lock()

    def kernel(self, source: KernelSource) -> Any:
        """The compiled kernel for a source, built once per (source hash, device and driver)."""
        key = (source.source_hash, self.device.fingerprint())
        with self._programs_lock:
            program = self._programs.get(key)
            build_lock = self._build_locks.setdefault(key, threading.Lock())
        if program is None:
            with build_lock:
                program = self._programs.get(key)
                if program is None:
                    program = self._build(source)
                    with self._programs_lock:
                        self._programs[key] = program
        # A fresh kernel object per caller: each binds its own arguments.
        return self._cl.Kernel(program, source.entry)

    def _build(self, source: KernelSource) -> Any:
        # Build-log chatter (unused variables and the like) is not the user's concern unless they
        # ask (--verbose) or the build fails.
        chatter: list[str] = []
        try:
            with captured_stderr() as chatter:
                program = self._cl.Program(self.context, source.text).build(options=["-cl-mad-enable"])
        except self._cl.Error as exc:
            output = "".join(chatter).strip()
            raise KernelCompileError(f"{source.entry} failed to compile on {self.device.name}:\n{exc}"
                                     + (f"\ncompiler output:\n{output}" if output else "")) from None
        output = "".join(chatter).strip()
        if output:
            with self._programs_lock:
                self.compiler_output.append((source.entry, output))
        return program

    def prepare(self, spec: ConvSpec, plan: Plan) -> LaunchedConv:
        return prepare_on(self, self.algorithms, spec, plan)

    # The launcher's primitives ------------------------------------------------------------------

    def bind(self, kernel: Any, source: KernelSource) -> Enqueue:
        # The ints never change: set once. Each call sets only its buffers (a few hundred ns each).
        slots = []
        for index, arg in enumerate(source.args):
            if arg.kind == "int":
                kernel.set_arg(index, np.int32(arg.value))
            else:
                slots.append((index, arg.kind))
        enqueue_kernel, global_size, local_size, queue = (self._cl.enqueue_nd_range_kernel, source.global_size,
                                                          source.local_size, self.queue)

        def enqueue(buffers: Any) -> Any:
            try:
                for index, kind in slots:
                    kernel.set_arg(index, buffers[kind])
                return enqueue_kernel(queue, kernel, global_size, local_size)
            except self._cl.Error as exc:
                raise KernelLaunchError(f"launching {source.entry} failed on {self.device.name}: {exc}") from None
        return enqueue

    def alloc(self, nbytes: int) -> Any:
        try:
            return self._cl.Buffer(self.context, self._cl.mem_flags.READ_WRITE, max(1, nbytes))
        except self._cl.Error as exc:
            raise KernelLaunchError(f"cannot allocate {nbytes} bytes on {self.device.name}: {exc}") from None

    def wrap(self, host: np.ndarray, writable: bool) -> Any:
        if self.host_memory == "staged":
            raise InvalidParamsError(f"{self.device.name} is run with staged copies: host arrays are not lent to it")
        if host.nbytes == 0:  # OpenCL has no empty buffers; nothing reads this one
            return self.alloc(4)
        if not host.flags.writeable:  # a buffer over host memory needs a writable view of it
            host = host.copy()
        try:
            return self._cl.Buffer(self.context, self._write_flags if writable else self._read_flags, hostbuf=host)
        except self._cl.Error as exc:
            raise KernelLaunchError(f"cannot lend {host.nbytes} bytes of host memory to {self.device.name}: "
                                    f"{exc}") from None

    def expose(self, buffer: Any, host: np.ndarray) -> None:
        if self.host_memory != "mapped":
            return

        def map_and_release() -> None:
            mapped, _ = self._cl.enqueue_map_buffer(self.queue, buffer, self._cl.map_flags.READ, 0, host.shape,
                                                    host.dtype, is_blocking=True)
            mapped.base.release()
        self._guard(map_and_release, "mapping a result")

    def pinned(self, count: int) -> np.ndarray:
        """A mapped ALLOC_HOST_PTR buffer: the driver's page-locked memory, mapped for good."""
        def make() -> np.ndarray:
            buffer = self._cl.Buffer(self.context, self._cl.mem_flags.READ_WRITE | self._cl.mem_flags.ALLOC_HOST_PTR,
                                     max(1, count) * 4)
            mapped, _ = self._cl.enqueue_map_buffer(
                self.queue, buffer, self._cl.map_flags.READ | self._cl.map_flags.WRITE, 0, (max(1, count),),
                np.float32, is_blocking=True)
            return mapped[:count]
        return self._guard(make, "allocating page-locked staging memory")

    def upload(self, buffer: Any, host: np.ndarray, *, blocking: bool = True) -> Any:
        return self._guard(lambda: self._cl.enqueue_copy(self.queue, buffer, host, is_blocking=blocking),
                           "copying to the device")

    def download(self, host: np.ndarray, buffer: Any, *, blocking: bool = True) -> Any:
        return self._guard(lambda: self._cl.enqueue_copy(self.queue, host, buffer, is_blocking=blocking),
                           "copying from the device")

    def copy(self, dst: Any, src: Any) -> None:
        self._guard(lambda: self._cl.enqueue_copy(self.queue, dst, src), "copying on the device")

    def launch(self, kernel: Any, source: KernelSource, args: tuple) -> Any:
        def enqueue() -> Any:
            kernel.set_args(*args)
            return self._cl.enqueue_nd_range_kernel(self.queue, kernel, source.global_size, source.local_size)
        return self._guard(enqueue, f"launching {source.entry}")

    def wait(self, events: Any) -> None:
        # One in-order queue: the last event completes after everything enqueued before it.
        if events:
            self._guard(events[-1].wait, "waiting for the device")
            if self._in_flight:
                self._release_completed()

    def retain(self, event: Any, objects: Any) -> None:
        with self._pool_lock:
            pooled = tuple(id(b) for b in _buffers_in(objects) if id(b) in self._pooled_buffers)
        with self._in_flight_lock:
            self._in_flight.append((event, objects, pooled))
            self._held.update(pooled)
            backlog = len(self._in_flight)
        if backlog > RELEASE_BACKLOG:  # reading events costs the host a few us each: not per call
            self._release_completed()

    def _release_completed(self) -> None:
        with self._in_flight_lock:
            while self._in_flight and self._guard(
                    lambda: self._in_flight[0][0].command_execution_status, "reading an event") == self._complete:
                self._held.subtract(self._in_flight.popleft()[2])

    def elapsed_ms(self, enqueue: Any) -> float:
        def run() -> float:
            events = enqueue()
            if not events:  # nothing to run (a plan without a filter transform, timed for one)
                return 0.0
            events[-1].wait()
            # In-order queue: the run spans from the first kernel's start to the last one's end.
            return (events[-1].profile.end - events[0].profile.start) * 1e-6
        return self._guard(run, "timing")

    def span_ms(self, events: Any) -> float | None:
        if not events:
            return None
        return self._guard(lambda: (events[-1].profile.end - events[0].profile.start) * 1e-6, "reading event times")

    def host_output(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        """A host array of that shape for kernels to write, and its buffer over it: one of the
        runtime's own that no caller holds any more (no new array, no new buffer, its memory
        still in the caches), else a new one, kept for reuse while the pool has room."""
        count = math.prod(shape)
        with self._pool_lock:
            entries = self._pool.setdefault(count, [])
            for entry in entries:
                # Calls still in flight may hold the buffer (retain): they were enqueued before the
                # kernels about to write it, and the queue is in order, so they are done with it
                # first. Without this, a model enqueued ahead of the device found every result of
                # its size held and wrote 31 of ResNet-50's 56 results to fresh memory, page-faulted
                # by the kernels (in-model kernels up to 1.6x their time alone).
                with self._in_flight_lock:
                    held = self._held[id(entry.buffer)]
                host_refs, buffer_refs = entry.refs()
                if (host_refs, buffer_refs - held) == entry.free_refs:
                    return entry.host.reshape(shape), entry.buffer
            if len(entries) >= POOLED_PER_SIZE or self._pooled_bytes + count * 4 > POOLED_BYTES or not count:
                host = np.empty(shape, dtype=np.float32)
                return host, self.wrap(host, writable=True)
            entry = _PooledOutput(count)
            entry.buffer = self.wrap(entry.host, writable=True)
            entry.free_refs = entry.refs()
            entries.append(entry)
            self._pooled_buffers.add(id(entry.buffer))
            self._pooled_bytes += count * 4
            return entry.host.reshape(shape), entry.buffer

    def new_array(self, shape: tuple[int, ...]) -> tuple[DeviceArray, Any]:
        if self.host_memory == "shared":  # the device computes in host memory: keep a host view
            host, buffer = self.host_output(shape)
        else:
            host, buffer = None, self.alloc(math.prod(shape) * 4)
        return DeviceArray(self, buffer, shape, host=host), buffer

    def adopt(self, host: np.ndarray) -> DeviceArray:
        if self.host_memory == "shared":
            host = np.ascontiguousarray(host, dtype=np.float32)
            return DeviceArray(self, self.wrap(host, writable=True), host.shape, host=host)
        array, buffer = self.new_array(host.shape)
        self.upload(buffer, np.ascontiguousarray(host, dtype=np.float32))
        return array

    def set_ready(self, array: DeviceArray, event: Any) -> None:
        array._ready = event  # noqa: SLF001 - the runtime that made the array records its event

    def device_buffer(self, value: Any, name: str) -> Any | None:
        if not isinstance(value, DeviceArray):
            return None
        if value.runtime is not self:
            raise InvalidSpecError(f"{name}: the DeviceArray lives on {value.runtime.device.name} "
                                   f"(another context), not on this layer's {self.device.name}; "
                                   "bring it home with numpy.asarray() first")
        return value.buffer

    def library_gemm(self, spec: ConvSpec, buffers: dict[str, Any]) -> None:
        raise InvalidParamsError("the opencl backend has no BLAS; library-GEMM algorithms run on the host")

    def _guard(self, action: Any, what: str) -> Any:
        try:
            return action()
        except self._cl.Error as exc:
            raise KernelLaunchError(f"{what} failed on {self.device.name}: {exc}") from None


def _buffers_in(objects: Any) -> list[Any]:
    """The objects a retain() holds, flattened through tuples, lists and dicts' values: the buffers
    among them are what host_output checks against its pool."""
    found: list[Any] = []
    stack = [objects]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:
            found.append(item)
    return found


def _chosen_host_memory(entry: OpenCLDevice, asked: str | None) -> str:
    """The device's own mode, or the one asked for when the device can run it."""
    if asked is None:
        return entry.host_memory
    if asked not in HOST_MEMORY_MODES:
        raise InvalidParamsError(f"host_memory: expected one of {HOST_MEMORY_MODES} or None, got {asked!r}")
    possible = HOST_MEMORY_MODES[HOST_MEMORY_MODES.index(entry.host_memory):]
    if asked not in possible:
        raise InvalidParamsError(f"host_memory: {entry.info.name} does not share host memory; it runs "
                                 f"{' or '.join(possible)}")
    return asked
