"""Where each way of computing a layer sits against the device's limits (the roofline model):
the bytes it must move (each algorithm's `traffic_bytes`), its arithmetic intensity (FLOPs per
byte), and the device's measured compute peak and memory bandwidth.

The peak is the generated GEMM on a GEMM-shaped layer (a 1x1 convolution, 512x512 by 4096
pixels, implicit GEMM's heuristic); the bandwidth is a copy kernel over 64 MiB (the padded-copy
kernel with no padding). Both are the best of a few event-timed runs: roofs, not typical values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoconv.algorithms import IMPLICIT_GEMM, get_algorithm
from autoconv.backends.base import Backend
from autoconv.backends.runtime import is_device_backend
from autoconv.errors import InvalidParamsError
from autoconv.plan import Plan
from autoconv.render import KernelArg, KernelSource, int_args, render_template
from autoconv.spec import ConvSpec
from autoconv.tuning.verify import random_operands

PEAK_SPEC = ConvSpec(1, 512, 64, 64, 512, 1, 1)
COPY_ROWS, COPY_WIDTH = 4096, 4096  # 64 MiB copied


@dataclass(frozen=True)
class DeviceRoofs:
    """A device's measured limits: GFLOP/s of a GEMM and GB/s of a copy."""

    peak_gflops: float
    bandwidth_gbs: float

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where a kernel stops being memory-bound."""
        return self.peak_gflops / self.bandwidth_gbs

    def bound(self, intensity: float) -> float:
        """The most GFLOP/s a kernel of this intensity can reach on the device."""
        return min(self.peak_gflops, self.bandwidth_gbs * intensity)


def measure_roofs(backend: Backend, repeats: int = 5) -> DeviceRoofs:
    """Time the GEMM and the copy on a device backend (one with kernels and the Runtime primitives)."""
    conv = backend.prepare(PEAK_SPEC, Plan(IMPLICIT_GEMM, get_algorithm(IMPLICIT_GEMM).heuristic(PEAK_SPEC, backend.device)))
    peak_ms = conv.time(*random_operands(PEAK_SPEC), warmup=1, repeats=repeats).min_ms
    if not is_device_backend(backend):
        raise InvalidParamsError(f"backend: the roofline is measured with device kernels; the {backend.name} "
                                 "backend has none")
    runtime = backend
    text = render_template("shared/pad.j2", dialect=runtime.dialect, entry="pad_input")
    args = (KernelArg("x", "input"), KernelArg("xp", "scratch"),
            *int_args(H=COPY_ROWS, W=COPY_WIDTH, PH=0, PW=0, ROWS=COPY_ROWS, SLACK=0))
    source = KernelSource(text, "pad_input", runtime.dialect.name, (COPY_ROWS + 1, 1, 1), None, args)
    nbytes = COPY_ROWS * COPY_WIDTH * 4
    src, dst = runtime.alloc(nbytes), runtime.alloc(nbytes)
    runtime.upload(src, np.ones(COPY_ROWS * COPY_WIDTH, np.float32))
    kernel = runtime.kernel(source)
    launch_args = (src, dst, *(np.int32(a.value) for a in args[2:]))
    with runtime.lock:
        times = [runtime.elapsed_ms(lambda: [runtime.launch(kernel, source, launch_args)]) for _ in range(repeats + 1)]
    copy_ms = min(times[1:])
    return DeviceRoofs(PEAK_SPEC.flops / (peak_ms * 1e6), 2 * nbytes / (copy_ms * 1e6))
