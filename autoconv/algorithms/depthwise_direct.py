"""Depthwise direct convolution: one filter per channel (groups = c = k), the layer of MobileNet's
and ShuffleNet's separable blocks, which the dense register-blocked direct convolution does not run
and a GEMM computes as c one-row products. As MLAS's NCHWc depthwise kernel and oneDNN's jit
depthwise convolution do, it has no reduction over channels to block: each work-item keeps PIX
output pixels of one row of one block of channels in registers and adds, tap by tap, the input
times the filter. In a channel-blocked layout NCHW{b}c a block is b channels side by side, one
vector per pixel (vector loads of input and filters, vector FMAs); in NCHW a block is one channel.

Kernels from templates/shared/depthwise_direct.j2:
1. filter (once per weights): K x 1 x R x S -> scratch as [K/b][R][S][b] (the lanes past K zero);
2. conv: the convolution, the bias and the fused epilogue, read and written in the layer's layout.

Covers every kernel size, stride, dilation and padding (asymmetric included) of depthwise layers
with one filter per channel. Non-finite inputs behave as in the reference (tests/test_non_finite.py)."""

from __future__ import annotations

from autoconv import epilogue
from autoconv.algorithms.base import AlgorithmDefaults, ParamDecl, Params, ParamSpace
from autoconv.algorithms.blocked_direct import ROW_GROUPS, ROW_GROUPS_FIT, gpu_row_groups, row_launch, wastes_a_row
from autoconv.device import DeviceInfo
from autoconv.layouts import LAYOUTS
from autoconv.render import Dialect, KernelArg, KernelSource, int_args, render_template
from autoconv.spec import ConvSpec

SPACE = ParamSpace(
    params=(
        ParamDecl("PIX", 8, "output pixels of one row each work-item accumulates", (1, 2, 4, 7, 8, 14, 16)),
        ROW_GROUPS,
    ),
    constraints=(ROW_GROUPS_FIT,),
)


def is_depthwise(spec: ConvSpec) -> bool:
    """One filter per channel: groups = c = k."""
    return spec.groups == spec.c == spec.k


class DepthwiseDirect(AlgorithmDefaults):
    name = "depthwise_direct"
    title = "depthwise direct"
    device_kernels = True
    space = SPACE
    layouts = LAYOUTS

    def supports_shape(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        if not is_depthwise(spec):
            return (f"not supported: {spec.groups} group(s) of {spec.c_per_group} -> {spec.k_per_group} channels "
                    "(depthwise layers only: groups = c = k)")
        return None

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        # The first pixel group (in order of preference) that computes at most an eighth of a row
        # past its end; 1 always does.
        pix = next(p for p in (8, 7, 14, 16, 4, 2, 1) if not wastes_a_row(spec.q, p))
        return SPACE.validate(dict(PIX=pix, LX=gpu_row_groups(device, SPACE.decl("LX").choices)))

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        lanes = spec.block  # channels side by side per pixel; 1 in NCHW
        vb = min(lanes, dialect.max_vector_width)
        kb = -(-spec.k // lanes)
        top, left = spec.padding
        bottom, right = spec.bottom_right
        q_tail = spec.q % params.PIX != 0
        defines = dict(K=spec.k, H=spec.h, W=spec.w, R=spec.r, S=spec.s, P=spec.p, Q=spec.q,
                       SH=spec.stride[0], SW=spec.stride[1], PH=top, PW=left, DH=spec.dilation[0], DW=spec.dilation[1],
                       LANES=lanes, VB=vb, LPB=lanes // vb, KB=kb, PIX=params.PIX)
        common = dict(dialect=dialect, defines=defines, vb=vb, q_tail=q_tail, k_tail=spec.k % lanes != 0,
                      padded_rows=top > 0 or bottom > 0, check_cols=left > 0 or right > 0 or q_tail)
        scratch = KernelArg("scratch", "scratch")
        filter_stage = KernelSource(
            render_template("shared/depthwise_direct.j2", stage="filter", entry="depthwise_filter",
                            epilogue=epilogue.NO_EPILOGUE, **common),
            "depthwise_filter", dialect.name, (kb * lanes, spec.r * spec.s, 1), None,
            (KernelArg("wt", "weight"), scratch), once_per_weights=True)
        width, local = row_launch(spec.q, params.PIX, params.LX)
        conv_stage = KernelSource(
            render_template("shared/depthwise_direct.j2", stage="conv", entry="depthwise_conv",
                            epilogue=epilogue.template_vars(spec), **common),
            "depthwise_conv", dialect.name, (width, spec.p, spec.n * kb), local,
            (KernelArg("x", "input"), scratch, KernelArg("bias", "bias"), KernelArg("out", "output"),
             *epilogue.residual_args(spec), *int_args(has_bias=int(spec.bias))))
        return [filter_stage, conv_stage]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        """The filters as one vector per tap and channel block."""
        return -(-spec.k // spec.block) * spec.block * spec.r * spec.s * spec.itemsize
