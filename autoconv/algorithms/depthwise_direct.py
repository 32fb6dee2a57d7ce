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
from autoconv.algorithms.base import AlgorithmDefaults, Constraint, ParamDecl, Params, ParamSpace
from autoconv.device import DeviceInfo
from autoconv.layouts import LAYOUTS
from autoconv.render import Dialect, KernelArg, KernelSource, int_args, render_template
from autoconv.spec import ConvSpec

SPACE = ParamSpace(
    params=(
        ParamDecl("PIX", 8, "output pixels of one row each work-item accumulates", (1, 2, 4, 7, 8, 14, 16)),
        ParamDecl("LX", 0, "work-group width in pixel groups (0: the runtime chooses)", (0, 1, 2, 4, 8, 16, 32, 64),
                  device_limit=lambda limits: limits.max_work_group_size),
    ),
    constraints=(
        Constraint("work_group", "LX must not exceed the device's work-group size",
                   lambda p, d: p.LX <= min(d.max_work_group_size, d.max_work_item_sizes[0])),
    ),
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
        # GPUs: work-groups of up to 64 neighbouring pixel groups; CPUs: the runtime's choice. The
        # widest pixel group that computes at most an eighth of a row past its end.
        lx = 0
        if device is not None and device.device_type == "gpu":
            limits = device.limits()
            widest = min(64, limits.max_work_group_size, limits.max_work_item_sizes[0])
            lx = max(c for c in SPACE.decl("LX").choices if c <= widest)
        for pix in (8, 7, 14, 16, 4, 2, 1):
            if (-(-spec.q // pix) * pix - spec.q) * 8 <= spec.q:
                break
        return SPACE.validate(dict(PIX=pix, LX=lx))

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        lanes = spec.block if spec.layout != "NCHW" else 1
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
        groups_w = -(-spec.q // params.PIX)
        width = groups_w if params.LX == 0 else -(-groups_w // params.LX) * params.LX
        conv_stage = KernelSource(
            render_template("shared/depthwise_direct.j2", stage="conv", entry="depthwise_conv",
                            epilogue=epilogue.template_vars(spec), **common),
            "depthwise_conv", dialect.name, (width, spec.p, spec.n * kb), None if params.LX == 0 else (params.LX, 1, 1),
            (KernelArg("x", "input"), scratch, KernelArg("bias", "bias"), KernelArg("out", "output"),
             *epilogue.residual_args(spec), *int_args(has_bias=int(spec.bias))))
        return [filter_stage, conv_stage]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        """The filters as one vector per tap and channel block."""
        lanes = spec.block if spec.layout != "NCHW" else 1
        return -(-spec.k // lanes) * lanes * spec.r * spec.s * spec.itemsize
