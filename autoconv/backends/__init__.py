"""Backends by name. Heavy imports (pyopencl, cupy) happen only when that backend is asked for."""

from __future__ import annotations

import threading

from autoconv.backends.base import Backend, DeviceInfo, PreparedConv, Timing
from autoconv.errors import BackendUnavailableError

BACKEND_NAMES = ("opencl", "cuda", "numpy")

_instances: dict[tuple[str, int | str | None], Backend] = {}
_lock = threading.Lock()


def get_backend(name: str = "opencl", device: int | str | None = None) -> Backend:
    """The backend of that name on a device (an index, a name fragment, or None for the default).

    Instances are shared per (name, device) so compiled programs are reused across calls.
    """
    if name not in BACKEND_NAMES:
        raise BackendUnavailableError(f"backend: {name!r} is not one of {BACKEND_NAMES}")
    key = (name, device)
    with _lock:
        backend = _instances.get(key)
        if backend is None:
            backend = _create(name, device)
            _instances[key] = backend
        return backend


def _create(name: str, device: int | str | None) -> Backend:
    if name == "numpy":
        from autoconv.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "opencl":
        from autoconv.backends.opencl import OpenCLBackend

        return OpenCLBackend(device)
    from autoconv.backends.cuda import CudaBackend

    return CudaBackend(device)


__all__ = ["Backend", "BackendUnavailableError", "DeviceInfo", "PreparedConv", "Timing", "get_backend"]
