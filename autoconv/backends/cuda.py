"""The CUDA backend on CuPy: the same templates rendered in the CUDA dialect, compiled with NVRTC
(cupy.RawModule), event timing, the cuBLAS baseline (CuPy's matmul on the im2col matrix), and
device arrays: CuPy arrays, and anything with __cuda_array_interface__ or DLPack (a PyTorch CUDA
tensor) without a copy. Host arrays travel through pinned memory with non-blocking copies."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from autoconv import epilogue
from autoconv.backends.base import select_index
from autoconv.backends.launch import LaunchedConv, prepare_on, runtime_algorithms
from autoconv.backends.runtime import DeviceBackend, Enqueue
from autoconv.device import DeviceInfo
from autoconv.errors import (BackendUnavailableError, InvalidParamsError, InvalidSpecError, KernelCompileError,
                             KernelLaunchError)
from autoconv.plan import Plan
from autoconv.render import CUDA, KernelSource
from autoconv.spec import ConvSpec

INSTALL_HINT = "install CuPy for your CUDA version: pip install cupy-cuda12x (autoconv's [cuda] extra; cupy-cuda13x for CUDA 13)"
DEFAULT_BLOCK = 256  # threads per block where the kernel leaves the work-group size free
NVRTC_OPTIONS = ("--std=c++14",)
DLPACK_CUDA = 2  # kDLCUDA, the DLPack device type of CUDA memory


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise BackendUnavailableError(f"the cuda backend needs CuPy: {INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError when there is no driver at all
        raise BackendUnavailableError(f"no CUDA device: {exc}") from None
    if count == 0:
        raise BackendUnavailableError("no CUDA device: the CUDA runtime found none")
    return cupy


def describe_device(cupy: Any, index: int) -> DeviceInfo:
    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    driver = cupy.cuda.runtime.driverGetVersion()
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return DeviceInfo(
        backend="cuda", platform=f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}", vendor="nvidia",
        name=f"{name} (sm_{props['major']}{props['minor']}, {props['multiProcessorCount']} SMs)",
        driver=f"{driver // 1000}.{driver % 1000 // 10}", device_type="gpu",
        compute_units=int(props["multiProcessorCount"]), local_mem_bytes=int(props["sharedMemPerBlock"]),
        max_work_group_size=int(props["maxThreadsPerBlock"]),
        max_work_item_sizes=tuple(int(v) for v in props["maxThreadsDim"]),
        max_alloc_bytes=int(props["totalGlobalMem"]), global_mem_bytes=int(props["totalGlobalMem"]),
    )


def launch_geometry(source: KernelSource) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a source: its work-group size, else DEFAULT_BLOCK threads along x.
    The kernels guard every index, so rounding the grid up is safe."""
    block = source.local_size or (min(DEFAULT_BLOCK, source.global_size[0]), 1, 1)
    grid = tuple(-(-g // b) for g, b in zip(source.global_size, block))
    return grid, block  # type: ignore[return-value]


class CudaBackend(DeviceBackend):
    """Runs generated kernels on one CUDA device (CuPy's current stream, event-timed): the
    launcher's Runtime for CUDA, with cuBLAS as its library GEMM."""

    name = "cuda"
    dialect = CUDA
    has_library_gemm = True
    host_memory = "staged"  # a discrete GPU: host arrays are copied, through pinned memory
    layout_arrays = False  # CuPy arrays have no layout of their own

    def __init__(self, device: int | str | None = None, *, host_memory: str | None = None) -> None:
        if host_memory not in (None, "staged"):
            raise InvalidParamsError(f"host_memory: CUDA devices run 'staged' (copies), not {host_memory!r}")
        cupy = _cupy()
        count = cupy.cuda.runtime.getDeviceCount()
        index = 0 if device is None else select_index([describe_device(cupy, i).name for i in range(count)],
                                                      device, "CUDA")
        self._cupy = cupy
        self.index = index
        self.device: DeviceInfo = describe_device(cupy, index)
        self._device_context = cupy.cuda.Device(index)
        self._modules: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.lock = threading.RLock()
        self.algorithms = runtime_algorithms(self.has_library_gemm)

    def kernel(self, source: KernelSource) -> Any:
        key = (source.source_hash, self.device.fingerprint())
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                with self._cupy.cuda.Device(self.index):
                    try:
                        module = self._cupy.RawModule(code=source.text, options=NVRTC_OPTIONS)
                        module.compile()
                    except Exception as exc:  # noqa: BLE001 - NVRTC errors come in several classes
                        raise KernelCompileError(f"{source.entry} failed to compile on {self.device.name}:\n{exc}") from None
                self._modules[key] = module
        return module.get_function(source.entry)

    def prepare(self, spec: ConvSpec, plan: Plan) -> LaunchedConv:
        with self._cupy.cuda.Device(self.index):
            return prepare_on(self, self.algorithms, spec, plan)

    # The launcher's primitives ------------------------------------------------------------------

    def bind(self, kernel: Any, source: KernelSource) -> Enqueue:
        grid, block = launch_geometry(source)
        template = [np.int32(arg.value) if arg.kind == "int" else None for arg in source.args]
        slots = [(index, arg.kind) for index, arg in enumerate(source.args) if arg.kind != "int"]

        def enqueue(buffers: Any) -> Any:
            args = list(template)
            for index, kind in slots:
                args[index] = buffers[kind]
            with self._device_context:
                return self._guard(lambda: kernel(grid, block, tuple(args)), f"launching {source.entry}")
        return enqueue

    def alloc(self, nbytes: int) -> Any:
        with self._device_context:
            return self._guard(lambda: self._cupy.empty(max(1, nbytes) // 4 or 1, dtype=self._cupy.float32), "allocating")

    def wrap(self, host: np.ndarray, writable: bool) -> Any:
        raise InvalidParamsError(f"{self.device.name} has memory of its own: host arrays are copied, not lent")

    def expose(self, buffer: Any, host: np.ndarray) -> None:
        return None

    def pinned(self, count: int) -> np.ndarray:
        import cupyx

        return self._guard(lambda: cupyx.empty_pinned((max(1, count),), dtype=np.float32)[:count],
                           "allocating pinned host memory")

    def upload(self, buffer: Any, host: np.ndarray, *, blocking: bool = True) -> Any:
        def put() -> None:
            flat = host.reshape(-1)
            target = buffer if buffer.size == flat.size else buffer[: flat.size]
            target.set(flat, stream=None if blocking else self._cupy.cuda.get_current_stream())
            if blocking:
                self._cupy.cuda.get_current_stream().synchronize()
        with self._device_context:
            self._guard(put, "copying to the device")

    def download(self, host: np.ndarray, buffer: Any, *, blocking: bool = True) -> Any:
        def get() -> None:
            flat = host.reshape(-1)
            if blocking:
                flat[...] = buffer[: flat.size].get()
            else:  # into pinned memory, ordered on the stream; the caller waits on the stream
                buffer[: flat.size].get(stream=self._cupy.cuda.get_current_stream(), out=flat, blocking=False)
        with self._device_context:
            self._guard(get, "copying from the device")

    def copy(self, dst: Any, src: Any) -> None:
        self._guard(lambda: dst.__setitem__(Ellipsis, src), "copying on the device")

    def launch(self, kernel: Any, source: KernelSource, args: tuple[Any, ...]) -> Any:
        grid, block = launch_geometry(source)
        return self._guard(lambda: kernel(grid, block, args), f"launching {source.entry}")

    def wait(self, events: Sequence[Any]) -> None:
        # Kernels and copies are ordered on the current stream: waiting for it waits for all.
        with self._device_context:
            self._guard(lambda: self._cupy.cuda.get_current_stream().synchronize(), "waiting for the device")

    def elapsed_ms(self, enqueue: Callable[[], list[Any]]) -> float:
        """CUDA events recorded around the launches on the current stream."""
        cp = self._cupy

        def run() -> float:
            stream = cp.cuda.get_current_stream()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            enqueue()
            end.record(stream)
            end.synchronize()
            return float(cp.cuda.get_elapsed_time(start, end))
        with self._device_context:
            return float(self._guard(run, "timing"))

    def span_ms(self, events: Sequence[Any]) -> float | None:
        return None  # launches record no events; time() measures with CUDA events instead

    def host_output(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        raise InvalidParamsError(f"{self.device.name} has memory of its own: results are copied, not written "
                                 "into host arrays")

    def new_array(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        with self._device_context:
            array = self._guard(lambda: self._cupy.empty(shape, dtype=self._cupy.float32), "allocating")
        return array, array.reshape(-1)

    def adopt(self, host: np.ndarray) -> Any:
        with self._device_context:
            return self._guard(lambda: self._cupy.asarray(np.ascontiguousarray(host, dtype=np.float32)),
                               "copying to the device")

    def set_ready(self, array: Any, event: Any) -> None:
        return None  # CuPy arrays are ordered on their stream

    def retain(self, event: Any, objects: Any) -> None:
        return None  # CuPy's memory pool reuses freed memory only in stream order, after queued kernels

    def device_buffer(self, value: Any, name: str) -> Any | None:
        """A CuPy array, or a CUDA array of another library through __cuda_array_interface__ or
        DLPack (no copy); converted to float32 C order (a copy) when it is not already."""
        cp = self._cupy
        if isinstance(value, np.ndarray):
            return None
        if isinstance(value, cp.ndarray):
            array = value
        elif hasattr(value, "__cuda_array_interface__"):
            array = cp.asarray(value)
        elif hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
            if value.__dlpack_device__()[0] != DLPACK_CUDA:
                return None  # host memory through DLPack: read as a host array
            array = cp.from_dlpack(value)
        else:
            return None
        if array.device.id != self.index:
            raise InvalidSpecError(f"{name}: the array is on CUDA device {array.device.id}, this layer on device "
                                   f"{self.index} ({self.device.name})")
        if array.dtype != cp.float32 or not array.flags.c_contiguous:
            with self._device_context:
                array = cp.ascontiguousarray(array, dtype=cp.float32)
        return array.reshape(-1)

    def library_gemm(self, spec: ConvSpec, buffers: dict[str, Any]) -> None:
        """out = weight x im2col (+ bias) through cuBLAS (CuPy's matmul; TF32 off by default)."""
        cp, g = self._cupy, spec.groups
        scratch = buffers["scratch"]
        ldn = scratch.size // (g * spec.gemm_k)
        cols = scratch[: g * spec.gemm_k * ldn].reshape(g, spec.gemm_k, ldn)[:, :, : spec.gemm_n]
        weight = buffers["weight"][: spec.k * spec.gemm_k].reshape(g, spec.gemm_m, spec.gemm_k)

        def gemm() -> None:
            product = cp.matmul(weight, cols)
            result = product.reshape(spec.k, spec.n, spec.p * spec.q).transpose(1, 0, 2)
            if spec.bias:
                result = result + buffers["bias"][: spec.k].reshape(1, -1, 1)
            residual = buffers["residual"][: result.size] if spec.residual else None
            result = epilogue.apply(spec, result, residual, cp)
            out = buffers["output"]
            out[: result.size] = result.reshape(-1)
        self._guard(gemm, "cuBLAS GEMM")

    def _guard(self, action: Any, what: str) -> Any:
        cp = self._cupy
        try:
            return action()
        except (cp.cuda.driver.CUDADriverError, cp.cuda.runtime.CUDARuntimeError) as exc:
            raise KernelLaunchError(f"{what} failed on {self.device.name}: {exc}") from None
