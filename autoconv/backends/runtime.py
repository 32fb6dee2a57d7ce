"""What a device backend owes the launcher, in small parts (as tinygrad's runtimes split into a
compiler, a program, an allocator and a device): compiling, device memory, host memory, launching,
timing, device arrays and the library GEMM. `Runtime` is all of them.

Each backend names the protocol it implements as a base class (`class CudaBackend(DeviceBackend)`),
so the type checker run in CI (mypy, `.ci/run`) reports a part's method that a backend lacks, or
whose signature has drifted, without the device: a backend missing `elapsed_ms` cannot be
instantiated as far as mypy is concerned."""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeGuard

import numpy as np

from autoconv.backends.base import Backend
from autoconv.device import DeviceInfo
from autoconv.render import Dialect, KernelSource
from autoconv.spec import ConvSpec

HOST_MEMORY_MODES = ("shared", "mapped", "staged")
Enqueue = Callable[[Mapping[str, Any]], Any]


class KernelCompiler(Protocol):
    """Turns rendered sources into kernels. Errors become KernelCompileError."""

    dialect: Dialect

    def kernel(self, source: KernelSource) -> Any:
        """The compiled kernel for a source (cached per source hash and device)."""
        ...


class DeviceMemory(Protocol):
    """The device's own memory and the copies in and out of it. Errors become KernelLaunchError."""

    def alloc(self, nbytes: int) -> Any:
        """A device buffer of at least `nbytes` (never empty)."""
        ...

    def upload(self, buffer: Any, host: np.ndarray, *, blocking: bool = True) -> Any:
        """Copy a host array to the start of a buffer; non-blocking copies are ordered on the queue."""
        ...

    def download(self, host: np.ndarray, buffer: Any, *, blocking: bool = True) -> Any:
        """Copy the start of a buffer into a host array; non-blocking copies are ordered on the queue."""
        ...

    def copy(self, dst: Any, src: Any) -> None:
        """Copy one device buffer into another of the same size."""
        ...

    def pinned(self, count: int) -> np.ndarray:
        """`count` float32 of page-locked host memory, the staging of non-blocking copies."""
        ...


class HostMemory(Protocol):
    """How host arrays reach the kernels: `host_memory` is one of HOST_MEMORY_MODES. The zero-copy
    methods serve "shared" and "mapped" runtimes; a "staged" runtime raises InvalidParamsError."""

    host_memory: str

    def wrap(self, host: np.ndarray, writable: bool) -> Any:
        """A buffer over a host array's own memory, no copy."""
        ...

    def expose(self, buffer: Any, host: np.ndarray) -> None:
        """Make a wrapped host array current after kernels wrote it (a map where memory is
        "mapped"; nothing where it is "shared")."""
        ...

    def host_output(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        """A new host array for kernels to write (as the caller sees it: no other caller holds
        it) and a buffer over it."""
        ...


class Launcher(Protocol):
    """One in-order queue (or stream) that kernels are launched on."""

    lock: threading.RLock  # enqueues from several threads take turns on the one queue

    def bind(self, kernel: Any, source: KernelSource) -> Enqueue:
        """An enqueuer for one kernel: given the buffers by kind, it launches the kernel with its
        arguments in order (the ints are the source's own) and returns its event. Called with
        the runtime's lock held."""
        ...

    def launch(self, kernel: Any, source: KernelSource, args: tuple[Any, ...]) -> Any:
        """Enqueue one kernel with its arguments (buffers and np.int32 values) in order."""
        ...

    def wait(self, events: Sequence[Any]) -> None:
        """Block until everything enqueued up to the last of `events` has finished."""
        ...

    def retain(self, event: Any, objects: Any) -> None:
        """Keep `objects` (the events of kernels not waited for, and the buffers they read and
        write) alive until `event` has completed: a buffer over host memory that the caller drops
        must not free that memory under a kernel still queued, and PoCL 3.1 fails ("PTHREAD ERROR
        in can_run_command") when an event is released while its command is queued."""
        ...


class Timer(Protocol):
    """Device time of what was launched."""

    def elapsed_ms(self, enqueue: Callable[[], list[Any]]) -> float:
        """Run `enqueue` (which launches kernels and returns their events) and return the device
        time it took, in ms (0.0 when it launched nothing)."""
        ...

    def span_ms(self, events: Sequence[Any]) -> float | None:
        """Device time from the first event's start to the last one's end, once they finished
        (None where the runtime cannot tell)."""
        ...


class DeviceArrays(Protocol):
    """The arrays a layer returns for device inputs, and the foreign ones it accepts.
    `layout_arrays`: whether its device arrays carry a layout (autoconv.DeviceArray's `.layout`,
    `.viewed_as`), so channel-blocked tensors flow between layers."""

    layout_arrays: bool

    def new_array(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """A new float32 device array of that shape and its buffer."""
        ...

    def set_ready(self, array: Any, event: Any) -> None:
        """Record the event after which a device array made by new_array holds its result."""
        ...

    def device_buffer(self, value: Any, name: str) -> Any | None:
        """The buffer of a float32, C-ordered device array of this device (None when `value` is
        not a device array); InvalidSpecError for an array on another device."""
        ...

    def adopt(self, host: np.ndarray) -> Any:
        """A device array holding a host array's contents (the host array itself where memory is
        "shared": the caller gives it up)."""
        ...


class LibraryGemm(Protocol):
    """The runtime's BLAS, for library_gemm algorithms (where `has_library_gemm`)."""

    has_library_gemm: bool

    def library_gemm(self, spec: ConvSpec, buffers: dict[str, Any]) -> None:
        """out = weight x scratch (+ bias, + epilogue); InvalidParamsError where there is none."""
        ...


class Runtime(KernelCompiler, DeviceMemory, HostMemory, Launcher, Timer, DeviceArrays, LibraryGemm, Protocol):
    """Every part the launcher (autoconv.backends.launch) uses, for one device."""

    device: DeviceInfo


class DeviceBackend(Backend, Runtime, Protocol):
    """A backend that is its own runtime (OpenCL, CUDA): layers chain its device arrays."""


def is_device_backend(backend: Backend) -> TypeGuard[DeviceBackend]:
    """Whether a backend runs on a device runtime whose device arrays layers accept."""
    return hasattr(backend, "device_buffer")


def enqueue_into_new_array(runtime: Runtime, enqueue: Enqueue, buffers: Mapping[str, Any],
                           storage_shape: tuple[int, ...], keep: tuple[Any, ...]) -> tuple[Any, Any]:
    """A new device array (and its buffer) that the bound kernel `enqueue` writes as its "output"
    buffer, after what is queued before it (later kernels read it in order); `keep` (the inputs)
    and the output stay alive until the kernel is done."""
    array, out = runtime.new_array(storage_shape)
    with runtime.lock:
        event = enqueue({**buffers, "output": out})
    runtime.set_ready(array, event)
    if event is not None:
        runtime.retain(event, (*keep, out))
    return array, out
