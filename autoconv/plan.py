"""Plan: which algorithm (and which kernel params) runs a ConvSpec on a device, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from autoconv.params import GemmParams, default_gemm_params
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


def heuristic_gemm_params(spec: ConvSpec, device_type: str) -> GemmParams:
    """A sensible untuned config for a device class, the M tile shrunk for few filters per group.

    CPUs: no local-memory staging (caches do it, and PoCL vectorises barrier-free kernels best) and
    16-wide accumulator vectors; measured in benchmarks/pocl-cpu.md. GPUs: classic staged tiles.
    """
    if device_type == "gpu":
        base = dict(MWG=64, NWG=64, KWG=16, WPTM=4, WPTN=4, VWN=1, SA=1, SB=1)
    else:
        base = dict(MWG=32, NWG=64, KWG=16, WPTM=8, WPTN=16, VWN=16, SA=0, SB=0)
    m = spec.gemm_m
    for tile in (8, 16):
        if m <= tile < base["MWG"]:
            base.update(MWG=tile, WPTM=min(base["WPTM"], tile))
            break
    return default_gemm_params(**base)


def heuristic_plan(spec: ConvSpec, device_type: str) -> Plan:
    """The built-in last resort of every lookup: im2col + generated GEMM with heuristic params."""
    return Plan(ALGORITHM_IM2COL_GEMM, heuristic_gemm_params(spec, device_type), "heuristic")
