"""2-D pooling of device arrays (ONNX's MaxPool, AveragePool and GlobalAveragePool) as generated
kernels (templates/shared/pool.j2) on a device runtime's queue, in the array's own layout (NCHW or
NCHW{b}c): the pooling between two conv layers of a model stays on the device, and a blocked chain
is not reordered around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoconv.backends.runtime import Runtime, enqueue_into_new_array
from autoconv.layouts import NCHW, array_shape, layout_block
from autoconv.render import KernelArg, KernelSource, render_template

Pair = tuple[int, int]
POOL_KINDS = ("max", "average")
# NCHW pooling: the window sizes whose taps are unrolled (a global pooling's whole image is not).
MAX_UNROLLED_TAPS = 49


@dataclass(frozen=True)
class PoolGeometry:
    """One pooling: `kind` "max" or "average"; per spatial axis the window, the stride and the
    (before, after) padding (ceil_mode's overhang included); `counted` the (before, after) pads an
    average's divisor counts (count_include_pad's explicit pads; (0, 0) counts the input only)."""

    kind: str
    kernel: Pair
    strides: Pair
    pads: tuple[Pair, Pair]
    counted: tuple[Pair, Pair] = ((0, 0), (0, 0))

    def __post_init__(self) -> None:
        if self.kind not in POOL_KINDS:
            raise ValueError(f"kind: expected one of {POOL_KINDS}, got {self.kind!r}")

    def output_shape(self, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        n, c, h, w = shape
        (top, bottom), (left, right) = self.pads
        return (n, c, (h + top + bottom - self.kernel[0]) // self.strides[0] + 1,
                (w + left + right - self.kernel[1]) // self.strides[1] + 1)


def pool_source(shape: tuple[int, int, int, int], layout: str, geometry: PoolGeometry, dialect: Any) -> KernelSource:
    """The kernel pooling an (n, c, h, w) tensor held in `layout` into the same layout."""
    n, c, h, w = shape
    _, _, p, q = geometry.output_shape(shape)
    lanes = 1 if layout == NCHW else layout_block(layout)
    (top, _), (left, _) = geometry.pads
    (count_top, count_bottom), (count_left, count_right) = geometry.counted
    defines = dict(H=h, W=w, P=p, Q=q, KH=geometry.kernel[0], KW=geometry.kernel[1], SH=geometry.strides[0],
                   SW=geometry.strides[1], PT=top, PL=left, LANES=lanes, PLANES=n * -(-c // lanes),
                   COUNT_H_LO=-count_top, COUNT_H_HI=h + count_bottom, COUNT_W_LO=-count_left,
                   COUNT_W_HI=w + count_right)
    entry = f"{geometry.kind}_pool"
    vb = lanes if 1 < lanes <= dialect.max_vector_width else 1  # a vector per pixel, where the language has one
    text = render_template("shared/pool.j2", dialect=dialect, entry=entry, kind=geometry.kind, defines=defines, vb=vb,
                           nchw=lanes == 1, unroll_taps=geometry.kernel[0] * geometry.kernel[1] <= MAX_UNROLLED_TAPS)
    return KernelSource(text, entry, dialect.name, (q * lanes // vb, p, n * -(-c // lanes)), None,
                        (KernelArg("src", "input"), KernelArg("dst", "output")))


class DevicePool:
    """A pooling prepared once for one input shape and layout (its kernel compiled and bound):
    `pool(array)` enqueues it after what is queued before and returns the result, a new device
    array in the same layout, which later kernels read in order."""

    def __init__(self, runtime: Runtime, shape: tuple[int, int, int, int], layout: str,
                 geometry: PoolGeometry) -> None:
        self.runtime, self.layout = runtime, layout
        self.output_shape = geometry.output_shape(shape)
        if min(self.output_shape[2:]) < 1:
            raise ValueError(f"pooling: a {geometry.kernel} window over {shape[2:]} leaves no output")
        source = pool_source(shape, layout, geometry, runtime.dialect)
        self._enqueue = runtime.bind(runtime.kernel(source), source)

    def __call__(self, value: Any) -> Any:
        runtime = self.runtime
        buffer = runtime.device_buffer(value, "input")
        array, _ = enqueue_into_new_array(runtime, self._enqueue, {"input": buffer},
                                          array_shape(self.output_shape, self.layout), (value, buffer))
        return array.viewed_as(self.layout, self.output_shape) if self.layout != NCHW else array
