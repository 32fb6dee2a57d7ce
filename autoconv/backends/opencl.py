"""The OpenCL backend on pyopencl: device discovery, program cache, buffers, event timing."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoconv.backends.base import DeviceInfo, Timing, check_fits, normalise_vendor
from autoconv.errors import BackendUnavailableError, InvalidParamsError, KernelCompileError, KernelLaunchError
from autoconv.params import check_gemm_params
from autoconv.plan import Plan
from autoconv.render import (
    ALGORITHM_DIRECT,
    ALGORITHM_IM2COL_GEMM,
    OPENCL,
    KernelSource,
    im2col_scratch_bytes,
    render_direct,
    render_gemm,
    render_im2col,
)
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands

INSTALL_HINT = (
    "install pyopencl and an OpenCL driver: `pip install pyopencl` and, for the CPU, "
    "`bash scripts/install_pocl.sh` (Debian's pocl-opencl-icd)"
)

_PROBE_SOURCE = "__kernel void probe(__global float* a) { a[get_global_id(0)] += 1.0f; }"


def _cl() -> Any:
    try:
        import pyopencl
    except ImportError:
        raise BackendUnavailableError(f"the opencl backend needs pyopencl: {INSTALL_HINT}") from None
    return pyopencl


@dataclass(frozen=True)
class OpenCLDevice:
    """One device as discovery found it: its index, identity, and whether it can build kernels."""

    index: int
    info: DeviceInfo
    usable: bool
    problem: str


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


def _probe(cl: Any, device: Any) -> str:
    """Build and run a one-line kernel; '' when the device works, else why not."""
    try:
        context = cl.Context([device])
        queue = cl.CommandQueue(context)
        program = cl.Program(context, _PROBE_SOURCE).build()
        host = np.zeros(4, dtype=np.float32)
        buffer = cl.Buffer(context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)
        program.probe(queue, (4,), None, buffer)
        cl.enqueue_copy(queue, host, buffer)
        return "" if np.all(host == 1.0) else "probe kernel gave a wrong result"
    except Exception as exc:  # noqa: BLE001 - a broken driver may raise anything; report, don't crash
        return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__


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
                    problem = _probe(cl, device)
                    found.append((OpenCLDevice(len(found), _describe(cl, platform, device), not problem, problem),
                                  device))
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
    if isinstance(device, int) and not isinstance(device, bool):
        if not 0 <= device < len(found):
            raise BackendUnavailableError(f"device: index {device} is out of range (found {len(found)} devices)")
        chosen = found[device]
    else:
        matches = [e for e in found if str(device).lower() in e[0].info.name.lower()]
        if not matches:
            names = ", ".join(e[0].info.name for e in found)
            raise BackendUnavailableError(f"device: no OpenCL device matches {device!r} (found: {names})")
        chosen = matches[0]
    if not chosen[0].usable:
        raise BackendUnavailableError(f"device: {chosen[0].info.name} cannot build kernels: {chosen[0].problem}")
    return chosen


class OpenCLBackend:
    """Runs generated kernels on one OpenCL device through one in-order profiling queue."""

    name = "opencl"
    algorithms = (ALGORITHM_IM2COL_GEMM, ALGORITHM_DIRECT)

    def __init__(self, device: int | str | None = None) -> None:
        cl = _cl()
        entry, cl_device = select_device(device)
        self.device: DeviceInfo = entry.info
        self.index = entry.index
        self._cl = cl
        self.context = cl.Context([cl_device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self._programs: dict[tuple[str, str], Any] = {}
        self._programs_lock = threading.Lock()
        self.lock = threading.RLock()  # one queue: runs from several threads take turns

    def kernel(self, source: KernelSource) -> Any:
        """The compiled kernel for a source, built once per (source hash, device and driver)."""
        key = (source.source_hash, self.device.fingerprint())
        with self._programs_lock:
            program = self._programs.get(key)
            if program is None:
                try:
                    with warnings.catch_warnings():
                        # Build-log chatter (unused variables and the like) is not the user's concern.
                        warnings.simplefilter("ignore", self._cl.CompilerWarning)
                        program = self._cl.Program(self.context, source.text).build(options=["-cl-mad-enable"])
                except self._cl.Error as exc:
                    raise KernelCompileError(f"{source.entry} failed to compile on {self.device.name}:\n{exc}") from None
                self._programs[key] = program
        # A fresh kernel object per caller: each binds its own arguments.
        return self._cl.Kernel(program, source.entry)

    def prepare(self, spec: ConvSpec, plan: Plan) -> "OpenCLConv":
        if plan.algorithm == ALGORITHM_IM2COL_GEMM:
            if plan.gemm is None:
                raise InvalidParamsError("im2col_gemm needs GEMM params; the plan has none")
            check_gemm_params(plan.gemm, self.device.limits())
            sources = [render_im2col(spec, plan.gemm, OPENCL), render_gemm(spec, plan.gemm, OPENCL)]
        elif plan.algorithm == ALGORITHM_DIRECT:
            sources = [render_direct(spec, OPENCL)]
        else:
            raise InvalidParamsError(f"algorithm: the opencl backend runs {self.algorithms}, not {plan.algorithm!r}")
        scratch = im2col_scratch_bytes(spec, plan.gemm) if plan.algorithm == ALGORITHM_IM2COL_GEMM else 0
        check_fits(self.device, spec, scratch, sources)
        return OpenCLConv(self, spec, plan, sources)


class OpenCLConv:
    """Device buffers and bound kernels for one ConvSpec; reused across runs."""

    def __init__(self, backend: OpenCLBackend, spec: ConvSpec, plan: Plan, sources: list[KernelSource]) -> None:
        self.backend = backend
        self.spec = spec
        self.plan = plan
        self.sources = sources
        cl = backend._cl
        self._cl = cl
        flags = cl.mem_flags
        ctx = backend.context
        itemsize = spec.itemsize
        self.x_buf = cl.Buffer(ctx, flags.READ_ONLY, spec.input_bytes)
        self.w_buf = cl.Buffer(ctx, flags.READ_ONLY, int(np.prod(spec.weight_shape)) * itemsize)
        self.bias_buf = cl.Buffer(ctx, flags.READ_ONLY, spec.k * itemsize)
        self.out_buf = cl.Buffer(ctx, flags.READ_WRITE, int(np.prod(spec.output_shape)) * itemsize)
        kernels = [backend.kernel(source) for source in sources]
        self._launches = list(zip(kernels, sources))
        self.cols_buf = None
        if plan.algorithm == ALGORITHM_IM2COL_GEMM:
            self.cols_buf = cl.Buffer(ctx, flags.READ_WRITE, im2col_scratch_bytes(spec, plan.gemm))
        self._bind(self.x_buf, self.w_buf)

    def _bind(self, x_buf: Any, w_buf: Any) -> None:
        """Set every kernel's arguments from its KernelSource.args, with these input buffers."""
        buffers = {"input": x_buf, "weight": w_buf, "bias": self.bias_buf, "output": self.out_buf,
                   "scratch": self.cols_buf}
        for kernel, source in self._launches:
            kernel.set_args(*(np.int32(arg.value) if arg.kind == "int" else buffers[arg.kind] for arg in source.args))

    def _upload(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> None:
        check_operands(self.spec, x, weight, bias)
        queue, cl = self.backend.queue, self._cl
        cl.enqueue_copy(queue, self.x_buf, np.ascontiguousarray(x, dtype=np.float32))
        cl.enqueue_copy(queue, self.w_buf, np.ascontiguousarray(weight, dtype=np.float32))
        if bias is not None:
            cl.enqueue_copy(queue, self.bias_buf, np.ascontiguousarray(bias, dtype=np.float32))

    def _enqueue(self) -> list[Any]:
        queue, cl = self.backend.queue, self._cl
        events = []
        try:
            for kernel, source in self._launches:
                events.append(cl.enqueue_nd_range_kernel(queue, kernel, source.global_size, source.local_size))
        except cl.Error as exc:
            raise KernelLaunchError(f"{self.plan.describe()} failed to launch on {self.backend.device.name}: {exc}") from None
        return events

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            *, poison: bool = False) -> np.ndarray:
        out = np.empty(self.spec.output_shape, dtype=np.float32)
        with self.backend.lock:
            self._upload(x, weight, bias)
            if poison:
                out.fill(np.nan)
                self._cl.enqueue_copy(self.backend.queue, self.out_buf, out)
            self._enqueue()
            try:
                self._cl.enqueue_copy(self.backend.queue, out, self.out_buf)
            except self._cl.Error as exc:
                raise KernelLaunchError(f"{self.plan.describe()} failed while running: {exc}") from None
        return out

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             *, warmup: int = 2, repeats: int = 10, rotate: int = 3) -> Timing:
        samples = []
        cl, queue, flags = self._cl, self.backend.queue, self._cl.mem_flags
        if rotate > 1:  # the rotated copies of the inputs must fit beside the conv's own buffers
            check_fits(self.backend.device, self.spec.replace(n=self.spec.n * rotate),
                       self.cols_buf.size if self.cols_buf is not None else 0)
        with self.backend.lock:
            self._upload(x, weight, bias)
            copies = [(self.x_buf, self.w_buf)]
            for _ in range(max(1, rotate) - 1):
                x_copy = cl.Buffer(self.backend.context, flags.READ_ONLY, self.x_buf.size)
                w_copy = cl.Buffer(self.backend.context, flags.READ_ONLY, self.w_buf.size)
                cl.enqueue_copy(queue, x_copy, self.x_buf)
                cl.enqueue_copy(queue, w_copy, self.w_buf)
                copies.append((x_copy, w_copy))
            try:
                for i in range(warmup):
                    self._bind(*copies[i % len(copies)])
                    self._enqueue()[-1].wait()
                for i in range(repeats):
                    self._bind(*copies[i % len(copies)])
                    events = self._enqueue()
                    events[-1].wait()
                    # In-order queue: the run spans from the first kernel's start to the last one's end.
                    samples.append((events[-1].profile.end - events[0].profile.start) * 1e-6)
            except cl.Error as exc:
                raise KernelLaunchError(f"{self.plan.describe()} failed while timing: {exc}") from None
            finally:
                self._bind(self.x_buf, self.w_buf)
        return Timing(tuple(samples))
