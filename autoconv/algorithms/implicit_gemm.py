"""Implicit GEMM: the tiled GEMM whose B-operand loads compute each patch address (stride,
padding, dilation, groups, batch) straight from the NCHW input, so there is no im2col buffer and
no second pass over memory. One kernel body with im2col_gemm (templates/shared/gemm.j2), a
different B source; the layer's geometry is baked in as constants so the patch arithmetic is
arithmetic on constants.

Two ways to read B, chosen from the layer and the params:
- row mode (unit stride along W, B not staged, symmetric padding): the GEMM's columns are output rows padded to a
  whole number of accumulator vectors, so every vector of B is one contiguous load. It reads the
  input itself when no tap can fall outside it (no padding, rows a whole number of vectors);
  otherwise a zero-padded copy of the input (one cheap pass, about 1.1x the input) made by a
  first kernel. The extra columns past each row are computed and never stored.
- gather mode (strided layers, asymmetric padding, or B staged in local memory as on GPUs): each
  element's address computed on its own, with branch-free bounds checks only when the layer is
  padded."""

from __future__ import annotations

from autoconv.algorithms import gemm
from autoconv.algorithms.base import AlgorithmDefaults, Params, ParamSpace
from autoconv.device import DeviceInfo
from autoconv.render import (
    Dialect,
    KernelArg,
    KernelSource,
    ceil_to,
    geometry_defines,
    int_args,
    render_template,
)
from autoconv.spec import ConvSpec

SPACE = ParamSpace(params=(*gemm.GEMM_TILE_PARAMS, *gemm.GEMM_STAGING_PARAMS), constraints=gemm.GEMM_CONSTRAINTS)


def row_mode(spec: ConvSpec, params: Params) -> bool:
    # The padded copy pads both sides alike: asymmetric padding reads the input in gather mode.
    return spec.stride[1] == 1 and not params.SB and spec.symmetric


def padded_copy(spec: ConvSpec, params: Params) -> bool:
    """Row mode reads a zero-padded copy unless the input itself has every vector it needs."""
    return row_mode(spec, params) and (spec.padded or spec.q % params.VWN != 0)


def row_length(spec: ConvSpec, params: Params) -> int:
    """Output row length rounded up to whole accumulator vectors (row mode's column layout)."""
    return ceil_to(spec.q, params.VWN)


def copy_shape(spec: ConvSpec) -> tuple[int, int]:
    return spec.padded_h, spec.padded_w


def scratch_bytes(spec: ConvSpec, params: Params) -> int:
    if not padded_copy(spec, params):
        return 0
    hp, wp = copy_shape(spec)
    return (spec.n * spec.c * hp * wp + row_length(spec, params)) * spec.itemsize


class ImplicitGemm(AlgorithmDefaults):
    name = "implicit_gemm"
    title = "implicit GEMM (no im2col buffer)"
    device_kernels = True
    space = SPACE

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        params = gemm.heuristic(SPACE, spec, device)
        if params.VWN > 1 and row_mode(spec, params):
            # Row mode pads each output row to whole vectors: the widest vector that wastes at most
            # an eighth of the row (Q = 7 or 14 wastes half of a 16-wide vector).
            for width in (16, 8, 4, 2, 1):
                if width <= params.VWN and (ceil_to(spec.q, width) - spec.q) * 8 <= ceil_to(spec.q, width):
                    return params.replace(VWN=width)
        return params

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        geometry = geometry_defines(spec)
        if not row_mode(spec, params):
            return [gemm.render_gemm(spec, params, dialect, b_source=KernelArg("x", "input"), implicit=True,
                                     geometry=geometry, entry="implicit_gemm")]
        qp = row_length(spec, params)
        copy = padded_copy(spec, params)
        hp, wp = copy_shape(spec) if copy else (spec.h, spec.w)
        geometry.update(QP=qp, SRC_H=hp, SRC_W=wp)
        if copy:  # the copy is already shifted by the padding: taps start at its row 0, column 0
            geometry.update(PH=0, PW=0)
        sources = []
        if copy:
            rows = spec.n * spec.c * hp
            text = render_template("shared/pad.j2", dialect=dialect, entry="pad_input")
            args = (KernelArg("x", "input"), KernelArg("xp", "scratch"),
                    *int_args(H=spec.h, W=spec.w, PH=spec.padding[0], PW=spec.padding[1], ROWS=rows, SLACK=qp))
            sources.append(KernelSource(text, "pad_input", dialect.name, (rows + 1, 1, 1), None, args))
        source = KernelArg("src", "scratch" if copy else "input")
        sources.append(gemm.render_gemm(spec, params, dialect, b_source=source, implicit=True, rows=True,
                                        geometry=geometry, columns=spec.n * spec.p * qp, entry="implicit_gemm"))
        return sources

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        return scratch_bytes(spec, params)
