"""Kernel parameters: each tunable declared once with its default, meaning, search space and the
named constraints it must satisfy. A config is data: only validated ints ever reach a template."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Mapping

from autoconv.errors import InvalidParamsError


@dataclass(frozen=True)
class ParamDecl:
    """One tunable: its name, default, one-line meaning and the values the tuner may pick."""

    name: str
    default: int
    meaning: str
    choices: tuple[int, ...]


@dataclass(frozen=True)
class DeviceLimits:
    """What a device allows a kernel; constraints are checked against these before compiling."""

    max_work_group_size: int
    max_work_item_sizes: tuple[int, ...]
    local_mem_bytes: int
    max_vector_width: int = 16  # widest floatN the kernel language offers; CUDA C++ has no float ops on float4


GEMM_PARAMS: tuple[ParamDecl, ...] = (
    ParamDecl("MWG", 64, "tile size in M (filters) computed by one work-group", (8, 16, 32, 64, 128)),
    ParamDecl("NWG", 64, "tile size in N (output pixels) computed by one work-group", (16, 32, 64, 128)),
    ParamDecl("KWG", 16, "tile depth in K (receptive field) staged in local memory per step", (4, 8, 16, 32)),
    ParamDecl("WPTM", 4, "work per work-item in M: accumulator rows held in registers", (1, 2, 4, 8)),
    ParamDecl("WPTN", 4, "work per work-item in N: accumulator columns held in registers", (1, 2, 4, 8, 16)),
    ParamDecl("VWN", 1, "SIMD width of the accumulators along N inside a work-item (1 = scalar)", (1, 2, 4, 8, 16)),
    ParamDecl("VW", 4, "vector width of the global-to-local tile copies (1 = scalar)", (1, 2, 4, 8)),
    ParamDecl("PADA", 0, "extra floats per local row of the A tile, against bank conflicts", (0, 1, 2)),
    ParamDecl("PADB", 0, "extra floats per local row of the B tile, against bank conflicts", (0, 1, 2)),
    ParamDecl("UNROLL", 4, "unroll factor of the inner K loop over the local tile", (1, 2, 4, 8)),
    ParamDecl("SA", 1, "stage A (weights) tiles in local memory (0 = read global, cached)", (0, 1)),
    ParamDecl("SB", 1, "stage B (im2col) tiles in local memory (0 = read global, cached)", (0, 1)),
    ParamDecl("B_TRANSPOSED", 0, "im2col layout: 0 = KxN (pixels contiguous), 1 = NxK (patch contiguous)", (0, 1)),
    ParamDecl("IM2COL_ROWS", 0, "im2col work per item: 0 = one element (GPUs), 1 = a contiguous run (CPUs)", (0, 1)),
)

PARAM_BOUNDS = (0, 1024)  # every value is an int in this range whatever a DB row says

# Beyond this many accumulators per work-item the registers spill on every device we target.
MAX_ACCUMULATORS = 128

GemmConstraint = Callable[["GemmParams", DeviceLimits], bool]

GEMM_CONSTRAINTS: tuple[tuple[str, str, GemmConstraint], ...] = (
    ("m_tile_divisible", "MWG must be a multiple of WPTM", lambda p, d: p.MWG % p.WPTM == 0),
    ("n_tile_divisible", "NWG must be a multiple of WPTN", lambda p, d: p.NWG % p.WPTN == 0),
    ("vector_divides_k_tile", "KWG must be a multiple of VW", lambda p, d: p.KWG % p.VW == 0),
    ("vector_divides_n_tile", "NWG must be a multiple of VW", lambda p, d: p.NWG % p.VW == 0),
    ("vector_divides_n_work", "WPTN must be a multiple of VWN", lambda p, d: p.WPTN % p.VWN == 0),
    ("device_vector_width", "VWN must not exceed the dialect's vector width (1 for CUDA)",
     lambda p, d: p.VWN <= d.max_vector_width),
    ("unroll_divides_k_tile", "KWG must be a multiple of UNROLL", lambda p, d: p.KWG % p.UNROLL == 0),
    ("registers", f"WPTM*WPTN must be at most {MAX_ACCUMULATORS}",
     lambda p, d: p.WPTM * p.WPTN <= MAX_ACCUMULATORS),
    ("work_group_size", "work-group (NWG/WPTN)*(MWG/WPTM) must fit the device's max work-group size",
     lambda p, d: p.work_group_size <= d.max_work_group_size),
    ("work_item_sizes", "work-group dimensions must fit the device's max work-item sizes",
     lambda p, d: p.local_size[0] <= d.max_work_item_sizes[0] and p.local_size[1] <= d.max_work_item_sizes[1]),
    ("local_memory", "the A and B tiles must fit the device's local memory",
     lambda p, d: p.local_mem_bytes <= d.local_mem_bytes),
)


@dataclass(frozen=True)
class GemmParams:
    """The tiled-GEMM template's parameters, one field per GEMM_PARAMS entry.

    Build it with default_gemm_params(...) or, for untrusted data, validate_gemm_params(...).
    """

    MWG: int
    NWG: int
    KWG: int
    WPTM: int
    WPTN: int
    VWN: int
    VW: int
    PADA: int
    PADB: int
    UNROLL: int
    SA: int
    SB: int
    B_TRANSPOSED: int
    IM2COL_ROWS: int

    @property
    def local_size(self) -> tuple[int, int]:
        """Work-group shape as launched: (N direction, M direction); N first so that neighbouring
        work-items touch neighbouring output pixels (coalesced on GPUs, vectorised on CPUs)."""
        return (self.NWG // self.WPTN, self.MWG // self.WPTM)

    @property
    def work_group_size(self) -> int:
        return self.local_size[0] * self.local_size[1]

    @property
    def local_mem_bytes(self) -> int:
        a_tile = self.MWG * (self.KWG + self.PADA) if self.SA else 0
        if not self.SB:
            b_tile = 0
        elif self.B_TRANSPOSED:
            b_tile = self.NWG * (self.KWG + self.PADB)
        else:
            b_tile = self.KWG * (self.NWG + self.PADB)
        return 4 * (a_tile + b_tile)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def violations(self, limits: DeviceLimits) -> list[str]:
        """Names and meanings of every constraint this config breaks on a device (empty: valid)."""
        return [f"{name}: {meaning}" for name, meaning, holds in GEMM_CONSTRAINTS if not holds(self, limits)]


def validate_gemm_params(raw: Mapping[str, Any]) -> GemmParams:
    """Turn untrusted data (a DB row, a CLI string) into GemmParams, or raise InvalidParamsError.

    Unknown names, non-integers and values outside a parameter's choices are refused, so nothing
    but small known integers can reach a template.
    """
    declared = {decl.name: decl for decl in GEMM_PARAMS}
    unknown = sorted(set(raw) - set(declared))
    if unknown:
        raise InvalidParamsError(f"unknown GEMM parameter(s) {unknown}; known: {sorted(declared)}")
    values: dict[str, int] = {}
    for name, decl in declared.items():
        value = raw.get(name, decl.default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParamsError(f"{name}: expected an int, got {value!r}")
        if not PARAM_BOUNDS[0] <= value <= PARAM_BOUNDS[1] or value not in decl.choices:
            raise InvalidParamsError(f"{name}: {value} is not one of {decl.choices} ({decl.meaning})")
        values[name] = value
    return GemmParams(**values)


def default_gemm_params(**overrides: int) -> GemmParams:
    """The declared defaults, with some values replaced (validated like any other input)."""
    return validate_gemm_params(overrides)


def check_gemm_params(params: GemmParams, limits: DeviceLimits) -> None:
    """Raise InvalidParamsError naming every broken constraint; used before anything is compiled."""
    broken = params.violations(limits)
    if broken:
        raise InvalidParamsError(f"GEMM config {params.as_dict()} breaks: " + "; ".join(broken))


def gemm_space(limits: DeviceLimits) -> Iterator[GemmParams]:
    """Every config of the declared search space that satisfies all constraints on a device."""
    names = [decl.name for decl in GEMM_PARAMS]
    for combo in itertools.product(*(decl.choices for decl in GEMM_PARAMS)):
        params = GemmParams(**dict(zip(names, combo)))
        if not params.violations(limits):
            yield params


def random_valid_configs(limits: DeviceLimits, rng: random.Random) -> Iterator[GemmParams]:
    """An endless stream of configs drawn uniformly from the declared choices, keeping only those
    valid on the device (the space is too large to list: millions of configs)."""
    names = [decl.name for decl in GEMM_PARAMS]
    while True:
        params = GemmParams(**{name: rng.choice(decl.choices) for name, decl in zip(names, GEMM_PARAMS)})
        if not params.violations(limits):
            yield params


def gemm_param_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(GemmParams))
