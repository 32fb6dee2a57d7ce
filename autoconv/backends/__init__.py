"""Backends by name. Heavy imports (pyopencl, cupy) happen only when that backend is asked for.

create_backend makes a new one; autoconv.get_backend (the default Session's) shares one per
(name, device) so compiled kernels are reused across calls."""

from __future__ import annotations

from autoconv.backends.base import Backend, PreparedConv, Timing
from autoconv.errors import BackendUnavailableError

BACKEND_NAMES = ("opencl", "cuda", "numpy")


def create_backend(name: str = "opencl", device: int | str | None = None, *, host_memory: str | None = None) -> Backend:
    """A new backend of that name on a device (an index, a name fragment, or None for the default).
    host_memory forces how host arrays reach a device backend's kernels ("shared", "mapped" or
    "staged", where the device can; None: what it supports best)."""
    if name not in BACKEND_NAMES:
        raise BackendUnavailableError(f"backend: {name!r} is not one of {BACKEND_NAMES}")
    if name == "numpy":
        from autoconv.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "opencl":
        from autoconv.backends.opencl import OpenCLBackend

        return OpenCLBackend(device, host_memory=host_memory)
    from autoconv.backends.cuda import CudaBackend

    return CudaBackend(device, host_memory=host_memory)


def get_backend(name: str = "opencl", device: int | str | None = None) -> Backend:
    """The default session's shared backend of that name on a device."""
    from autoconv.serve.session import default_session

    return default_session().backend(name, device)


__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailableError", "PreparedConv", "Timing", "create_backend",
           "get_backend"]
