"""The CUDA backend on CuPy: the same templates rendered in the CUDA dialect, compiled with NVRTC
(cupy.RawModule), event timing, and the cuBLAS baseline (CuPy's matmul on the im2col matrix)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from autoconv.backends.base import DeviceInfo, Timing, check_fits
from autoconv.errors import BackendUnavailableError, InvalidParamsError, KernelCompileError, KernelLaunchError
from autoconv.params import check_gemm_params, default_gemm_params
from autoconv.plan import Plan
from autoconv.render import (
    ALGORITHM_DIRECT,
    ALGORITHM_IM2COL_BLAS,
    ALGORITHM_IM2COL_GEMM,
    CUDA,
    KernelSource,
    im2col_scratch_bytes,
    render_direct,
    render_gemm,
    render_im2col,
)
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands

INSTALL_HINT = "install CuPy for your CUDA version: pip install 'autoconv[cuda]' (cupy-cuda12x)"
DEFAULT_BLOCK = 256  # threads per block where the kernel leaves the work-group size free
NVRTC_OPTIONS = ("--std=c++14",)
# The im2col the cuBLAS baseline uses: one element per thread, pixels contiguous, least padding.
BASELINE_IM2COL = default_gemm_params(NWG=16, WPTN=1, VWN=1, IM2COL_ROWS=0, B_TRANSPOSED=0)


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
    """Runs generated kernels on one CUDA device (CuPy's current stream, event-timed)."""

    name = "cuda"
    algorithms = (ALGORITHM_IM2COL_GEMM, ALGORITHM_DIRECT, ALGORITHM_IM2COL_BLAS)

    def __init__(self, device: int | str | None = None) -> None:
        cupy = _cupy()
        count = cupy.cuda.runtime.getDeviceCount()
        if device is None:
            index = 0
        elif isinstance(device, int) and not isinstance(device, bool):
            if not 0 <= device < count:
                raise BackendUnavailableError(f"device: CUDA index {device} is out of range (found {count})")
            index = device
        else:
            names = [describe_device(cupy, i).name for i in range(count)]
            matches = [i for i, n in enumerate(names) if str(device).lower() in n.lower()]
            if not matches:
                raise BackendUnavailableError(f"device: no CUDA device matches {device!r} (found: {', '.join(names)})")
            index = matches[0]
        self._cupy = cupy
        self.index = index
        self.device: DeviceInfo = describe_device(cupy, index)
        self._modules: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.lock = threading.RLock()

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

    def prepare(self, spec: ConvSpec, plan: Plan) -> "CudaConv":
        if plan.algorithm == ALGORITHM_IM2COL_GEMM:
            if plan.gemm is None:
                raise InvalidParamsError("im2col_gemm needs GEMM params; the plan has none")
            check_gemm_params(plan.gemm, self.device.limits())
            sources = [render_im2col(spec, plan.gemm, CUDA), render_gemm(spec, plan.gemm, CUDA)]
        elif plan.algorithm == ALGORITHM_IM2COL_BLAS:
            sources = [render_im2col(spec, BASELINE_IM2COL, CUDA)]
        elif plan.algorithm == ALGORITHM_DIRECT:
            sources = [render_direct(spec, CUDA)]
        else:
            raise InvalidParamsError(f"algorithm: the cuda backend runs {self.algorithms}, not {plan.algorithm!r}")
        params = plan.gemm if plan.algorithm == ALGORITHM_IM2COL_GEMM else BASELINE_IM2COL
        check_fits(self.device, spec, 0 if plan.algorithm == ALGORITHM_DIRECT else im2col_scratch_bytes(spec, params),
                   sources)
        return CudaConv(self, spec, plan, sources)


class CudaConv:
    """Device arrays and compiled kernels for one ConvSpec; reused across runs."""

    def __init__(self, backend: CudaBackend, spec: ConvSpec, plan: Plan, sources: list[KernelSource]) -> None:
        self.backend, self.spec, self.plan, self.sources = backend, spec, plan, sources
        cp = backend._cupy
        self._cp = cp
        with cp.cuda.Device(backend.index):
            self.x = cp.empty(spec.input_shape, dtype=cp.float32)
            self.w = cp.empty(spec.weight_shape, dtype=cp.float32)
            self.bias = cp.zeros((spec.k,), dtype=cp.float32)
            self.out = cp.empty(spec.output_shape, dtype=cp.float32)
            params = plan.gemm if plan.algorithm == ALGORITHM_IM2COL_GEMM else BASELINE_IM2COL
            needs_cols = plan.algorithm != ALGORITHM_DIRECT
            self.cols = cp.empty(im2col_scratch_bytes(spec, params) // 4, dtype=cp.float32) if needs_cols else None
            self._launches = [(backend.kernel(s), s, *launch_geometry(s)) for s in sources]

    def _args(self, source: KernelSource, x: Any, w: Any) -> tuple:
        buffers = {"input": x, "weight": w, "bias": self.bias, "output": self.out, "scratch": self.cols}
        return tuple(np.int32(a.value) if a.kind == "int" else buffers[a.kind] for a in source.args)

    def _enqueue(self, x: Any, w: Any) -> None:
        cp = self._cp
        try:
            for kernel, source, grid, block in self._launches:
                kernel(grid, block, self._args(source, x, w))
            if self.plan.algorithm == ALGORITHM_IM2COL_BLAS:
                spec, g = self.spec, self.spec.groups
                ldn = self.cols.size // (g * spec.gemm_k)
                cols = self.cols.reshape(g, spec.gemm_k, ldn)[:, :, : spec.gemm_n]
                product = cp.matmul(w.reshape(g, spec.gemm_m, spec.gemm_k), cols)  # cuBLAS SGEMM (TF32 off by default)
                result = product.reshape(spec.k, spec.n, spec.p * spec.q).transpose(1, 0, 2)
                if spec.bias:
                    result = result + self.bias.reshape(1, -1, 1)
                self.out[...] = result.reshape(spec.output_shape)
        except cp.cuda.driver.CUDADriverError as exc:
            raise KernelLaunchError(f"{self.plan.describe()} failed to launch on {self.backend.device.name}: {exc}") from None

    def _upload(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> None:
        check_operands(self.spec, x, weight, bias)
        self.x.set(np.ascontiguousarray(x, dtype=np.float32))
        self.w.set(np.ascontiguousarray(weight, dtype=np.float32))
        if bias is not None:
            self.bias.set(np.ascontiguousarray(bias, dtype=np.float32))

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            *, poison: bool = False) -> np.ndarray:
        cp = self._cp
        with self.backend.lock, cp.cuda.Device(self.backend.index):
            self._upload(x, weight, bias)
            if poison:
                self.out.fill(np.nan)
            self._enqueue(self.x, self.w)
            try:
                return cp.asnumpy(self.out)
            except cp.cuda.runtime.CUDARuntimeError as exc:
                raise KernelLaunchError(f"{self.plan.describe()} failed while running: {exc}") from None

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             *, warmup: int = 2, repeats: int = 10, rotate: int = 3) -> Timing:
        cp = self._cp
        samples = []
        with self.backend.lock, cp.cuda.Device(self.backend.index):
            self._upload(x, weight, bias)
            copies = [(self.x, self.w)] + [(self.x.copy(), self.w.copy()) for _ in range(max(1, rotate) - 1)]
            for i in range(warmup):
                self._enqueue(*copies[i % len(copies)])
            start, end = cp.cuda.Event(), cp.cuda.Event()
            for i in range(repeats):
                start.record()
                self._enqueue(*copies[i % len(copies)])
                end.record()
                end.synchronize()
                samples.append(cp.cuda.get_elapsed_time(start, end))
        return Timing(tuple(samples))
