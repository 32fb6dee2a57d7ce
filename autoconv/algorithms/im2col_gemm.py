"""im2col + tiled GEMM: an im2col kernel lays every receptive field out as a column of a (padded)
patch matrix in scratch memory, then the generated GEMM multiplies the weights by it and writes
NCHW output with the bias. The classic answer: regular memory access at the cost of a buffer
R*S/(stride^2) times the input."""

from __future__ import annotations

from autoconv.algorithms import gemm
from autoconv.algorithms.base import AlgorithmDefaults, ParamDecl, Params, ParamSpace
from autoconv.device import DeviceInfo
from autoconv.render import Dialect, KernelArg, KernelSource, geometry_args, int_args, render_template
from autoconv.spec import ConvSpec

SPACE = ParamSpace(
    params=(*gemm.GEMM_TILE_PARAMS,
            ParamDecl("B_TRANSPOSED", 0, "im2col layout: 0 = KxN (pixels contiguous), 1 = NxK (patch contiguous)",
                      (0, 1)),
            ParamDecl("IM2COL_ROWS", 0, "im2col work per item: 0 = one element (GPUs), 1 = a contiguous run (CPUs)",
                      (0, 1)),
            *gemm.GEMM_STAGING_PARAMS),
    constraints=gemm.GEMM_CONSTRAINTS,
)


def scratch_bytes(spec: ConvSpec, params: Params) -> int:
    """Bytes of the padded im2col matrix the GEMM reads."""
    return spec.groups * spec.gemm_k * gemm.padded_n(spec, params) * spec.itemsize


def render_im2col(spec: ConvSpec, params: Params, dialect: Dialect) -> KernelSource:
    """The im2col kernel writing the (padded) layout the GEMM with these params reads."""
    text = render_template("shared/im2col.j2", dialect=dialect, entry="im2col", b_transposed=params.B_TRANSPOSED,
                           whole_rows=params.IM2COL_ROWS)
    ldn, crs = gemm.padded_n(spec, params), spec.gemm_k
    if params.IM2COL_ROWS and not params.B_TRANSPOSED:
        dims = (spec.n * spec.p + 1, crs)  # one more row index: the zero padding past N*P*Q
    elif params.IM2COL_ROWS:
        dims = (ldn, 1)
    else:
        dims = (crs, ldn) if params.B_TRANSPOSED else (ldn, crs)
    args = (KernelArg("x", "input"), KernelArg("cols", "scratch"), *geometry_args(spec),
            *int_args(NPQ=spec.gemm_n, CRS=spec.gemm_k, LDN=ldn))
    return KernelSource(text, "im2col", dialect.name, (dims[0], dims[1], spec.groups), None, args)


class Im2colGemm(AlgorithmDefaults):
    name = "im2col_gemm"
    title = "im2col + generated GEMM"
    device_kernels = True
    space = SPACE

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        extra = {} if device is not None and device.device_type == "gpu" else {"IM2COL_ROWS": 1}
        return gemm.heuristic(SPACE, spec, device, **extra)

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        return [render_im2col(spec, params, dialect),
                gemm.render_gemm(spec, params, dialect, b_source=KernelArg("B", "scratch"), implicit=False)]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        return scratch_bytes(spec, params)
