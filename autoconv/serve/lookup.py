"""Which plan runs a ConvSpec on a device, given what the tuning databases hold: pure policy, no
I/O and no backend (the Session reads the databases and caches the answers).

In order: the layer tuned on this device (its fastest verified algorithm) → the same convolution
tuned with another epilogue (bias, residual, activation, or none: they cost little beside the
convolution) →
the nearest tuned shape of the same family on this device (its winner, if that algorithm supports the requested
shape) → the device's tuned winner of the same kind of layer with the lowest estimated time here
(its measured time scaled by its algorithm's cost estimate) → the same on devices of the same
backend, vendor and type → the built-in heuristic. Never fails for a valid spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from autoconv.algorithms import BLOCKED_DIRECT, DEPTHWISE_DIRECT, IM2COL_GEMM, WINOGRAD, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import AutoconvError
from autoconv.plan import Plan
from autoconv.spec import ACTIVATIONS, ConvSpec, grouping_kind, same_family, shape_distance
from autoconv.store import TunedResult, fastest

# What the lookup serves where nothing is tuned and nothing better is known for the device
# (heuristic_algorithm): the generated im2col + GEMM, heuristic params.
DEFAULT_ALGORITHM = IM2COL_GEMM
# On a CPU device, untuned 3x3 stride-1 layers with at least this many input channels per group run
# Winograd (heuristic_algorithm).
CPU_WINOGRAD_CHANNELS = 256


class UnsupportedAlgorithmError(AutoconvError, ValueError):
    """A forced algorithm cannot compute this layer (the message says why)."""


@dataclass(frozen=True)
class DatabaseContents:
    """The current-template verified results of one database and its device rows by fingerprint."""

    results: tuple[TunedResult, ...] = ()
    devices: dict[str, dict] = field(default_factory=dict)


def epilogue_variants(spec: ConvSpec) -> tuple[str, ...]:
    """The layer keys of every epilogue of the spec's convolution (with or without bias, residual,
    each activation): the rows an indexed read fetches for the first two steps of the lookup."""
    return tuple(sorted({spec.replace(bias=bias, activation=activation, residual=residual).key()
                         for bias in (False, True) for activation in ACTIVATIONS for residual in (False, True)}))


def _allowed(spec: ConvSpec, info: DeviceInfo, generated_only: bool, algorithm: str | None) -> Callable[[TunedResult], bool]:
    limits = info.limits()

    def allowed(result: TunedResult) -> bool:
        chosen = get_algorithm(result.algorithm) if _registered(result.algorithm) else None
        return (chosen is not None and (algorithm is None or result.algorithm == algorithm)
                and (not generated_only or chosen.device_kernels)
                and chosen.supports(spec, info) is None and not result.params.violations(limits, spec))
    return allowed


def _check_forced(spec: ConvSpec, info: DeviceInfo, algorithm: str | None) -> None:
    if algorithm is not None:
        reason = get_algorithm(algorithm).supports(spec, info)
        if reason is not None:
            raise UnsupportedAlgorithmError(f"algorithm: {algorithm} does not support {spec}: {reason}")


def measured_against_alternatives(result: TunedResult) -> bool:
    """Whether a result's algorithm is one a layer's tuning measures to find the fastest: a tunable
    one or the library baseline, not the reference loops (direct), which nobody tunes."""
    if not _registered(result.algorithm):
        return False
    chosen = get_algorithm(result.algorithm)
    return bool(chosen.space.params) or chosen.library_gemm


def trusted(results: list[TunedResult], forced: bool = False) -> list[TunedResult]:
    """A layer's stored results, when they can stand for its tuning: at least one tunable or library
    algorithm among them. Direct loops stored alone (a tuning cut short, the baseline dropped as
    unsteady) are not served over the fallbacks. With a `forced` algorithm its own rows are what
    was asked for: all are kept."""
    return results if forced or any(measured_against_alternatives(r) for r in results) else []


def is_peer(row: dict, info: DeviceInfo) -> bool:
    """Whether a devices row is of the same backend, vendor and type as `info` (whose winners the
    vendor default counts)."""
    return (row.get("backend") == info.backend and row.get("vendor") == info.vendor
            and row.get("device_type") == info.device_type)


def tuned_plan(spec: ConvSpec, info: DeviceInfo, results: Iterable[TunedResult], *, generated_only: bool = False,
               algorithm: str | None = None) -> Plan | None:
    """The first two steps alone: this layer tuned on this device, else its convolution tuned with
    another epilogue; None when neither is among `results` (which may hold other rows too)."""
    _check_forced(spec, info, algorithm)
    allowed = _allowed(spec, info, generated_only, algorithm)
    fingerprint = info.fingerprint()
    mine = [r for r in results if r.device == fingerprint and allowed(r)]
    forced = algorithm is not None
    exact = fastest(trusted([r for r in mine if r.spec == spec], forced))
    if exact is not None:
        return Plan(exact.algorithm, exact.params, "tuned")
    plain = spec.convolution()
    same_convolution = fastest(trusted([r for r in mine if r.spec.convolution() == plain], forced))
    if same_convolution is not None:
        return Plan(same_convolution.algorithm, same_convolution.params,
                    f"tuned for {same_convolution.spec} (the same convolution, another epilogue)")
    return None


def resolve(spec: ConvSpec, info: DeviceInfo, dbs: Sequence[DatabaseContents], *,
            generated_only: bool = False, algorithm: str | None = None) -> Plan:
    """The plan for a spec on a device. generated_only: only algorithms with device kernels (what
    export writes); algorithm: that algorithm only (its tuned params, else its heuristic)."""
    tuned = tuned_plan(spec, info, (r for contents in dbs for r in contents.results), generated_only=generated_only,
                       algorithm=algorithm)
    if tuned is not None:
        return tuned
    allowed = _allowed(spec, info, generated_only, algorithm)
    fingerprint = info.fingerprint()
    mine = [r for contents in dbs for r in contents.results if r.device == fingerprint and allowed(r)]
    winners = _winners(mine, algorithm is not None)
    similar = [r for r in winners if same_family(r.spec, spec)]
    if similar:
        nearest = min(similar, key=lambda r: (shape_distance(r.spec, spec), r.spec.key()))
        return Plan(nearest.algorithm, nearest.params, f"nearest tuned shape {nearest.spec}")

    kind = grouping_kind(spec)
    winner = _lowest_estimate(_kindred(winners, spec), spec)
    if winner is not None:
        return Plan(winner.algorithm, winner.params,
                    f"device default for {kind} layers: the lowest estimated time, the winner on {winner.spec}")

    peers = {fp for contents in dbs for fp, row in contents.devices.items() if fp != fingerprint and is_peer(row, info)}
    vendor = [r for contents in dbs for r in contents.results if r.device in peers and allowed(r)]
    winner = _lowest_estimate(_kindred(_winners(vendor, algorithm is not None), spec), spec)
    if winner is not None:
        return Plan(winner.algorithm, winner.params,
                    f"vendor default for {kind} layers ({info.vendor} {info.device_type}): the winner on {winner.spec}")
    chosen = algorithm or heuristic_algorithm(spec, info)
    return Plan(chosen, get_algorithm(chosen).heuristic(spec, info), "heuristic")


def runs_in_layout(spec: ConvSpec, info: DeviceInfo, algorithms: Iterable[str]) -> bool:
    """Whether one of `algorithms` runs the layer in its spec's layout (a layer none runs there is
    computed in NCHW between two reorders)."""
    return any(get_algorithm(name).supports(spec, info) is None for name in algorithms)


def fills_blocks(spec: ConvSpec) -> bool:
    """Whether a layer asked for in a channel-blocked layout is computed in it: not where its input
    has at most half a block of channels (a network's first layer, 3 colour channels), whose blocked
    input would be mostly zero padding, read tap by tap. Such a layer reads NCHW and its result is
    reordered: ResNet-50's 7x7 layer on PoCL AVX-512 took 0.90 ms in NCHW against 1.15 ms in
    NCHW16c (a one-off sweep), before the reorders of its input that the blocked layout also needs."""
    return spec.layout == "NCHW" or spec.c * 2 > spec.block


def computed_spec(spec: ConvSpec, info: DeviceInfo, algorithms: Iterable[str]) -> ConvSpec:
    """The layer as it is computed when its result is wanted in spec.layout: in that layout where
    an algorithm runs it there and its input fills the blocks (fills_blocks), else in NCHW between
    reorders."""
    if fills_blocks(spec) and runs_in_layout(spec, info, algorithms):
        return spec
    return spec.replace(layout="NCHW")


def heuristic_algorithm(spec: ConvSpec, info: DeviceInfo) -> str:
    """What an untuned layer is served. On a CPU device: Winograd on 3x3 stride-1 layers of at least
    CPU_WINOGRAD_CHANNELS input channels per group, the register-blocked direct convolution on the
    other layers it runs, the depthwise direct convolution on depthwise layers, im2col + GEMM on the
    rest. Measured untuned on PoCL AVX-512 (benchmarks/fallback-pocl.md): every served plan 1.7-7.1x
    faster than im2col + GEMM, and Winograd 1.0-1.5x faster than the direct convolution on the wide
    3x3 layers it serves (on 128 channels the direct one was faster, in a one-off compare). On other
    devices the generated im2col + GEMM, or for a channel-blocked layout (which it does not read)
    the blocked or the depthwise direct convolution. UnsupportedAlgorithmError when none runs the
    layer (a caller that can reorder runs it in NCHW instead)."""
    if info.device_type == "cpu":
        wide = spec.c_per_group >= CPU_WINOGRAD_CHANNELS
        order: tuple[str, ...] = ((WINOGRAD,) if wide else ()) + (BLOCKED_DIRECT, DEPTHWISE_DIRECT, DEFAULT_ALGORITHM)
    else:
        order = (DEFAULT_ALGORITHM, BLOCKED_DIRECT, DEPTHWISE_DIRECT)
    for name in order:
        if get_algorithm(name).supports(spec, info) is None:
            return name
    raise UnsupportedAlgorithmError(f"layout: no algorithm runs {spec} in {spec.layout}: "
                                    + "; ".join(f"{name}: {get_algorithm(name).supports(spec, info)}"
                                                for name in (BLOCKED_DIRECT, DEPTHWISE_DIRECT)))


def _kindred(winners: list[TunedResult], spec: ConvSpec) -> list[TunedResult]:
    """The winners worth counting for a layer no tuned shape of its family is near: those of its
    kernel size and kind of grouping, else of its kind of grouping; never of another kind (a
    depthwise layer's best method is not a dense one's)."""
    kind = grouping_kind(spec)
    same_kind = [r for r in winners if grouping_kind(r.spec) == kind]
    same_kernel = [r for r in same_kind if (r.spec.r, r.spec.s) == (spec.r, spec.s)]
    return same_kernel or same_kind


def _registered(name: str) -> bool:
    try:
        get_algorithm(name)
    except AutoconvError:
        return False
    return True


def _winners(results: Iterable[TunedResult], forced: bool = False) -> list[TunedResult]:
    """The fastest result of each (device, layer) whose results can be trusted (all, for a forced
    algorithm)."""
    by_layer: dict[tuple[str, ConvSpec], list[TunedResult]] = {}
    for r in results:
        by_layer.setdefault((r.device, r.spec), []).append(r)
    return [best for group in by_layer.values() if (best := fastest(trusted(group, forced))) is not None]


def estimated_ms(result: TunedResult, spec: ConvSpec) -> float:
    """A result's measured time carried over to another layer by its algorithm's own cost estimate
    (the ratio of the two layers' estimated costs with the result's params)."""
    cost = get_algorithm(result.algorithm).estimated_cost
    return result.median_ms * cost(spec, result.params) / max(cost(result.spec, result.params), 1e-30)


def _lowest_estimate(winners: Iterable[TunedResult], spec: ConvSpec) -> TunedResult | None:
    """The winner whose time, carried over to `spec`, is the lowest: not the most frequent one, which
    a run of similar layers would make the answer for every other shape."""
    # Ties broken by the text of algorithm, params and layer so the answer does not depend on row order.
    return min(winners, key=lambda r: (estimated_ms(r, spec), r.algorithm, r.params.describe(), r.spec.key()),
               default=None)
