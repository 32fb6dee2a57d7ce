"""What the two tiled-GEMM algorithms share: the GEMM template's tunables and named constraints
(CLBlast's xgemm parameters, plus SA/SB staging and VWN accumulator vectors), the launch
geometry, the heuristic config fitted to a device, and rendering of templates/shared/gemm.j2.

im2col_gemm feeds the GEMM from an im2col buffer; implicit_gemm computes B from the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from autoconv import epilogue
from autoconv.algorithms.base import Constraint, ParamDecl, Params, ParamSpace
from autoconv.device import DeviceInfo, DeviceLimits
from autoconv.errors import InvalidParamsError
from autoconv.render import Dialect, KernelArg, KernelSource, ceil_to, int_args, render_template
from autoconv.spec import ConvSpec

# Beyond this many accumulators per work-item the registers spill on every device we target.
MAX_ACCUMULATORS = 128


def _staged(values: Mapping[str, int]) -> bool:
    return bool(values.get("SA") or values.get("SB"))


GEMM_TILE_PARAMS: tuple[ParamDecl, ...] = (
    ParamDecl("MWG", 64, "tile size in M (filters) computed by one work-group", (8, 16, 32, 64, 128)),
    ParamDecl("NWG", 64, "tile size in N (output pixels) computed by one work-group", (16, 32, 64, 128)),
    ParamDecl("KWG", 16, "tile depth in K (receptive field) staged in local memory per step", (4, 8, 16, 32)),
    ParamDecl("WPTM", 4, "work per work-item in M: accumulator rows held in registers", (1, 2, 4, 8)),
    ParamDecl("WPTN", 4, "work per work-item in N: accumulator columns held in registers", (1, 2, 4, 8, 16)),
    ParamDecl("VWN", 1, "SIMD width of the accumulators along N inside a work-item (1 = scalar)", (1, 2, 4, 8, 16),
              device_limit=lambda limits: limits.max_vector_width),
    ParamDecl("UNROLL", 4, "unroll factor of the inner K loop over the local tile", (1, 2, 4, 8)),
    ParamDecl("SA", 1, "stage A (weights) tiles in local memory (0 = read global, cached)", (0, 1)),
    ParamDecl("SB", 1, "stage B (patch matrix) tiles in local memory (0 = read global, cached)", (0, 1)),
)

# Only matter when a tile is staged: sampled after SA/SB, at their defaults otherwise.
GEMM_STAGING_PARAMS: tuple[ParamDecl, ...] = (
    ParamDecl("VW", 4, "vector width of the global-to-local tile copies (1 = scalar)", (1, 2, 4, 8),
              active_when=_staged),
    ParamDecl("PADA", 0, "extra floats per local row of the A tile, against bank conflicts", (0, 1, 2),
              active_when=lambda v: bool(v.get("SA"))),
    ParamDecl("PADB", 0, "extra floats per local row of the B tile, against bank conflicts", (0, 1, 2),
              active_when=lambda v: bool(v.get("SB"))),
)


def local_size(p: Params) -> tuple[int, int]:
    """Work-group shape as launched: (N direction, M direction); N first so that neighbouring
    work-items touch neighbouring output pixels (coalesced on GPUs, vectorised on CPUs)."""
    return (p.NWG // p.WPTN, p.MWG // p.WPTM)


def work_group_size(p: Params) -> int:
    n, m = local_size(p)
    return n * m


def local_mem_bytes(p: Params) -> int:
    a_tile = p.MWG * (p.KWG + p.PADA) if p.SA else 0
    if not p.SB:
        b_tile = 0
    elif p.get("B_TRANSPOSED", 0):
        b_tile = p.NWG * (p.KWG + p.PADB)
    else:
        b_tile = p.KWG * (p.NWG + p.PADB)
    return 4 * (a_tile + b_tile)


GEMM_CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("m_tile_divisible", "MWG must be a multiple of WPTM", lambda p, d: p.MWG % p.WPTM == 0),
    Constraint("n_tile_divisible", "NWG must be a multiple of WPTN", lambda p, d: p.NWG % p.WPTN == 0),
    Constraint("vector_divides_k_tile", "KWG must be a multiple of VW", lambda p, d: p.KWG % p.VW == 0),
    Constraint("vector_divides_n_tile", "NWG must be a multiple of VW", lambda p, d: p.NWG % p.VW == 0),
    Constraint("vector_divides_n_work", "WPTN must be a multiple of VWN", lambda p, d: p.WPTN % p.VWN == 0),
    Constraint("device_vector_width", "VWN must not exceed the dialect's vector width (1 for CUDA)",
               lambda p, d: p.VWN <= d.max_vector_width),
    Constraint("unroll_divides_k_tile", "KWG must be a multiple of UNROLL", lambda p, d: p.KWG % p.UNROLL == 0),
    Constraint("registers", f"WPTM*WPTN must be at most {MAX_ACCUMULATORS}",
               lambda p, d: p.WPTM * p.WPTN <= MAX_ACCUMULATORS),
    Constraint("work_group_size", "work-group (NWG/WPTN)*(MWG/WPTM) must fit the device's max work-group size",
               lambda p, d: work_group_size(p) <= d.max_work_group_size),
    Constraint("work_item_sizes", "work-group dimensions must fit the device's max work-item sizes",
               lambda p, d: local_size(p)[0] <= d.max_work_item_sizes[0]
               and local_size(p)[1] <= d.max_work_item_sizes[1]),
    Constraint("local_memory", "the A and B tiles must fit the device's local memory",
               lambda p, d: local_mem_bytes(p) <= d.local_mem_bytes),
)


def heuristic_base(spec: ConvSpec, device_type: str) -> dict[str, int]:
    """A sensible untuned GEMM config for a device class, the M tile shrunk for few filters.

    CPUs: no local-memory staging (caches do it, and PoCL vectorises barrier-free kernels best) and
    16-wide accumulator vectors. GPUs: classic staged tiles."""
    if device_type == "gpu":
        base = dict(MWG=64, NWG=64, KWG=16, WPTM=4, WPTN=4, VWN=1, SA=1, SB=1)
    else:
        base = dict(MWG=32, NWG=64, KWG=16, WPTM=8, WPTN=16, VWN=16, SA=0, SB=0)
    m = spec.gemm_m
    for tile in (8, 16):
        if m <= tile < base["MWG"]:
            base.update(MWG=tile, WPTM=min(base["WPTM"], tile))
            break
    return base


def fit_to_device(params: Params, limits: DeviceLimits) -> Params:
    """The nearest config that the device accepts: narrower vectors, more work per item (fewer
    work-items), then smaller tiles, until no constraint is broken."""
    steps: tuple[Callable[[Params], dict[str, int] | None], ...] = (
        lambda p: {"VWN": p.VWN // 2} if p.VWN > limits.max_vector_width else None,
        lambda p: {"WPTN": p.WPTN * 2} if work_group_size(p) > limits.max_work_group_size
        and p.WPTN * 2 <= min(p.NWG, 16) and p.WPTM * p.WPTN * 2 <= MAX_ACCUMULATORS else None,
        lambda p: {"WPTM": p.WPTM * 2} if work_group_size(p) > limits.max_work_group_size
        and p.WPTM * 2 <= min(p.MWG, 8) and p.WPTM * p.WPTN * 2 <= MAX_ACCUMULATORS else None,
        lambda p: {"NWG": p.NWG // 2} if p.NWG // 2 >= max(16, p.WPTN) else None,
        lambda p: {"MWG": p.MWG // 2} if p.MWG // 2 >= max(8, p.WPTM) else None,
        lambda p: {"KWG": p.KWG // 2, "UNROLL": min(p.UNROLL, p.KWG // 2), "VW": min(p.VW, p.KWG // 2)}
        if p.KWG // 2 >= 4 else None,
    )
    while params.violations(limits):
        for step in steps:
            change = step(params)
            if change is not None:
                params = params.replace(**change)
                break
        else:
            raise InvalidParamsError(f"no GEMM config fits this device: {params.violations(limits)}")
    return params


def heuristic(space: ParamSpace, spec: ConvSpec, device: DeviceInfo | None, **extra: int) -> Params:
    device_type = device.device_type if device is not None else "cpu"
    params = space.validate({**heuristic_base(spec, device_type), **extra})
    return params if device is None else fit_to_device(params, device.limits())


def padded_n(spec: ConvSpec, params: Params) -> int:
    """N rounded up to whole NWG tiles (the im2col matrix's row length, zeros past N)."""
    return ceil_to(spec.gemm_n, params.NWG)


@dataclass(frozen=True)
class BatchedGemm:
    """A GEMM that is not the layer's own: `batch` independent products out[b] (m x n) = A[b]
    (m x k, row-major) x B[b] (k x ldn, ldn = n rounded up to whole NWG tiles), without bias, each
    operand at a float offset into a scratch buffer (Winograd's products per transform point)."""

    m: int
    n: int
    k: int
    batch: int
    a_offset: int
    b_offset: int
    out_offset: int


def render_gemm(spec: ConvSpec, params: Params, dialect: Dialect, *, b_source: KernelArg,
                implicit: bool, rows: bool = False, geometry: dict[str, int] | None = None,
                columns: int | None = None, entry: str = "gemm_conv",
                batched: BatchedGemm | None = None) -> KernelSource:
    """The tiled GEMM for these (already validated) params, launched over every group; its B
    operand is an im2col buffer (b_source kind "scratch") or the input itself (implicit, in row or
    gather mode). `columns`: the GEMM's N when it is not the layer's (row mode's padded rows).
    `batched`: the same kernel over scratch operands instead of the layer's weight and output.

    Without padding every tap of every output pixel lies inside the input: no bounds checks."""
    columns = spec.gemm_n if columns is None else columns
    offsets = {}
    if batched is not None:
        offsets = {"A_OFFSET": batched.a_offset, "B_OFFSET": batched.b_offset, "OUT_OFFSET": batched.out_offset}
    text = render_template(
        "shared/gemm.j2", dialect=dialect, entry=entry, params=params.as_dict(), param_docs=params.space.params,
        implicit=implicit, rows=rows, geometry=geometry or {}, padded=spec.padded,
        b_transposed=params.get("B_TRANSPOSED", 0), offsets=offsets,
        epilogue=epilogue.NO_EPILOGUE if batched is not None else epilogue.template_vars(spec))
    local_n, local_m = local_size(params)
    if batched is None:
        m, n, k, groups, pq, has_bias = spec.gemm_m, columns, spec.gemm_k, spec.groups, spec.p * spec.q, spec.bias
        operands = (KernelArg("A", "weight"), b_source, KernelArg("bias", "bias"), KernelArg("out", "output"),
                    *epilogue.residual_args(spec))
    else:  # one "image" of n pixels: the epilogue's NCHW store is then row-major [batch][m][n]
        m, n, k, groups, pq, has_bias = batched.m, batched.n, batched.k, batched.batch, batched.n, False
        operands = (KernelArg("A", "scratch"), KernelArg("B", "scratch"), KernelArg("bias", "bias"),
                    KernelArg("out", "scratch"))
    ldn = ceil_to(n, params.NWG)
    global_size = (ldn // params.WPTN, ceil_to(m, params.MWG) // params.WPTM, groups)
    args = (*operands, *int_args(has_bias=int(has_bias), M=m, N=n, K=k, PQ=pq, G=groups, LDN=ldn))
    return KernelSource(text, entry, dialect.name, global_size, (local_n, local_m, 1), args)
