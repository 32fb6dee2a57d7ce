"""ConvSpec: the one frozen description of a convolution layer used everywhere in autoconv."""

from __future__ import annotations

import math

import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence, Union, cast

import numpy as np

from autoconv.errors import InvalidSpecError
from autoconv.layouts import LAYOUTS, array_shape, layout_block

IntOrPair = Union[int, Sequence[int]]

SUPPORTED_DTYPES = ("float32",)
SUPPORTED_LAYOUTS = LAYOUTS
BYTES_PER_ELEMENT = {"float32": 4}
# What a fused epilogue may apply after the bias (and the residual): torch's names.
ACTIVATIONS = ("none", "relu", "relu6")


def _as_index(value: Any, name: str, original: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidSpecError(f"{name}: expected an int or a pair of ints, got {original!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidSpecError(f"{name}: expected an int or a pair of ints, got {original!r}") from None


def as_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """Accept an int or a pair of ints (numpy integers included), as torch's conv2d does."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        single = _as_index(value, name, value)
        return (single, single)
    items = tuple(cast(Sequence[int], value))
    if len(items) != 2:
        raise InvalidSpecError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return (_as_index(items[0], name, value), _as_index(items[1], name, value))


@dataclass(frozen=True)
class ConvSpec:
    """A 2-D convolution layer: input n×c×h×w, weight k×(c/groups)×r×s.

    `padding` is the zeros before the input (top, left); `padding_end` the zeros after it (bottom,
    right), the same as `padding` unless given (torch's asymmetric "same" puts the extra row and
    column at the bottom and right). Validated on construction; derives the output size, the
    per-group GEMM view (M = k/groups, N = n·p·q, K = (c/groups)·r·s), FLOPs, im2col bytes and a
    canonical key.

    The epilogue is part of the layer, as it changes the kernel: `residual` adds an output-shaped
    operand after the bias, then `activation` ("none", "relu" or "relu6") is applied, as a ResNet
    block's relu(conv(x) + shortcut).
    """

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    dtype: str = "float32"
    layout: str = "NCHW"
    padding_end: tuple[int, int] | None = None
    activation: str = "none"
    residual: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "c", "h", "w", "k", "r", "s", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool):
                raise InvalidSpecError(f"{name}: expected a positive int, got {value!r}")
            try:
                # numpy integers are integers: stored as plain ints so keys and hashes agree.
                value = operator.index(value)
            except TypeError:
                raise InvalidSpecError(f"{name}: expected a positive int, got {value!r}") from None
            if value <= 0:
                raise InvalidSpecError(f"{name}: must be positive, got {value}")
            object.__setattr__(self, name, value)
        # Normalise ints to pairs so that equal layers compare (and hash) equal.
        object.__setattr__(self, "stride", as_pair(self.stride, "stride"))
        object.__setattr__(self, "padding", as_pair(self.padding, "padding"))
        object.__setattr__(self, "padding_end", self.padding if self.padding_end is None
                           else as_pair(self.padding_end, "padding_end"))
        object.__setattr__(self, "dilation", as_pair(self.dilation, "dilation"))
        if min(self.stride) <= 0:
            raise InvalidSpecError(f"stride: must be positive, got {self.stride}")
        if min(self.padding) < 0:
            raise InvalidSpecError(f"padding: must be non-negative, got {self.padding}")
        if min(self.bottom_right) < 0:
            raise InvalidSpecError(f"padding_end: must be non-negative, got {self.padding_end}")
        if min(self.dilation) <= 0:
            raise InvalidSpecError(f"dilation: must be positive, got {self.dilation}")
        if self.c % self.groups:
            raise InvalidSpecError(f"groups: c={self.c} input channels are not divisible by groups={self.groups}")
        if self.k % self.groups:
            raise InvalidSpecError(f"groups: k={self.k} filters are not divisible by groups={self.groups}")
        if isinstance(self.bias, np.bool_):
            object.__setattr__(self, "bias", bool(self.bias))
        if not isinstance(self.bias, bool):
            raise InvalidSpecError(f"bias: expected True or False, got {self.bias!r}")
        if isinstance(self.residual, np.bool_):
            object.__setattr__(self, "residual", bool(self.residual))
        if not isinstance(self.residual, bool):
            raise InvalidSpecError(f"residual: expected True or False, got {self.residual!r}")
        if self.activation is None:
            object.__setattr__(self, "activation", "none")
        if self.activation not in ACTIVATIONS:
            raise InvalidSpecError(f"activation: expected None or one of {ACTIVATIONS[1:]}, got {self.activation!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise InvalidSpecError(f"dtype: {self.dtype!r} is not supported; expected one of {SUPPORTED_DTYPES}")
        if self.layout not in SUPPORTED_LAYOUTS:
            raise InvalidSpecError(f"layout: {self.layout!r} is not supported; expected one of {SUPPORTED_LAYOUTS}")
        if self.p <= 0 or self.q <= 0:
            raise InvalidSpecError(
                f"output size would be {self.p}x{self.q}: the {self.r}x{self.s} kernel with dilation "
                f"{self.dilation} does not fit the {self.h}x{self.w} input padded by {self.padding_text()}"
            )

    @classmethod
    def from_shapes(
        cls,
        input_shape: Sequence[int],
        weight_shape: Sequence[int],
        *,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = False,
        dtype: str = "float32",
        padding_end: IntOrPair | None = None,
        activation: str | None = "none",
        residual: bool = False,
        layout: str = "NCHW",
    ) -> "ConvSpec":
        """Build a spec from NCHW input and KCRS weight shapes (torch's conv2d convention)."""
        if len(input_shape) != 4:
            raise InvalidSpecError(f"input: expected a 4-D NCHW array, got shape {tuple(input_shape)}")
        if len(weight_shape) != 4:
            raise InvalidSpecError(f"weight: expected a 4-D (k, c/groups, r, s) array, got shape {tuple(weight_shape)}")
        n, c, h, w = (int(v) for v in input_shape)
        k, c_per_group, r, s = (int(v) for v in weight_shape)
        try:
            count = None if isinstance(groups, (bool, np.bool_)) else operator.index(groups)
        except TypeError:
            count = None
        if count is None or count <= 0:
            raise InvalidSpecError(f"groups: expected a positive int, got {groups!r}")
        groups = count
        if c_per_group * groups != c:
            raise InvalidSpecError(
                f"weight: shape {tuple(weight_shape)} expects {c_per_group * groups} input channels "
                f"(c/groups={c_per_group}, groups={groups}) but input has c={c}"
            )
        return cls(n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=as_pair(stride, "stride"),
                   padding=as_pair(padding, "padding"), dilation=as_pair(dilation, "dilation"),
                   groups=groups, bias=bias, dtype=dtype,
                   padding_end=None if padding_end is None else as_pair(padding_end, "padding_end"),
                   activation=activation or "none", residual=residual, layout=layout)

    @property
    def p(self) -> int:
        """Output height."""
        return (self.padded_h - self.dilation[0] * (self.r - 1) - 1) // self.stride[0] + 1

    @property
    def q(self) -> int:
        """Output width."""
        return (self.padded_w - self.dilation[1] * (self.s - 1) - 1) // self.stride[1] + 1

    @property
    def bottom_right(self) -> tuple[int, int]:
        """The zeros after the input (bottom, right): `padding_end` as construction normalised it."""
        end = self.padding_end
        assert end is not None  # set in __post_init__
        return end

    @property
    def padded_h(self) -> int:
        """Input height with its zero rows above and below."""
        return self.h + self.padding[0] + self.bottom_right[0]

    @property
    def padded_w(self) -> int:
        return self.w + self.padding[1] + self.bottom_right[1]

    @property
    def padded(self) -> bool:
        """Whether any tap can fall outside the input."""
        return self.padding != (0, 0) or self.padding_end != (0, 0)

    @property
    def symmetric(self) -> bool:
        return self.padding == self.padding_end

    def padding_text(self) -> str:
        if self.symmetric:
            return str(self.padding)
        return f"(top {self.padding[0]}, bottom {self.bottom_right[0]}, left {self.padding[1]}, right {self.bottom_right[1]})"

    @property
    def c_per_group(self) -> int:
        return self.c // self.groups

    @property
    def k_per_group(self) -> int:
        return self.k // self.groups

    @property
    def gemm_m(self) -> int:
        """GEMM rows per group: filters."""
        return self.k_per_group

    @property
    def gemm_n(self) -> int:
        """GEMM columns: output pixels over the batch."""
        return self.n * self.p * self.q

    @property
    def gemm_k(self) -> int:
        """GEMM reduction depth per group: one receptive field."""
        return self.c_per_group * self.r * self.s

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.k, self.c_per_group, self.r, self.s)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.k, self.p, self.q)

    @property
    def flops(self) -> int:
        """Multiply-adds counted as two FLOPs; bias adds are not counted."""
        return 2 * self.groups * self.gemm_m * self.gemm_n * self.gemm_k

    @property
    def itemsize(self) -> int:
        return BYTES_PER_ELEMENT[self.dtype]

    @property
    def im2col_bytes(self) -> int:
        """Size of the im2col scratch matrix: every group's K×N patch matrix."""
        return self.groups * self.gemm_k * self.gemm_n * self.itemsize

    @property
    def block(self) -> int:
        """Channels per block of the layout (1 for NCHW)."""
        return layout_block(self.layout)

    @property
    def input_array_shape(self) -> tuple[int, ...]:
        """The input array's shape in the layer's layout ((n, ceil(c/b), h, w, b) when blocked)."""
        return array_shape(self.input_shape, self.layout)

    @property
    def output_array_shape(self) -> tuple[int, ...]:
        """The output's (and the residual's) array shape in the layer's layout."""
        return array_shape(self.output_shape, self.layout)

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_array_shape) * self.itemsize

    @property
    def weight_bytes(self) -> int:
        return self.k * self.c_per_group * self.r * self.s * self.itemsize

    @property
    def output_bytes(self) -> int:
        return math.prod(self.output_array_shape) * self.itemsize

    @property
    def im2col_overhead(self) -> float:
        """How many times larger the im2col matrix is than the input it is built from."""
        return self.im2col_bytes / self.input_bytes

    def key(self) -> str:
        """Canonical, stable text key: equal specs give equal keys, different specs different keys."""
        return (
            f"n{self.n}_c{self.c}_h{self.h}_w{self.w}_k{self.k}_r{self.r}_s{self.s}"
            f"_st{self.stride[0]}x{self.stride[1]}_pd{self.padding[0]}x{self.padding[1]}"
            # Symmetric layers keep the key they always had; asymmetric ones add their end padding.
            + ("" if self.symmetric else f"_pe{self.bottom_right[0]}x{self.bottom_right[1]}") +
            f"_dl{self.dilation[0]}x{self.dilation[1]}_g{self.groups}_b{int(self.bias)}"
            f"_{self.dtype}_{self.layout}"
            # Layers without an epilogue keep the key they always had.
            + ("" if self.activation == "none" else f"_act{self.activation}") + ("_res1" if self.residual else "")
        )

    @property
    def fused(self) -> bool:
        """Whether the layer has an epilogue beyond the bias."""
        return self.activation != "none" or self.residual

    def unfused(self) -> "ConvSpec":
        """The same convolution without its epilogue (bias kept)."""
        return self.replace(activation="none", residual=False)

    def convolution(self) -> "ConvSpec":
        """The convolution alone: no bias, no residual, no activation (what costs the time)."""
        return self.replace(bias=False, activation="none", residual=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "ConvSpec":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if "padding" in changes and "padding_end" not in changes and self.symmetric:
            values["padding_end"] = None  # a symmetric layer stays symmetric
        values.update(changes)
        return ConvSpec(**values)

    def __str__(self) -> str:
        extras = []
        if self.stride != (1, 1):
            extras.append(f"stride={self.stride[0]}" if self.stride[0] == self.stride[1] else f"stride={self.stride}")
        if not self.symmetric:
            extras.append(f"pad=({self.padding[0]},{self.bottom_right[0]},{self.padding[1]},{self.bottom_right[1]})")
        elif self.padding != (0, 0):
            extras.append(f"pad={self.padding[0]}" if self.padding[0] == self.padding[1] else f"pad={self.padding}")
        if self.dilation != (1, 1):
            extras.append(f"dilation={self.dilation}")
        if self.groups != 1:
            extras.append(f"groups={self.groups}")
        if self.residual:
            extras.append("+residual")
        if self.activation != "none":
            extras.append(self.activation)
        if self.layout != "NCHW":
            extras.append(self.layout)
        tail = (" " + " ".join(extras)) if extras else ""
        return f"{self.n}x{self.c}x{self.h}x{self.w} * {self.k}x{self.c_per_group}x{self.r}x{self.s}{tail}"


def grouping_kind(spec: ConvSpec) -> str:
    """"dense", "depthwise" or "grouped<g>": layers of different kinds have different best methods."""
    if spec.groups == 1:
        return "dense"
    return "depthwise" if spec.groups == spec.c else f"grouped{spec.groups}"


def same_family(a: ConvSpec, b: ConvSpec) -> bool:
    """Same kernel size, stride, dilation, dtype and kind of grouping (dense, depthwise or
    grouped): layers whose best configs are worth trying on each other."""
    return ((a.r, a.s, a.stride, a.dilation, grouping_kind(a), a.dtype)
            == (b.r, b.s, b.stride, b.dilation, grouping_kind(b), b.dtype))


def shape_distance(a: ConvSpec, b: ConvSpec) -> float:
    """Log-ratio distance over the GEMM's dimensions: what the best tiles depend on."""
    return sum(abs(math.log2(x / y)) for x, y in ((a.gemm_m, b.gemm_m), (a.gemm_n, b.gemm_n), (a.gemm_k, b.gemm_k)))
