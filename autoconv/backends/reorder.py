"""Reorders of device arrays between NCHW and the channel-blocked layouts, as generated kernels
(templates/shared/reorder.j2) enqueued on a device runtime's queue: later kernels read the result
in order, and nothing goes through the host."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.backends.runtime import Runtime, enqueue_into_new_array
from autoconv.errors import InvalidSpecError
from autoconv.layouts import NCHW, array_shape, layout_block
from autoconv.render import Dialect, KernelArg, KernelSource, render_template


def reorder_source(shape: tuple[int, int, int, int], source: str, target: str, dialect: Dialect) -> KernelSource:
    """The kernel that reorders an (n, c, h, w) tensor from `source` to `target` layout (one of them
    NCHW)."""
    if (source == NCHW) == (target == NCHW):
        raise ValueError(f"layout: a reorder goes between NCHW and a blocked layout, not {source} -> {target}")
    n, c, h, w = shape
    block = layout_block(target if source == NCHW else source)
    blocks = -(-c // block)
    entry = "reorder_to_blocked" if source == NCHW else "reorder_to_nchw"
    text = render_template("shared/reorder.j2", dialect=dialect, entry=entry, channels=c, pixels=h * w,
                           block=block, blocks=blocks, to_blocked=source == NCHW)
    rows = blocks * block if source == NCHW else c
    return KernelSource(text, entry, dialect.name, (h * w, rows, n), None,
                        (KernelArg("src", "input"), KernelArg("dst", "output")))


def reorder_on_device(runtime: Runtime, buffer: Any, shape: tuple[int, int, int, int], source: str,
                      target: str) -> tuple[Any, Any]:
    """A new device array (and its buffer) holding the tensor in `buffer` (layout `source`) in
    layout `target`, reordered by a kernel on the runtime's queue, after what is queued before it;
    a blocked layout goes through NCHW to another block size."""
    if source == target:
        raise ValueError(f"layout: the array is already {target}")
    if source != NCHW and target != NCHW:
        _, planar = reorder_on_device(runtime, buffer, shape, source, NCHW)
        return reorder_on_device(runtime, planar, shape, NCHW, target)
    kernel_source = reorder_source(shape, source, target, runtime.dialect)
    enqueue = runtime.bind(runtime.kernel(kernel_source), kernel_source)
    return enqueue_into_new_array(runtime, enqueue, {"input": buffer}, array_shape(shape, target), (buffer,))


def relayout(runtime: Runtime, value: Any, layout: str) -> Any:
    """A device array of `runtime` holding `value` (an NCHW host array, or a device array of this
    runtime, in any layout) in `layout`: `value` itself when it is one already. Host arrays are
    copied to the device first, then reordered there. Needs a runtime with layout arrays."""
    if not runtime.layout_arrays:
        raise InvalidSpecError(f"layout: {runtime.device.name} ({runtime.device.backend}) keeps device arrays "
                               "in NCHW only; channel-blocked layouts flow between layers on OpenCL")
    if runtime.device_buffer(value, "input") is None:
        value = runtime.adopt(np.ascontiguousarray(np.asarray(value), dtype=np.float32))
    current = getattr(value, "layout", NCHW)
    if current == layout:
        return value
    shape = tuple(value.shape)
    if len(shape) != 4:
        raise InvalidSpecError(f"layout: only 4-D (n, c, h, w) tensors have a {layout} layout, not shape {shape}")
    array, _ = reorder_on_device(runtime, value.buffer, (shape[0], shape[1], shape[2], shape[3]), current, layout)
    return array.viewed_as(layout, shape)


def reorders_ms(runtime: Runtime, input_shape: tuple[int, int, int, int], output_shape: tuple[int, int, int, int],
                layout: str, repeats: int = 5) -> float:
    """The device time (median of `repeats`) of what a `layout` layer costs between NCHW tensors: the
    reorder of its input to `layout` and of its output back to NCHW."""
    stages = []
    for shape, source, target in ((input_shape, NCHW, layout), (output_shape, layout, NCHW)):
        kernel_source = reorder_source(shape, source, target, runtime.dialect)
        planar = runtime.alloc(int(np.prod(shape)) * 4)
        blocked = runtime.alloc(int(np.prod(array_shape(shape, layout))) * 4)
        ends = (planar, blocked) if source == NCHW else (blocked, planar)
        stages.append((runtime.bind(runtime.kernel(kernel_source), kernel_source), {"input": ends[0], "output": ends[1]}))

    def enqueue() -> list[Any]:
        with runtime.lock:
            return [run(buffers) for run, buffers in stages]

    return float(np.median([runtime.elapsed_ms(enqueue) for _ in range(max(1, repeats) + 1)][1:]))
