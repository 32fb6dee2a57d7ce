"""Measure one layer three ways on the user's device: direct loops, im2col + library BLAS, and
im2col + the generated GEMM. This is the answer to "why is im2col faster", with numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoconv.backends import get_backend
from autoconv.backends.base import Backend, PreparedConv
from autoconv.plan import Plan
from autoconv.render import ALGORITHM_DIRECT, ALGORITHM_IM2COL_BLAS, ALGORITHM_REFERENCE
from autoconv.spec import ConvSpec

# Relative error a float32 result may have against the float64 reference.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Measurement:
    """One way of computing a layer: what ran, on what, how fast, and whether it was right."""

    method: str
    device: str
    plan: str
    median_ms: float
    gflops: float
    scratch_bytes: int
    rel_error: float

    @property
    def verified(self) -> bool:
        return self.rel_error < TOLERANCE


def random_operands(spec: ConvSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random, never-zero float32 input, weight and (when the spec has one) bias."""
    from autoconv.resources import check_host

    weight_bytes = spec.k * spec.c_per_group * spec.r * spec.s * spec.itemsize
    # float64 draws for magnitude and sign, then the float32 arrays: about five times their size.
    check_host(f"random operands for {spec}", 5 * (spec.input_bytes + weight_bytes))
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        # Uniform in ±[0.5, 1.5): no zeros, so a skipped term always changes the result.
        magnitude = rng.uniform(0.5, 1.5, size=shape)
        return (magnitude * rng.choice((-1.0, 1.0), size=shape)).astype(np.float32)

    return draw(spec.input_shape), draw(spec.weight_shape), draw((spec.k,)) if spec.bias else None


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    """max |result - reference| / max |reference|; NaN anywhere (an unwritten element) is infinite."""
    if result.shape != reference.shape or not np.all(np.isfinite(result)):
        return float("inf")
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(result.astype(np.float64) - reference))) / scale


def reference_output(spec: ConvSpec, operands: tuple) -> np.ndarray:
    """The float64 reference result every generated kernel is checked against."""
    return get_backend("numpy").prepare(spec, Plan(ALGORITHM_REFERENCE, None, "reference")).run(*operands)


def measure(method: str, backend: Backend, spec: ConvSpec, plan: Plan, operands: tuple, reference: np.ndarray,
            *, scratch_bytes: int = 0, repeats: int = 5, conv: PreparedConv | None = None) -> Measurement:
    """Check one plan against the reference and time it (`conv`: the plan already prepared)."""
    conv = conv if conv is not None else backend.prepare(spec, plan)
    error = relative_error(conv.run(*operands, poison=True), reference)
    timing = conv.time(*operands, warmup=1, repeats=repeats)
    return Measurement(method, backend.device.name, plan.describe(), timing.median_ms, timing.gflops(spec),
                       scratch_bytes, error)


def compare_layer(spec: ConvSpec, backend: Backend | None = None, *, repeats: int = 5,
                  gemm_plan: Plan | None = None) -> list[Measurement]:
    """Direct loops (generated kernel) vs im2col + numpy BLAS vs im2col + generated GEMM, one run."""
    from autoconv.lookup import lookup

    device_backend = backend or get_backend("opencl")
    host = get_backend("numpy")
    operands = random_operands(spec)
    reference = reference_output(spec, operands)
    plan = gemm_plan or lookup(spec, device_backend, allow_baseline=False)
    return [
        measure("direct loops", device_backend, spec, Plan(ALGORITHM_DIRECT, None, "naive kernel"),
                operands, reference, repeats=repeats),
        measure("im2col + numpy BLAS", host, spec, Plan(ALGORITHM_IM2COL_BLAS, None, "baseline"),
                operands, reference, scratch_bytes=spec.im2col_bytes, repeats=repeats),
        measure("im2col + generated GEMM", device_backend, spec, plan, operands, reference,
                scratch_bytes=spec.im2col_bytes, repeats=repeats),
    ]
