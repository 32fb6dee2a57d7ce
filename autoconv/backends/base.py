"""The Backend contract that the numpy reference, OpenCL and CUDA backends all implement."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from autoconv.params import DeviceLimits
from autoconv.plan import Plan
from autoconv.render import KernelSource
from autoconv.resources import check_device, check_int_args
from autoconv.spec import ConvSpec

# One table turns the many spellings drivers report into one vendor name.
VENDOR_NAMES = {
    "nvidia": "nvidia",
    "advanced micro devices": "amd",
    "authenticamd": "amd",
    "amd": "amd",
    "intel": "intel",
    "genuineintel": "intel",
    "apple": "apple",
    "arm": "arm",
    "qualcomm": "qualcomm",
    "portable computing language": "pocl",
}


def normalise_vendor(raw: str) -> str:
    lowered = raw.strip().lower()
    for needle, vendor in VENDOR_NAMES.items():
        if needle in lowered:
            return vendor
    return lowered or "unknown"


@dataclass(frozen=True)
class DeviceInfo:
    """What identifies a device for caching and tuning, and what limits its kernels."""

    backend: str
    platform: str
    vendor: str
    name: str
    driver: str
    device_type: str  # "cpu", "gpu", "accelerator" or "host"
    compute_units: int
    local_mem_bytes: int
    max_work_group_size: int
    max_work_item_sizes: tuple[int, ...]
    max_alloc_bytes: int = 0  # largest single buffer (0: unknown, not checked)
    global_mem_bytes: int = 0  # memory for all buffers together (0: unknown, not checked)

    def fingerprint(self) -> str:
        """Everything that can change a kernel's speed or correctness: results are keyed on it."""
        return f"{self.backend}|{self.platform}|{self.vendor}|{self.name}|{self.driver}"

    def limits(self) -> DeviceLimits:
        # CUDA C++ has no arithmetic on float4 & co., so the CUDA dialect's accumulators are scalar.
        vector_width = 1 if self.backend == "cuda" else 16
        return DeviceLimits(self.max_work_group_size, self.max_work_item_sizes, self.local_mem_bytes, vector_width)


def conv_buffers(spec: ConvSpec, scratch_bytes: int) -> dict[str, int]:
    """The device buffers a prepared conv allocates, by name, in bytes."""
    return {"input": spec.input_bytes, "weight": spec.k * spec.c_per_group * spec.r * spec.s * spec.itemsize,
            "bias": spec.k * spec.itemsize, "output": spec.n * spec.k * spec.p * spec.q * spec.itemsize,
            **({"im2col scratch": scratch_bytes} if scratch_bytes else {})}


def check_fits(device: DeviceInfo, spec: ConvSpec, scratch_bytes: int, sources: Iterable[KernelSource] = ()) -> None:
    """Raise ResourceLimitError, before anything is allocated, when the conv's buffers exceed the
    device's limits or a kernel's int argument exceeds 32 bits."""
    check_device(device.name, device.max_alloc_bytes, device.global_mem_bytes, conv_buffers(spec, scratch_bytes))
    check_int_args((f"{source.entry}.{arg.name}", arg.value) for source in sources for arg in source.args
                   if arg.kind == "int")
    check_int_args((f"{source.entry} global size", size) for source in sources for size in source.global_size)


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

    def gflops(self, spec: ConvSpec) -> float:
        return spec.flops / (self.median_ms * 1e6)


@runtime_checkable
class PreparedConv(Protocol):
    """One ConvSpec made ready on a device under one Plan: kernels compiled, scratch allocated."""

    spec: ConvSpec
    plan: Plan

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            *, poison: bool = False) -> np.ndarray:
        """Convolve host arrays and return a new float array of spec.output_shape.

        poison=True first fills the output with NaN, so an element the kernels never write shows.
        """
        ...

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             *, warmup: int = 2, repeats: int = 10, rotate: int = 3) -> Timing:
        """Time the computation alone (inputs already on the device): warm-up runs, then repeats.

        The runs take `rotate` copies of the inputs in turn, so caches warmed by one run do not
        flatter the next. Each sample is one whole run (im2col and GEMM), event-timed on devices.
        """
        ...


@runtime_checkable
class Backend(Protocol):
    """A place convolutions run.

    Contract: `prepare(spec, plan)` accepts any valid ConvSpec and any plan whose algorithm is in
    `algorithms`; it raises InvalidParamsError for params that break the device's constraints
    (before compiling), KernelCompileError / KernelLaunchError for kernels that fail, and
    BackendUnavailableError when the device is gone. The prepared conv's results match the float64
    reference to 1e-4 relative error for float32 and write every output element.
    """

    name: str
    device: DeviceInfo
    algorithms: tuple[str, ...]

    def prepare(self, spec: ConvSpec, plan: Plan) -> PreparedConv:
        ...
