"""Activation layouts: NCHW, and the channel-blocked NCHW{b}c of TVM and oneDNN (b channels
innermost, so a vector of b channels of one pixel is one load). What each layout's arrays look
like, and the host reorders between them (the device reorders are generated kernels:
autoconv/backends/reorder.py).

A blocked array holds ceil(c / b) blocks; the channels past c in the last block are zero and
never read as data."""

from __future__ import annotations

import numpy as np

NCHW = "NCHW"
BLOCKS = (4, 8, 16)
LAYOUTS = (NCHW, *(f"NCHW{b}c" for b in BLOCKS))


def layout_block(layout: str) -> int:
    """Channels per block: b of NCHW{b}c, 1 for NCHW."""
    if layout == NCHW:
        return 1
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {LAYOUTS}")
    return int(layout[4:-1])


def blocked(layout: str) -> bool:
    return layout != NCHW


def array_shape(shape: tuple[int, int, int, int], layout: str) -> tuple[int, ...]:
    """The shape of an (n, c, h, w) tensor's array in a layout: (n, ceil(c/b), h, w, b) blocked."""
    if not blocked(layout):
        return tuple(shape)
    n, c, h, w = shape
    b = layout_block(layout)
    return (n, -(-c // b), h, w, b)


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW array in `layout` (a new array, padded channels zero; the same array for NCHW)."""
    if not blocked(layout):
        return x
    n, c, h, w = x.shape
    b = layout_block(layout)
    blocks = -(-c // b)
    padded = np.zeros((n, blocks * b, h, w), dtype=x.dtype)
    padded[:, :c] = x
    return np.ascontiguousarray(padded.reshape(n, blocks, b, h, w).transpose(0, 1, 3, 4, 2))


def to_nchw(x: np.ndarray, layout: str, channels: int) -> np.ndarray:
    """A `layout` array of `channels` channels back in NCHW (a new C-ordered array; the same array
    for NCHW)."""
    if not blocked(layout):
        return x
    n, blocks, h, w, b = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(n, blocks * b, h, w)[:, :channels])
