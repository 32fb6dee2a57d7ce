"""Winograd minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016), as cuDNN, MIOpen, NNPACK and
the Arm Compute Library ship it: each m x m output tile costs (m + 2)^2 multiplications per
channel instead of 9 m^2 (2.25x fewer for m = 2, 4x for m = 4).

Four kernels from templates/shared/winograd.j2 and gemm.j2, all in one scratch buffer:
1. filter transform U = G g G^T, once per weights (a once_per_weights kernel: the launcher re-runs
   it only when the weights change);
2. input transform V = B^T d B of every (m + 2)^2 input tile;
3. one GEMM per transform point and group, M = U x V: the tiled GEMM template with a batch
   dimension (gemm.render_gemm's BatchedGemm), tuned with the same tunables;
4. output transform A^T M A, cropped to the output, plus the bias.

The transforms read and write the layer's layout, NCHW or channel-blocked NCHW{b}c (the output's
padding channels past K written as zero); the GEMMs between them do not see it.

Accuracy: the transforms' rounding grows with the tile and with the channels summed per output;
F(4x4) is declared only up to WINOGRAD4_MAX_CHANNELS channels per group (a layer constraint),
F(2x2) has no such limit on the layers we meet.

Non-finite inputs: a NaN or an inf in the input reaches every output of each m x m tile whose
input tile holds it (every filter), not only the 3 x 3 neighbourhood a direct method's outputs
read: the transforms mix a tile's pixels before the GEMM, so inf - inf and 0 x inf make NaN across
the tile (cuDNN's Winograd does the same). Finite inputs are unaffected. The other algorithms give
exactly the reference's non-finite outputs; tests/test_non_finite.py holds both behaviours."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from autoconv import epilogue
from autoconv.algorithms import gemm
from autoconv.algorithms.base import FLOPS_PER_BYTE, AlgorithmDefaults, Constraint, LayerConstraint, ParamDecl, Params, ParamSpace
from autoconv.device import DeviceInfo
from autoconv.layouts import LAYOUTS
from autoconv.render import Dialect, KernelArg, KernelSource, ceil_to, int_args, render_template
from autoconv.spec import ConvSpec

# Measured on random data (tests/test_winograd.py): F(4x4) keeps the relative error near 3e-5 at
# 4096 channels, a third of the 1e-4 every kernel must meet; beyond it F(2x2) serves.
WINOGRAD4_MAX_CHANNELS = 4096

_F = Fraction
# (B^T, G, A^T) with the interpolation points 0, -1, 1 (m = 2) and 0, +-1, +-2 (m = 4) of Lavin & Gray.
Matrix = list[list[Fraction | int]]
TRANSFORMS: dict[int, tuple[Matrix, Matrix, Matrix]] = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [_F(1, 2), _F(1, 2), _F(1, 2)], [_F(1, 2), _F(-1, 2), _F(1, 2)], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[_F(1, 4), 0, 0], [_F(-1, 6), _F(-1, 6), _F(-1, 6)], [_F(-1, 6), _F(1, 6), _F(-1, 6)],
         [_F(1, 24), _F(1, 12), _F(1, 6)], [_F(1, 24), _F(-1, 12), _F(1, 6)], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

# Scratch regions start on 64-byte boundaries.
ALIGN_FLOATS = 16


def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m x m, 3 x 3) as float64 arrays."""
    bt, g, at = (np.array(_floats(mat), dtype=np.float64) for mat in TRANSFORMS[m])
    return bt, g, at


def _floats(mat: Matrix) -> list[list[float]]:
    return [[float(v) for v in row] for row in mat]


SPACE = ParamSpace(
    params=(ParamDecl("TILE", 4, "output tile side m of F(m x m, 3 x 3): 4 does 4x fewer multiplies, 2 is more "
                                 "accurate and transforms less", (2, 4)),
            ParamDecl("XV", 1, "tiles of one row each work-item of the input and output transforms handles, as "
                               "the lanes of one vector (1 = scalar)", (1, 2, 4, 8, 16),
                      device_limit=lambda limits: limits.max_vector_width),
            *gemm.GEMM_TILE_PARAMS, *gemm.GEMM_STAGING_PARAMS),
    constraints=(*gemm.GEMM_CONSTRAINTS,
                 Constraint("transform_vector_width", "XV must not exceed the dialect's vector width (1 for CUDA)",
                            lambda p, d: p.XV <= d.max_vector_width)),
    layer_constraints=(
        LayerConstraint("winograd4_channels",
                        f"TILE=4 needs at most {WINOGRAD4_MAX_CHANNELS} input channels per group (accuracy)",
                        lambda p, spec: p.TILE == 2 or spec.c_per_group <= WINOGRAD4_MAX_CHANNELS),
    ),
)


class Layout:
    """Where a layer's transforms sit in scratch, in floats, for one tile size."""

    def __init__(self, spec: ConvSpec, params: Params) -> None:
        self.m = params.TILE
        self.points = (self.m + 2) ** 2
        self.tiles_h, self.tiles_w = -(-spec.p // self.m), -(-spec.q // self.m)
        self.tiles = spec.n * self.tiles_h * self.tiles_w
        self.blocks_w = -(-self.tiles_w // params.XV)  # work-items per tile row in the transforms
        self.items = spec.n * self.tiles_h * self.blocks_w
        self.ldn = ceil_to(self.tiles, params.NWG)
        self.u_offset = 0
        self.v_offset = ceil_to(self.points * spec.k * spec.c_per_group, ALIGN_FLOATS)
        self.m_offset = self.v_offset + ceil_to(self.points * spec.c * self.ldn, ALIGN_FLOATS)
        self.floats = self.m_offset + self.points * spec.k * self.tiles

    def defines(self, spec: ConvSpec, params: Params) -> dict[str, int]:
        # The activations' layout: NCHW, or NCHW{b}c (LANES = b channels side by side per pixel, the
        # image's channels padded to CPAD and KPAD); with LANES = 1 the addressing is NCHW's.
        lanes = spec.block if spec.layout != "NCHW" else 1
        return dict(C=spec.c, K=spec.k, Cg=spec.c_per_group, H=spec.h, W=spec.w, P=spec.p, Q=spec.q,
                    LANES=lanes, CPAD=ceil_to(spec.c, lanes), KPAD=ceil_to(spec.k, lanes),
                    PH=spec.padding[0], PW=spec.padding[1], TILES_H=self.tiles_h, TILES_W=self.tiles_w,
                    TILES=self.tiles, LDN=self.ldn, XV=params.XV, BLOCKS_W=self.blocks_w, ITEMS=self.items,
                    U_OFFSET=self.u_offset, V_OFFSET=self.v_offset, M_OFFSET=self.m_offset)


def estimated_cost(spec: ConvSpec, params: Params) -> float:
    """Bytes moved plus GEMM FLOPs at FLOPS_PER_BYTE: the transformed filter (read every call),
    the transformed input and the products (each written and read), and the batched GEMM. F(4x4)
    does fewer multiplies, but its filter transform is 36/9 the weights: on layers with few
    tiles and many channels (ResNet's res5 at batch 1) that traffic outweighs the saving."""
    layout = Layout(spec, params)
    u = layout.points * spec.k * spec.c_per_group
    v = layout.points * spec.c * layout.ldn
    m = layout.points * spec.k * layout.tiles
    flops = 2 * layout.points * spec.k * spec.c_per_group * layout.ldn
    return 4 * (u + 2 * v + 2 * m) + flops / FLOPS_PER_BYTE


def _narrow_columns(spec: ConvSpec, params: Params, device: DeviceInfo | None) -> Params:
    """The widest N tile that pads the GEMM's columns (the tiles) by at most an eighth: a 7x7 layer
    has 4 tiles of 4x4, which a 64-wide tile would pad sixteenfold."""
    tiles = Layout(spec, params).tiles
    for width in (128, 64, 32, 16):
        if width > params.NWG:
            continue
        if (ceil_to(tiles, width) - tiles) * 8 <= ceil_to(tiles, width) or width == 16:
            wptn = min(params.WPTN, width)
            narrowed = params.replace(NWG=width, WPTN=wptn, VWN=min(params.VWN, wptn), VW=min(params.VW, width))
            if device is None or not narrowed.violations(device.limits()):
                return narrowed
    return params


class Winograd(AlgorithmDefaults):
    name = "winograd"
    title = "Winograd F(m x m, 3 x 3)"
    device_kernels = True
    space = SPACE
    # The input transform reads, and the output transform writes, the layer's layout: a blocked
    # chain keeps its 3x3 layers on Winograd without reorders around them.
    layouts = LAYOUTS

    def supports_shape(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        if (spec.r, spec.s) != (3, 3):
            return f"not supported: {spec.r}x{spec.s} filters (Winograd F(m, 3) needs 3x3)"
        if spec.stride != (1, 1):
            return f"not supported: stride {spec.stride[0]}x{spec.stride[1]} (needs stride 1)"
        if spec.dilation != (1, 1):
            return f"not supported: dilation {spec.dilation[0]}x{spec.dilation[1]} (needs dilation 1)"
        return None

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        # Four tiles per transform work-item where vectors exist (measured best on PoCL's CPU device).
        vector = 4 if device is None or device.limits().max_vector_width >= 4 else 1
        # Each candidate already fits the device (gemm.heuristic, _narrow_columns); F(2x2) breaks no
        # layer constraint, so there is always one.
        choices = []
        for tile in (4, 2):
            params = _narrow_columns(spec, gemm.heuristic(SPACE, spec, device, TILE=tile, XV=vector), device)
            if not SPACE.layer_violations(params, spec):
                choices.append((estimated_cost(spec, params), -tile, params))
        return min(choices, key=lambda item: item[:2])[2]

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        layout = Layout(spec, params)
        bt, gm, at = (_floats(mat) for mat in TRANSFORMS[layout.m])
        defines = layout.defines(spec, params)

        def render(stage: str, entry: str) -> str:
            # Only the output transform writes the layer's output: the other stages are the same
            # kernels (one build) whatever the epilogue.
            fused = epilogue.template_vars(spec) if stage == "output" else epilogue.NO_EPILOGUE
            return render_template("shared/winograd.j2", dialect=dialect, entry=entry, stage=stage, m=layout.m,
                                   a=layout.m + 2, bt=bt, gm=gm, at=at, defines=defines, epilogue=fused)

        scratch = KernelArg("scratch", "scratch")
        filter_transform = KernelSource(render("filter", "winograd_filter"), "winograd_filter", dialect.name,
                                        (spec.c_per_group, spec.k, 1), None, (KernelArg("wt", "weight"), scratch),
                                        once_per_weights=True)
        input_transform = KernelSource(render("input", "winograd_input"), "winograd_input", dialect.name,
                                       (layout.items + 1, spec.c, 1), None, (KernelArg("x", "input"), scratch))
        products = gemm.render_gemm(
            spec, params, dialect, b_source=scratch, implicit=False, entry="winograd_gemm",
            batched=gemm.BatchedGemm(m=spec.k_per_group, n=layout.tiles, k=spec.c_per_group,
                                     batch=layout.points * spec.groups, a_offset=layout.u_offset,
                                     b_offset=layout.v_offset, out_offset=layout.m_offset))
        output_transform = KernelSource(render("output", "winograd_output"), "winograd_output", dialect.name,
                                        (layout.items, defines["KPAD"], 1), None,
                                        (scratch, KernelArg("bias", "bias"), KernelArg("out", "output"),
                                         *epilogue.residual_args(spec), *int_args(has_bias=int(spec.bias))))
        return [filter_transform, input_transform, products, output_transform]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        return Layout(spec, params).floats * spec.itemsize

    def estimated_cost(self, spec: ConvSpec, params: Params) -> float:
        return estimated_cost(spec, params)
