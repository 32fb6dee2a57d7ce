"""Plan: which algorithm (and which kernel params) runs a ConvSpec on a device, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from autoconv.errors import InvalidParamsError
from autoconv.params import MAX_ACCUMULATORS, DeviceLimits, GemmParams, default_gemm_params
from autoconv.render import ALGORITHM_IM2COL_GEMM
from autoconv.spec import ConvSpec


@dataclass(frozen=True)
class Plan:
    """An algorithm name, its GEMM params when it has any, and the provenance of the choice."""

    algorithm: str
    gemm: GemmParams | None = None
    source: str = "heuristic"

    def describe(self) -> str:
        if self.gemm is None:
            return f"{self.algorithm} ({self.source})"
        params = " ".join(f"{k}={v}" for k, v in self.gemm.as_dict().items())
        return f"{self.algorithm} [{params}] ({self.source})"


def heuristic_gemm_params(spec: ConvSpec, device_type: str, limits: DeviceLimits | None = None) -> GemmParams:
    """A sensible untuned config for a device class, the M tile shrunk for few filters per group,
    then made to fit the device's limits when they are given.

    CPUs: no local-memory staging (caches do it, and PoCL vectorises barrier-free kernels best) and
    16-wide accumulator vectors; measured in benchmarks/pocl-cpu.md. GPUs: classic staged tiles.
    """
    if device_type == "gpu":
        base = dict(MWG=64, NWG=64, KWG=16, WPTM=4, WPTN=4, VWN=1, SA=1, SB=1)
    else:
        base = dict(MWG=32, NWG=64, KWG=16, WPTM=8, WPTN=16, VWN=16, SA=0, SB=0, IM2COL_ROWS=1)
    m = spec.gemm_m
    for tile in (8, 16):
        if m <= tile < base["MWG"]:
            base.update(MWG=tile, WPTM=min(base["WPTM"], tile))
            break
    params = default_gemm_params(**base)
    return params if limits is None else fit_to_device(params, limits)


def fit_to_device(params: GemmParams, limits: DeviceLimits) -> GemmParams:
    """The nearest config that the device accepts: narrower vectors, more work per item (fewer
    work-items), then smaller tiles, until no constraint is broken."""
    steps = (
        lambda p: {"VWN": p.VWN // 2} if p.VWN > limits.max_vector_width else None,
        lambda p: {"WPTN": p.WPTN * 2} if p.work_group_size > limits.max_work_group_size and p.WPTN * 2 <= min(p.NWG, 16)
        and p.WPTM * p.WPTN * 2 <= MAX_ACCUMULATORS else None,
        lambda p: {"WPTM": p.WPTM * 2} if p.work_group_size > limits.max_work_group_size and p.WPTM * 2 <= min(p.MWG, 8)
        and p.WPTM * p.WPTN * 2 <= MAX_ACCUMULATORS else None,
        lambda p: {"NWG": p.NWG // 2} if p.NWG // 2 >= max(16, p.WPTN) else None,
        lambda p: {"MWG": p.MWG // 2} if p.MWG // 2 >= max(8, p.WPTM) else None,
        lambda p: {"KWG": p.KWG // 2, "UNROLL": min(p.UNROLL, p.KWG // 2), "VW": min(p.VW, p.KWG // 2)}
        if p.KWG // 2 >= 4 else None,
    )
    while params.violations(limits):
        for step in steps:
            change = step(params)
            if change is not None:
                params = default_gemm_params(**{**params.as_dict(), **change})
                break
        else:
            raise InvalidParamsError(f"no GEMM config fits this device: {params.violations(limits)}")
    return params


def heuristic_plan(spec: ConvSpec, device_type: str, limits: DeviceLimits | None = None) -> Plan:
    """The built-in last resort of every lookup: im2col + generated GEMM with heuristic params."""
    return Plan(ALGORITHM_IM2COL_GEMM, heuristic_gemm_params(spec, device_type, limits), "heuristic")
