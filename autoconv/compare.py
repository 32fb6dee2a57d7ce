"""Measure one layer every way autoconv knows on the user's device: each registered algorithm
that supports it (direct loops, im2col + library BLAS, im2col + generated GEMM, implicit GEMM),
with its time, GFLOP/s, extra memory and error against the float64 reference. This is the answer
to "why is im2col faster, and what beats it", with numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autoconv.algorithms import get_algorithm, list_algorithms
from autoconv.backends.base import Backend, PreparedConv
from autoconv.errors import AutoconvError
from autoconv.plan import Plan
from autoconv.serve.session import Session, default_session
from autoconv.spec import ConvSpec
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error


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
    algorithm: str = ""
    traffic_bytes: int = 0  # bytes it must move, modelled (Algorithm.traffic_bytes)

    @property
    def verified(self) -> bool:
        return self.rel_error < TOLERANCE


def measure(method: str, backend: Backend, spec: ConvSpec, plan: Plan, operands: tuple, reference,
            *, scratch_bytes: int = 0, repeats: int = 5, conv: PreparedConv | None = None) -> Measurement:
    """Check one plan against the reference and time it (`conv`: the plan already prepared)."""
    conv = conv if conv is not None else backend.prepare(spec, plan)
    error = relative_error(conv.run(*operands, poison=True), reference)
    timing = conv.time(*operands, warmup=1, repeats=repeats)
    return Measurement(method, backend.device.name, plan.describe(), timing.median_ms, timing.gflops(spec),
                       scratch_bytes, error, plan.algorithm,
                       get_algorithm(plan.algorithm).traffic_bytes(spec, plan.params))


def extra_memory(spec: ConvSpec, plan: Plan, host: bool) -> int:
    """Bytes an algorithm needs beyond input, weight and output (the im2col matrix for im2col)."""
    algorithm = get_algorithm(plan.algorithm)
    if host:
        return spec.im2col_bytes if algorithm.library_gemm else 0
    return algorithm.scratch_bytes(spec, plan.params)


def compare_layer(spec: ConvSpec, backend: Backend, *, repeats: int = 5, db: str | Path | None = None,
                  session: Session | None = None) -> list[Measurement]:
    """Every algorithm that supports the layer, with the plan the databases give it (tuned params
    for this layer and device if any, else its heuristic), measured in one run on the same data."""
    from autoconv.serve.api import backend_for

    session = session or default_session()
    operands = random_operands(spec)
    reference = reference_output(spec, operands)
    rows = []
    for name in list_algorithms():
        algorithm = get_algorithm(name)
        if algorithm.supports(spec, backend.device) is not None:
            continue
        try:
            plan = session.lookup(spec, backend, db, algorithm=name)
            runner = backend_for(plan, backend, session)
        except AutoconvError:
            continue  # neither this backend nor the host runs it
        on_host = runner is not backend
        title = f"im2col + {'numpy' if on_host else runner.name} BLAS" if algorithm.library_gemm else algorithm.title
        rows.append(measure(title, runner, spec, plan, operands, reference,
                            scratch_bytes=extra_memory(spec, plan, on_host), repeats=repeats))
    return rows
