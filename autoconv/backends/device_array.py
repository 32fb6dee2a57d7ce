"""DeviceArray: a float32 array in an OpenCL device's memory, what an autoconv layer returns for a
device input, so that layers chained on one device never copy to the host between them.

On CUDA, CuPy arrays play this part (and anything with DLPack or __cuda_array_interface__ goes
in); this class is the small OpenCL equivalent."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.device import DeviceInfo


class DeviceArray:
    """A float32, C-ordered array on one OpenCL device (see autoconv.to_device).

    It may still be being computed: kernels later on the same device read it in order, and
    `numpy.asarray(array)` (or `.numpy()`) waits for it and brings it home. On a device that
    computes in host memory (PoCL's CPU device), `numpy.asarray` is a view of that memory, no
    copy, as torch's `Tensor.numpy()` is of a CPU tensor; `.numpy()` is always a copy.
    """

    __slots__ = ("runtime", "buffer", "shape", "_host", "_ready")
    dtype = np.dtype(np.float32)

    def __init__(self, runtime: Any, buffer: Any, shape: tuple[int, ...], *, host: np.ndarray | None = None,
                 ready: Any = None) -> None:
        self.runtime = runtime  # the backend whose queue computes it
        self.buffer = buffer
        self.shape = tuple(int(v) for v in shape)
        self._host = host  # the same memory seen from the host, on devices that compute in it
        self._ready = ready  # the event after which the contents are complete (None: they are)

    @property
    def device(self) -> DeviceInfo:
        return self.runtime.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

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
        if int(np.prod(new)) != self.size:
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
            return self._host.copy()
        out = np.empty(self.shape, dtype=np.float32)
        if out.size:
            self.runtime.download(out, self.buffer)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self._host is not None:
            self.wait()
            host = self._host.copy() if copy else self._host
        elif copy is False:
            raise ValueError(f"a DeviceArray on {self.device.name} (memory of its own) cannot be read without a copy")
        else:
            host = self.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype=float32, device={self.device.name!r})"
