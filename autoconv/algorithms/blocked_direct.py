"""Register-blocked direct convolution over channel-blocked weights: what onnxruntime's MLAS
(NCHWc kernels), oneDNN's and LIBXSMM's direct convolutions and TVM's x86 schedules run where
GEMM-shaped methods lose. No patch matrix, no GEMM: each work-item keeps KV blocks of CB output
channels x PIX output pixels of one row in registers (vector accumulators where the language has
vectors), and for every input channel and filter tap broadcasts one input value per pixel against
the CB filters, read as vectors from the weights laid out once per weights as OIHW{CB}i{CB}o.

Kernels from templates/shared/blocked_direct.j2:
1. filter (once per weights): KCRS -> [K/CB][C/CB][R][S][CB ci][CB co] in scratch, the channels
   beyond K and beyond C/groups zero;
2. pad (PADX=1, layers with padding): the input copied with its zero border into scratch, after
   the weights, so the conv stage checks no edges;
3. conv: the convolution, the bias and the fused epilogue, reading the input in the layer's layout
   (NCHW or NCHW{CB}c) and writing the output in it (no reorder pass over the activations).

Covers every kernel size, stride, dilation and padding (asymmetric included); grouped layers
whose filters per group fill whole blocks (k/groups a multiple of CB); not depthwise.
Non-finite inputs behave as in the reference (tests/test_non_finite.py)."""

from __future__ import annotations

from autoconv import epilogue
from autoconv.algorithms.base import AlgorithmDefaults, Constraint, LayerConstraint, ParamDecl, Params, ParamSpace
from autoconv.device import DeviceInfo, DeviceLimits
from autoconv.layouts import LAYOUTS
from autoconv.render import Dialect, KernelArg, KernelSource, int_args, render_template
from autoconv.spec import ConvSpec

BLOCKS = (4, 8, 16)
# Accumulator registers a config may hold: a CPU's 32 vector registers less the weights and the
# broadcast input; a scalar (CUDA) thread's accumulators count one register per lane.
VECTOR_REGISTERS = 28
SCALAR_REGISTERS = 64


def _vector_width(params: Params, max_vector_width: int) -> int:
    """Lanes per accumulator vector: the block, or the language's widest vector if narrower."""
    return min(params.CB, max_vector_width)


def accumulator_registers(params: Params, limits: DeviceLimits) -> int:
    return params.KV * params.PIX * (params.CB // _vector_width(params, limits.max_vector_width))


def _fits_registers(params: Params, limits: DeviceLimits) -> bool:
    if limits.max_vector_width == 1:
        return params.KV * params.PIX * params.CB <= SCALAR_REGISTERS
    return accumulator_registers(params, limits) <= VECTOR_REGISTERS


def output_blocks(spec: ConvSpec, block: int) -> int:
    """Blocks of `block` output channels (the last one padded with zero filters)."""
    return -(-spec.k // block)


def group_blocks(spec: ConvSpec, block: int) -> int:
    """Output-channel blocks per group (the grouped layers supported fill whole blocks)."""
    return output_blocks(spec, block) if spec.groups == 1 else spec.k_per_group // block


def input_blocks(spec: ConvSpec, block: int) -> int:
    """Blocks of `block` input channels per group (the last one may be partial)."""
    return -(-spec.c_per_group // block)


# The work-group width along a row, shared by the direct kernels (blocked and depthwise).
ROW_GROUPS = ParamDecl("LX", 0, "work-group width in pixel groups (0: the runtime chooses)", (0, 1, 2, 4, 8, 16, 32, 64),
                       device_limit=lambda limits: limits.max_work_group_size)
ROW_GROUPS_FIT = Constraint("work_group", "LX must not exceed the device's work-group size",
                            lambda p, d: p.LX <= min(d.max_work_group_size, d.max_work_item_sizes[0]))

SPACE = ParamSpace(
    params=(
        ParamDecl("CB", 16, "channel block: output (and input) channels per vector, the layout's b of OIHW{b}i{b}o",
                  BLOCKS),
        ParamDecl("KV", 2, "output-channel blocks each work-item accumulates", (1, 2, 3, 4)),
        ParamDecl("PIX", 7, "output pixels of one row each work-item accumulates", (1, 2, 4, 7, 8, 14, 16)),
        ParamDecl("ORDER", 0, "loop order: 0 input-channel blocks outermost, 1 the filter window outermost", (0, 1)),
        ROW_GROUPS,
        ParamDecl("PADX", 1, "layers with padding: 1 copies the input with its zero border into scratch first, "
                  "so the convolution checks no edges; 0 checks them in the kernel", (0, 1)),
    ),
    constraints=(
        Constraint("registers", f"KV x PIX accumulator vectors (CB lanes each) must fit the registers: at most "
                   f"{VECTOR_REGISTERS} vectors, or {SCALAR_REGISTERS} floats where the language has no vectors",
                   _fits_registers),
        ROW_GROUPS_FIT,
    ),
    layer_constraints=(
        LayerConstraint(
            "kv_divides_blocks", "KV must divide the output-channel blocks of a group (k/groups / CB, rounded up): "
            "a work-item's blocks share one group's input",
            lambda p, spec: group_blocks(spec, p.CB) % p.KV == 0),
        LayerConstraint("groups_fill_blocks", "grouped layers need k/groups to be a multiple of CB",
                        lambda p, spec: spec.groups == 1 or spec.k_per_group % p.CB == 0),
        LayerConstraint("block_is_layout", "in a channel-blocked layout NCHW{b}c, CB must be b",
                        lambda p, spec: spec.layout == "NCHW" or p.CB == spec.block),
        LayerConstraint("groups_fill_input_blocks", "grouped layers in a blocked layout need c/groups to be a "
                        "multiple of CB (each group starts a block)",
                        lambda p, spec: spec.layout == "NCHW" or spec.groups == 1 or spec.c_per_group % p.CB == 0),
    ),
)


def gpu_row_groups(device: DeviceInfo | None, choices: tuple[int, ...]) -> int:
    """LX for a direct kernel's heuristic: on a GPU, work-groups of up to 64 neighbouring pixel
    groups of a row (the widest of `choices` the device allows); elsewhere 0, the runtime's choice."""
    if device is None or device.device_type != "gpu":
        return 0
    limits = device.limits()
    widest = min(64, limits.max_work_group_size, limits.max_work_item_sizes[0])
    return max(c for c in choices if c <= widest)


def wastes_a_row(q: int, pix: int) -> bool:
    """More than an eighth of a row of q pixels computed past its end in groups of pix."""
    return (-(-q // pix) * pix - q) * 8 > q


def row_launch(q: int, pix: int, lx: int) -> tuple[int, tuple[int, int, int] | None]:
    """A direct kernel's launch along a row: the pixel groups (padded to whole work-groups of lx)
    and the local size (None: the runtime's choice)."""
    groups = -(-q // pix)
    return (groups, None) if lx == 0 else (-(-groups // lx) * lx, (lx, 1, 1))


def preferred_block(device: DeviceInfo | None) -> int:
    """The CPU's native vector width where its name says it (PoCL names the target: AVX-512 holds 16
    floats, AVX2 8), else 8."""
    name = "" if device is None else device.name.lower()
    if device is not None and device.device_type == "cpu":
        if "avx512" in name:
            return 16
    return 8


class BlockedDirect(AlgorithmDefaults):
    name = "blocked_direct"
    title = "register-blocked direct"
    device_kernels = True
    space = SPACE

    layouts = LAYOUTS

    def supports_shape(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        if spec.layout != "NCHW" and spec.groups > 1 and (spec.c_per_group % spec.block or spec.k_per_group % spec.block):
            return (f"not supported: {spec.groups} groups of {spec.c_per_group} -> {spec.k_per_group} channels in "
                    f"{spec.layout} (each group must fill whole blocks of {spec.block})")
        if spec.groups > 1 and spec.k_per_group % min(BLOCKS):
            kind = "depthwise" if spec.groups == spec.c else f"{spec.groups} groups"
            return (f"not supported: {kind} with k/groups={spec.k_per_group} filters per group "
                    f"(needs a multiple of {min(BLOCKS)})")
        return None

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        limits = None if device is None else device.limits()
        lx = gpu_row_groups(device, SPACE.decl("LX").choices)
        preferred = spec.block if spec.layout != "NCHW" else preferred_block(device)
        fitting = []  # in order of preference: the device's block, then the widest register tiles
        for block in sorted(BLOCKS, key=lambda b: (abs(b - preferred), -b)):
            for kv in (2, 1, 4, 3):
                for pix in (7, 8, 14, 4, 16, 2, 1):
                    params = SPACE.validate(dict(CB=block, KV=kv, PIX=pix, LX=lx))
                    if not SPACE.layer_violations(params, spec) and not (limits and params.violations(limits)):
                        fitting.append(params)
        if not fitting:  # CB=4, KV=1, PIX=1 breaks nothing on a layer supports() accepts
            return SPACE.validate(dict(CB=spec.block if spec.layout != "NCHW" else min(BLOCKS), KV=1, PIX=1, LX=lx))

        return next((params for params in fitting if not wastes_a_row(spec.q, params.PIX)), fitting[0])

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        block, vb = params.CB, min(params.CB, dialect.max_vector_width)
        blocked = spec.layout != "NCHW"
        kb, ncb = output_blocks(spec, block), input_blocks(spec, block)
        kgroups = kb // params.KV
        top, left = spec.padding
        bottom, right = spec.bottom_right
        copied = pads_input(spec, params)
        # The conv stage reads the input as given, or its zero-bordered copy in scratch (no padding
        # left), wide enough for the pixels a row's last group computes past Q (never stored).
        copy_w = copied_width(spec, params)
        h, w = (spec.padded_h, copy_w) if copied else (spec.h, spec.w)
        lanes = block if blocked else 1
        defines = dict(C=spec.c, H=h, W=w, K=spec.k, Cg=spec.c_per_group, Kg=spec.k_per_group,
                       R=spec.r, S=spec.s, P=spec.p, Q=spec.q, SH=spec.stride[0], SW=spec.stride[1],
                       PH=0 if copied else top, PW=0 if copied else left, DH=spec.dilation[0], DW=spec.dilation[1],
                       CB=block, VB=vb, LPB=block // vb, KV=params.KV, PIX=params.PIX, KB=kb, NCB=ncb,
                       KGROUPS=kgroups, W_BLOCK=ncb * spec.r * spec.s * block * block,
                       # Strides of the input's layout: NCHW, or NCHW{CB}c (a layer constraint keeps b = CB).
                       X_IMG=-(-spec.c // block) * block if blocked else spec.c, X_ROW=w * lanes,
                       X_CH=1 if blocked else h * w, X_PX=lanes, O_PX=lanes,
                       X_OFFSET=_weight_floats(spec, params) if copied else 0,
                       SRC_H=spec.h, SRC_W=spec.w, SRC_HP=spec.padded_h, SRC_WP=copy_w, SRC_PH=top, SRC_PW=left)
        common = dict(dialect=dialect, defines=defines, vb=vb, blocked=blocked, order=params.ORDER, tail=spec.c_per_group % block,
                      k_tail=spec.k % block != 0, q_tail=spec.q % params.PIX != 0,
                      # Whether a read of a pixel past Q must be clamped to the row: not where the
                      # bordered copy is wide enough, nor where every group ends within Q.
                      clamp_cols=not copied and spec.q % params.PIX != 0,
                      padded_rows=not copied and (top > 0 or bottom > 0), padded_cols=not copied and (left > 0 or right > 0))
        scratch = KernelArg("scratch", "scratch")
        filter_stage = KernelSource(
            render_template("shared/blocked_direct.j2", stage="filter", entry="blocked_filter",
                            epilogue=epilogue.NO_EPILOGUE, **common),
            "blocked_filter", dialect.name, (kb * block, ncb * block * spec.r * spec.s, 1), None,
            (KernelArg("wt", "weight"), scratch), once_per_weights=True)
        width, local = row_launch(spec.q, params.PIX, params.LX)
        conv_stage = KernelSource(
            render_template("shared/blocked_direct.j2", stage="conv", entry="blocked_conv",
                            epilogue=epilogue.template_vars(spec), **common),
            "blocked_conv", dialect.name, (width, spec.p, spec.n * kgroups), local,
            (KernelArg("x", "scratch" if copied else "input"), scratch, KernelArg("bias", "bias"),
             KernelArg("out", "output"), *epilogue.residual_args(spec), *int_args(has_bias=int(spec.bias))))
        if not copied:
            return [filter_stage, conv_stage]
        planes = spec.n * (-(-spec.c // block) if blocked else spec.c)
        pad_stage = KernelSource(
            render_template("shared/blocked_direct.j2", stage="pad", entry="blocked_pad",
                            epilogue=epilogue.NO_EPILOGUE, **common),
            "blocked_pad", dialect.name, (copy_w * lanes, spec.padded_h, planes), None,
            (KernelArg("x", "input"), scratch))
        return [filter_stage, pad_stage, conv_stage]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        """The channel-blocked weights, then the zero-bordered copy of the input where it makes one."""
        return (_weight_floats(spec, params) + (_copy_floats(spec, params) if pads_input(spec, params) else 0)) \
            * spec.itemsize

    def traffic_bytes(self, spec: ConvSpec, params: Params) -> int:
        """Input and output once, the blocked weights read once per call (their transform runs once
        per weights), and the input's bordered copy written and read where it makes one."""
        copy = 2 * _copy_floats(spec, params) * spec.itemsize if pads_input(spec, params) else 0
        return spec.input_bytes + spec.output_bytes + _weight_floats(spec, params) * spec.itemsize + copy


def pads_input(spec: ConvSpec, params: Params) -> bool:
    """Whether the config copies the input with its zero border before the convolution."""
    return bool(params.PADX) and spec.padded


def copied_width(spec: ConvSpec, params: Params) -> int:
    """Columns of the bordered copy: the padded row, widened with zeros to cover every tap of the
    pixels the row's last group computes past Q, so that the conv stage reads without a clamp
    (a clamp per tap and pixel cost a 7x7 layer of three channels a third of its time)."""
    computed = -(-spec.q // params.PIX) * params.PIX
    return max(spec.padded_w, (computed - 1) * spec.stride[1] + (spec.s - 1) * spec.dilation[1] + 1)


def _weight_floats(spec: ConvSpec, params: Params) -> int:
    """The channel-blocked weights, rounded up to 16 floats so the input's copy after them is aligned."""
    block = params.CB
    floats = output_blocks(spec, block) * block * input_blocks(spec, block) * block * spec.r * spec.s
    return -(-floats // 16) * 16


def _copy_floats(spec: ConvSpec, params: Params) -> int:
    channels = -(-spec.c // params.CB) * params.CB if spec.layout != "NCHW" else spec.c
    return spec.n * channels * spec.padded_h * copied_width(spec, params)
