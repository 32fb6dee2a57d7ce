"""The CUDA backend on CuPy: the same templates rendered in the CUDA dialect, compiled with NVRTC
(cupy.RawModule), event timing, and the cuBLAS baseline (CuPy's matmul on the im2col matrix)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from autoconv.backends.base import select_index
from autoconv.backends.launch import LaunchedConv, prepare_on, runtime_algorithms
from autoconv.device import DeviceInfo
from autoconv.errors import BackendUnavailableError, KernelCompileError, KernelLaunchError
from autoconv.plan import Plan
from autoconv.render import CUDA, KernelSource
from autoconv.spec import ConvSpec

INSTALL_HINT = "install CuPy for your CUDA version: pip install 'autoconv[cuda]' (cupy-cuda12x)"
DEFAULT_BLOCK = 256  # threads per block where the kernel leaves the work-group size free
NVRTC_OPTIONS = ("--std=c++14",)


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


class CudaBackend:
    """Runs generated kernels on one CUDA device (CuPy's current stream, event-timed): the
    launcher's Runtime for CUDA, with cuBLAS as its library GEMM."""

    name = "cuda"
    dialect = CUDA
    has_library_gemm = True

    def __init__(self, device: int | str | None = None) -> None:
        cupy = _cupy()
        count = cupy.cuda.runtime.getDeviceCount()
        index = 0 if device is None else select_index([describe_device(cupy, i).name for i in range(count)],
                                                      device, "CUDA")
        self._cupy = cupy
        self.index = index
        self.device: DeviceInfo = describe_device(cupy, index)
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

    def alloc(self, nbytes: int) -> Any:
        with self._cupy.cuda.Device(self.index):
            return self._guard(lambda: self._cupy.empty(max(1, nbytes) // 4 or 1, dtype=self._cupy.float32), "allocating")

    def upload(self, buffer: Any, host: np.ndarray) -> None:
        self._guard(lambda: buffer.set(host.reshape(-1)), "copying to the device")

    def download(self, host: np.ndarray, buffer: Any) -> None:
        def get() -> None:
            host.reshape(-1)[...] = buffer[: host.size].get()
        self._guard(get, "copying from the device")

    def copy(self, dst: Any, src: Any) -> None:
        self._guard(lambda: dst.__setitem__(Ellipsis, src), "copying on the device")

    def launch(self, kernel: Any, source: KernelSource, args: tuple) -> Any:
        grid, block = launch_geometry(source)
        return self._guard(lambda: kernel(grid, block, args), f"launching {source.entry}")

    def elapsed_ms(self, enqueue: Any) -> float:
        cp = self._cupy
        start, end = cp.cuda.Event(), cp.cuda.Event()

        def run() -> float:
            start.record()
            enqueue()
            end.record()
            end.synchronize()
            return float(cp.cuda.get_elapsed_time(start, end))
        return self._guard(run, "timing")

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
            out = buffers["output"]
            out[: result.size] = result.reshape(-1)
        self._guard(gemm, "cuBLAS GEMM")

    def _guard(self, action: Any, what: str) -> Any:
        cp = self._cupy
        try:
            return action()
        except (cp.cuda.driver.CUDADriverError, cp.cuda.runtime.CUDARuntimeError) as exc:
            raise KernelLaunchError(f"{what} failed on {self.device.name}: {exc}") from None
