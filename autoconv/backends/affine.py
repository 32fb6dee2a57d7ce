"""A per-channel affine map with its activation, y = act(x * scale[c] + shift[c]), on device arrays
as a generated kernel (templates/shared/affine.j2), in the array's own layout (NCHW or NCHW{b}c):
a model's BatchNormalization that follows no convolution (DenseNet's pre-activation BN + Relu)
stays on the device between the layers around it instead of three numpy passes on the host."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.backends.runtime import Runtime, enqueue_into_new_array
from autoconv.spec import ACTIVATIONS
from autoconv.layouts import NCHW, array_shape, layout_block
from autoconv.render import KernelArg, KernelSource, render_template


def affine_source(shape: tuple[int, int, int, int], layout: str, activation: str, dialect: Any) -> KernelSource:
    """The kernel mapping an (n, c, h, w) tensor held in `layout` into the same layout."""
    n, c, h, w = shape
    lanes = 1 if layout == NCHW else layout_block(layout)
    blocks = -(-c // lanes)
    defines = dict(PIXELS=h * w, LANES=lanes, BLOCKS=blocks, PLANES=n * blocks)
    vb = lanes if 1 < lanes <= dialect.max_vector_width else 1  # a vector per pixel, where the language has one
    entry = "channel_affine"
    text = render_template("shared/affine.j2", dialect=dialect, entry=entry, defines=defines, vb=vb,
                           activation=activation)
    width = h * w if vb > 1 else h * w * lanes
    return KernelSource(text, entry, dialect.name, (width, n * blocks, 1), None,
                        (KernelArg("src", "input"), KernelArg("scale", "weight"), KernelArg("shift", "bias"),
                         KernelArg("dst", "output")))


class DeviceAffine:
    """A per-channel affine map prepared once for one input shape and layout: its kernel compiled
    and bound, scale and shift resident on the device (padded with zeros to whole blocks).
    `affine(array)` enqueues it after what is queued before and returns the result, a new device
    array in the same layout."""

    def __init__(self, runtime: Runtime, shape: tuple[int, int, int, int], layout: str, scale: np.ndarray,
                 shift: np.ndarray, activation: str = "none") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        channels = shape[1]
        if np.shape(scale) != (channels,) or np.shape(shift) != (channels,):
            raise ValueError(f"scale and shift: expected {channels} values each, got {np.shape(scale)} and "
                             f"{np.shape(shift)}")
        self.runtime, self.layout, self.shape = runtime, layout, shape
        lanes = 1 if layout == NCHW else layout_block(layout)
        slots = -(-channels // lanes) * lanes
        self._factors = []
        for values in (scale, shift):
            padded = np.zeros(slots, dtype=np.float32)
            padded[:channels] = values
            buffer = runtime.alloc(padded.nbytes)
            runtime.upload(buffer, padded)
            self._factors.append(buffer)
        source = affine_source(shape, layout, activation, runtime.dialect)
        self._enqueue = runtime.bind(runtime.kernel(source), source)

    def __call__(self, value: Any) -> Any:
        runtime = self.runtime
        buffer = runtime.device_buffer(value, "input")
        scale, shift = self._factors
        array, _ = enqueue_into_new_array(runtime, self._enqueue, {"input": buffer, "weight": scale, "bias": shift},
                                          array_shape(self.shape, self.layout), (value, buffer))
        return array.viewed_as(self.layout, self.shape) if self.layout != NCHW else array
