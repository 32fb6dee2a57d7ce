"""DeviceArray: a float32 array in an OpenCL device's memory, what an autoconv layer returns for a
device input, so that layers chained on one device never copy to the host between them.

On CUDA, CuPy arrays play this part (and anything with DLPack or __cuda_array_interface__ goes
in); this class is the small OpenCL equivalent."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from autoconv.device import DeviceInfo
from autoconv.layouts import NCHW, array_shape, to_nchw


class DeviceArray:
    """A float32, C-ordered array on one OpenCL device (see autoconv.to_device).

    It may still be being computed: kernels later on the same device read it in order, and
    `numpy.asarray(array)` (or `.numpy()`) waits for it and brings it home. On a device that
    computes in host memory (PoCL's CPU device), `numpy.asarray` is a view of that memory, no
    copy, as torch's `Tensor.numpy()` is of a CPU tensor; `.numpy()` is always a copy.

    `layout` is how the memory holds the tensor: "NCHW", or a channel-blocked "NCHW{b}c"
    (autoconv.layouts), whose memory is `storage_shape` (n, ceil(c/b), h, w, b) while `shape` stays
    the tensor's (n, c, h, w), as a channels-last torch tensor keeps its shape. `numpy.asarray`
    and `.numpy()` always give NCHW: a blocked array is reordered then (a copy).
    """

    __slots__ = ("runtime", "buffer", "shape", "layout", "_host", "_ready")
    dtype = np.dtype(np.float32)

    def __init__(self, runtime: Any, buffer: Any, shape: tuple[int, ...], *, host: np.ndarray | None = None,
                 ready: Any = None, layout: str = NCHW) -> None:
        self.runtime = runtime  # the backend whose queue computes it
        self.buffer = buffer
        self.shape = tuple(int(v) for v in shape)
        self.layout = layout
        if layout != NCHW and len(self.shape) != 4:
            raise ValueError(f"layout: a {layout} array is 4-D (n, c, h, w), not of shape {self.shape}")
        self._host = host  # the same memory seen from the host (storage_shape), on devices that compute in it
        self._ready = ready  # the event after which the contents are complete (None: they are)

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The shape of the memory: `shape` for NCHW, (n, ceil(c/b), h, w, b) blocked."""
        return self.shape if self.layout == NCHW else array_shape(self.shape, self.layout)  # type: ignore[arg-type]

    def viewed_as(self, layout: str, shape: tuple[int, ...]) -> "DeviceArray":
        """The same memory read as a tensor of `shape` in `layout` (no copy; the sizes must agree)."""
        view = DeviceArray(self.runtime, self.buffer, shape, host=None, ready=self._ready, layout=layout)
        if math.prod(view.storage_shape) != math.prod(self.storage_shape):
            raise ValueError(f"cannot view {self.storage_shape} as {layout} {shape}")
        view._host = None if self._host is None else self._host.reshape(view.storage_shape)
        return view

    @property
    def device(self) -> DeviceInfo:
        return self.runtime.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Elements of the memory (a blocked layout's padding channels included)."""
        return math.prod(self.storage_shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def reshape(self, *shape: Any) -> "DeviceArray":
        """The same memory seen with another shape of as many elements (no copy)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        new = tuple(int(v) for v in shape)
        if self.layout != NCHW:
            raise ValueError(f"cannot reshape a {self.layout} DeviceArray (numpy.asarray gives it as NCHW)")
        if math.prod(new) != self.size:
            raise ValueError(f"cannot reshape a DeviceArray of {self.size} elements to {new}")
        host = None if self._host is None else self._host.reshape(new)
        return DeviceArray(self.runtime, self.buffer, new, host=host, ready=self._ready)

    def wait(self) -> None:
        """Block until the array's contents are complete."""
        if self._ready is not None:
            self.runtime.wait([self._ready])
            self._ready = None

    def numpy(self) -> np.ndarray:
        """A host copy of the contents (waits for them)."""
        self.wait()
        if self._host is not None:
            stored = self._host.copy() if self.layout == NCHW else self._host
        else:
            stored = np.empty(self.storage_shape, dtype=np.float32)
            if stored.size:
                self.runtime.download(stored, self.buffer)
        return to_nchw(stored, self.layout, self.shape[1]) if self.layout != NCHW else stored

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self.layout != NCHW:
            if copy is False:
                raise ValueError(f"a {self.layout} DeviceArray cannot be read as NCHW without a copy")
            host = self.numpy()
        elif self._host is not None:
            self.wait()
            host = self._host.copy() if copy else self._host
        elif copy is False:
            raise ValueError(f"a DeviceArray on {self.device.name} (memory of its own) cannot be read without a copy")
        else:
            host = self.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __repr__(self) -> str:
        layout = "" if self.layout == NCHW else f", layout={self.layout!r}"
        return f"DeviceArray(shape={self.shape}, dtype=float32{layout}, device={self.device.name!r})"
