"""Measure one layer every way autoconv knows on the user's device: each registered algorithm
that supports it (direct loops, im2col + library BLAS, im2col + generated GEMM, implicit GEMM,
Winograd), with its time, GFLOP/s, extra memory and error against the float64 reference. This is the answer
to "why is im2col faster, and what beats it", with numbers: per layer as records (what the CLI
prints as tables, JSON or CSV), rolled up over layers, and explained in words for one layer."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoconv.algorithms import BASELINE, DIRECT, get_algorithm, list_algorithms
from autoconv.backends.base import Backend, PreparedConv
from autoconv.backends.reorder import reorders_ms
from autoconv.backends.runtime import DeviceBackend, is_device_backend
from autoconv.errors import AutoconvError
from autoconv.layouts import BLOCKS, NCHW, to_layout, to_nchw
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
    layout: str = NCHW  # the layout it computed in (a blocked one: reorders from and to NCHW counted)
    reorder_ms: float = 0.0  # of median_ms, the reorders'

    @property
    def variant(self) -> str:
        """The algorithm, and its layout where it is not NCHW: how tables name the row."""
        return self.algorithm if self.layout == NCHW else f"{self.algorithm} ({self.layout})"

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
    if spec.layout == NCHW and is_device_backend(backend) and backend.layout_arrays:
        rows += _blocked_layouts(spec, backend, operands, reference, repeats, db, session)
    return rows


def _blocked_layouts(spec: ConvSpec, backend: DeviceBackend, operands: tuple, reference: Any, repeats: int,
                     db: str | Path | None, session: Session) -> list[Measurement]:
    """The layer computed in each channel-blocked layout an algorithm runs it in, for an NCHW caller:
    the time counts the reorders of its input and output (what a layer between NCHW tensors pays;
    inside a blocked chain there are none)."""
    rows = []
    x, weight, bias, residual = (*operands, None)[:4]
    for block in BLOCKS:
        blocked = spec.replace(layout=f"NCHW{block}c")
        for name in list_algorithms():
            algorithm = get_algorithm(name)
            if not algorithm.device_kernels or algorithm.supports(blocked, backend.device) is not None:
                continue
            try:
                plan = session.lookup(blocked, backend, db, algorithm=name)
                conv = backend.prepare(blocked, plan)
            except AutoconvError:
                continue
            moved = (to_layout(x, blocked.layout), weight, bias,
                     *(() if residual is None else (to_layout(residual, blocked.layout),)))
            error = relative_error(to_nchw(conv.run(*moved, poison=True), blocked.layout, spec.k), reference)
            conv_ms = conv.time(*moved, warmup=1, repeats=repeats).median_ms
            reorder = reorders_ms(backend, spec.input_shape, spec.output_shape, blocked.layout, repeats)
            total = conv_ms + reorder
            rows.append(Measurement(f"{algorithm.title} in {blocked.layout}, + reorders", backend.device.name,
                                    plan.describe(), total, spec.flops / (total * 1e6), algorithm.scratch_bytes(blocked, plan.params),
                                    error, name, algorithm.traffic_bytes(blocked, plan.params), blocked.layout, reorder))
    return rows


def layer_records(label: str, spec: ConvSpec, backend: Backend, repeats: int,
                  db: str | Path | None) -> tuple[list[dict[str, Any]], Plan]:
    """compare_layer's measurements of one layer as records, and the plan autoconv serves it."""
    from autoconv.serve.api import choose_plan

    rows = compare_layer(spec, backend, repeats=repeats, db=db)
    served = choose_plan(spec, backend, db)
    direct_ms = next((row.median_ms for row in rows if row.algorithm == DIRECT), None)
    records = [{"layer": label, "shape": str(spec), "method": row.method, "algorithm": row.variant,
                "layout": row.layout, "reorder_ms": row.reorder_ms,
                "plan": row.plan, "ms": row.median_ms, "gflops": row.gflops,
                "vs_direct": direct_ms / row.median_ms if direct_ms else None,
                "extra_mib": row.scratch_bytes / 2**20, "extra_vs_input": row.scratch_bytes / spec.input_bytes,
                "rel_error": row.rel_error, "verified": row.verified, "served": row.algorithm == served.algorithm and row.layout == spec.layout,
                "traffic_bytes": row.traffic_bytes, "intensity": spec.flops / row.traffic_bytes if row.traffic_bytes else None}
               for row in rows]
    return records, served


def _geomean(values: list[float]) -> float | None:
    return statistics.geometric_mean(values) if values else None


def rollup(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per algorithm over the layers: how many it ran, total ms, geomean speed-ups, times served."""
    by_layer: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_layer.setdefault(r["layer"], {})[r["algorithm"]] = r
    rollup = []
    for name in dict.fromkeys(r["algorithm"] for r in records):
        mine = [layer[name] for layer in by_layer.values() if name in layer]
        vs_direct = [layer[DIRECT]["ms"] / layer[name]["ms"] for layer in by_layer.values()
                     if name in layer and DIRECT in layer]
        vs_baseline = [layer[BASELINE]["ms"] / layer[name]["ms"] for layer in by_layer.values()
                       if name in layer and BASELINE in layer]
        rollup.append({"algorithm": name, "layers": len(mine), "total_ms": sum(r["ms"] for r in mine),
                       "geomean_vs_direct": _geomean(vs_direct), "geomean_vs_baseline": _geomean(vs_baseline),
                       "served_on": sum(1 for r in mine if r["served"])})
    return rollup


def explanation(label: str, spec: ConvSpec, records: list[dict[str, Any]], served: Plan, roofs: Any,
                tuned: list[Any], tune_command: str) -> list[str]:
    """The explain text: what the layer costs, what each method moves and reaches, what is served and why."""
    lines = [f"{label}: {spec}",
             f"  work: {spec.flops / 1e9:.3f} GFLOP (direct-convolution count); input {spec.input_bytes / 2**20:.2f} MiB, "
             f"weights {spec.weight_bytes / 2**20:.2f} MiB, output {spec.output_bytes / 2**20:.2f} MiB",
             f"  device limits (measured): {roofs.peak_gflops:.0f} GFLOP/s GEMM peak, {roofs.bandwidth_gbs:.1f} GB/s copy "
             f"bandwidth; a kernel needs at least {roofs.ridge:.1f} FLOP/byte to be compute-bound", ""]
    lines.append("  method                          ms   GFLOP/s  bytes moved  FLOP/byte  roof GFLOP/s  % of roof")
    for r in sorted(records, key=lambda r: r["ms"]):
        bound = roofs.bound(r["intensity"])
        lines.append(f"  {r['algorithm']:<26} {r['ms']:>9.3f} {r['gflops']:>9.1f} {r['traffic_bytes'] / 2**20:>8.1f} MiB "
                     f"{r['intensity']:>10.1f} {bound:>13.0f} {100 * r['gflops'] / bound:>9.0f}%")
    by_name = {r["algorithm"]: r for r in records}
    fastest = min(records, key=lambda r: r["ms"])
    lines.append("")
    if DIRECT in by_name and fastest["algorithm"] != DIRECT:
        d = by_name[DIRECT]
        lines.append(f"  Direct loops re-read every input pixel and weight for each output: {d['traffic_bytes'] / 2**20:.0f} MiB "
                     f"at {d['intensity']:.1f} FLOP/byte, so memory caps them at {roofs.bound(d['intensity']):.0f} GFLOP/s; "
                     f"{fastest['algorithm']} moves {fastest['traffic_bytes'] / 2**20:.1f} MiB "
                     f"({fastest['intensity']:.0f} FLOP/byte) and ran {d['ms'] / fastest['ms']:.1f}x faster.")
    gemm = by_name.get("im2col_gemm")
    if gemm is not None and gemm["extra_mib"]:
        lines.append(f"  im2col's price: a {gemm['extra_mib']:.1f} MiB buffer ({gemm['extra_vs_input']:.1f}x the input) "
                     "written, then read by the GEMM.")
    plan_line = f"  served: {served.describe()}"
    if served.source == "tuned":
        mine = sorted(tuned, key=lambda r: r.median_ms)
        why = f"the fastest of the {len(mine)} algorithms `autoconv tune` measured for this layer on this device"
        if len(mine) > 1:
            why += (f" ({mine[0].median_ms:.3f} ms vs {mine[1].algorithm} {mine[1].median_ms:.3f} ms in the database; "
                    "the times above are this run's)")
        lines += [plan_line, f"  why: {why}."]
    elif tuned:
        lines += [plan_line, f"  why: its tuning here is incomplete (only {', '.join(sorted({r.algorithm for r in tuned}))} "
                  f"measured, no tunable or library algorithm), so a fallback ({served.source}); "
                  f"`{tune_command}` measures every algorithm here."]
    else:
        lines += [plan_line, f"  why: not tuned on this device, so a fallback ({served.source}); "
                  f"`{tune_command}` measures every algorithm here."]
    return lines
