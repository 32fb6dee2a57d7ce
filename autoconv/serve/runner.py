"""One layer shape made ready to serve: its plan, its prepared conv, and how the caller's arrays
(host arrays, or device arrays of the layer's device) reach it. Shared by autoconv.Conv2d and
autoconv.conv2d, so both pay the same small cost per call."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.backends.base import PreparedConv
from autoconv.backends.runtime import DeviceBackend
from autoconv.errors import InvalidSpecError
from autoconv.layouts import NCHW
from autoconv.plan import Plan
from autoconv.spec import ConvSpec
from autoconv.tensors import as_float_array


def host_operand(value: Any, name: str) -> np.ndarray:
    """A float32, C-ordered host array of a floating-point operand (no copy when it is one)."""
    if type(value) is not np.ndarray or value.dtype != np.float32 or not value.flags.c_contiguous:
        value = np.ascontiguousarray(as_float_array(value, name), dtype=np.float32)
    return value


def batched_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An input's (n, c, h, w): an unbatched (c, h, w) input is one image."""
    if len(shape) not in (3, 4):
        raise InvalidSpecError(f"input: expected a 3-D (c, h, w) unbatched or 4-D (n, c, h, w) array, "
                               f"got shape {shape}")
    return (1, *shape) if len(shape) == 3 else shape


def check_shape(shape: tuple[int, ...], expected: tuple[int, ...], name: str) -> None:
    if shape != expected:
        raise InvalidSpecError(f"{name}: expected shape {expected}, got {shape}")


class Runner:
    """Calls of one prepared conv. `runtime` is the device backend whose device arrays the
    caller may pass (None on the numpy backend); a device input gives a device result. A plan
    that runs on the host (the library baseline on OpenCL) reads device arrays through
    numpy.asarray, no copy where the device shares host memory, and returns them adopted."""

    def __init__(self, spec: ConvSpec, plan: Plan, conv: PreparedConv, runtime: DeviceBackend | None, *,
                 on_device: bool) -> None:
        self.spec, self.plan, self.conv, self.runtime = spec, plan, conv, runtime
        self.on_device = on_device  # the conv runs on `runtime` (else on the host)
        self._output_shape = spec.output_array_shape

    def operand(self, value: Any, name: str, tensor_shape: tuple[int, ...],
                stored_shape: tuple[int, ...]) -> tuple[Any, bool]:
        """(what the prepared conv reads, whether it is a device buffer) for an input or residual
        whose batch dimension the caller has already added: a device array of the layer's layout
        and tensor shape, or a host array of the layout's stored shape."""
        runtime = self.runtime
        if runtime is not None and type(value) is not np.ndarray:
            buffer = runtime.device_buffer(value, name)
            if buffer is not None:
                layout = getattr(value, "layout", NCHW)
                if layout != self.spec.layout:
                    raise InvalidSpecError(f"{name}: a {layout} device array, for a layer that computes in "
                                           f"{self.spec.layout}")
                shape = tuple(value.shape)
                if len(shape) == len(tensor_shape) - 1:  # unbatched: the caller's shape lacks the batch
                    shape = (1, *shape)
                check_shape(shape, tensor_shape, name)
                if not self.on_device:  # host code reads it where it is
                    return host_operand(np.asarray(value).reshape(stored_shape), name), True
                return buffer, True
        array = host_operand(value, name)
        if array.ndim == len(stored_shape) - 1:
            array = array[None]
        check_shape(array.shape, stored_shape, name)
        return array, False

    def __call__(self, x: Any, residual: Any = None, *, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None) -> Any:
        """The layer's result: a device array when `x` is one, else a host array. `weight` and
        `bias` (float32 host arrays) are this call's own: compared with the loaded ones where
        the plan derives anything from them, else read in place."""
        spec = self.spec
        operand, on_device = self.operand(x, "input", spec.input_shape, spec.input_array_shape)
        if (residual is not None) != spec.residual:
            raise InvalidSpecError("residual: given for a layer built without one" if residual is not None
                                   else "residual: the layer adds a residual but none was given")
        extra = (None if residual is None
                 else self.operand(residual, "residual", spec.output_shape, self._output_shape)[0])
        conv = self.conv
        device_output = on_device and self.on_device
        if weight is not None and not conv.lends_weights:
            # Compared by contents (an array changed in place is reloaded), and held loaded until
            # this call's kernels are queued: another caller's weights may be next.
            with conv.lock:
                conv.ensure_weights(weight, bias)
                result = conv.call(operand, extra, device_output=device_output)
        else:
            result = conv.call(operand, extra, weight=weight, bias=bias, device_output=device_output)
        if on_device and not self.on_device and self.runtime is not None:
            result = self.runtime.adopt(result)
        if on_device and spec.layout != NCHW:  # only DeviceArrays carry a layout (operand refused others)
            return result.viewed_as(spec.layout, spec.output_shape)
        return result
