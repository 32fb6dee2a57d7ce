"""autoconv: generated, autotuned convolution kernels (im2col + GEMM, implicit GEMM, Winograd,
direct) for OpenCL and CUDA, chosen per layer against the library BLAS baseline, served through
conv2d and Conv2d layers with fused epilogues and device-resident arrays."""

from importlib import metadata as _metadata

from autoconv.algorithms import Params, get_algorithm, list_algorithms
from autoconv.backends import get_backend
from autoconv.backends.device_array import DeviceArray
from autoconv.errors import (
    AutoconvError,
    BackendUnavailableError,
    InvalidParamsError,
    InvalidSpecError,
    KernelCompileError,
    KernelLaunchError,
    ResourceLimitError,
    TuningDBError,
)
from autoconv.plan import Plan
from autoconv.serve.api import conv2d, to_device
from autoconv.serve.layer import Conv2d
from autoconv.serve.lookup import UnsupportedAlgorithmError
from autoconv.serve.session import Session, default_session, lookup
from autoconv.spec import ConvSpec


def _version() -> str:
    """The one version: pyproject.toml's, through the installed package's metadata."""
    try:
        return _metadata.version("autoconv")
    except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _version()


def default_gemm_params(**overrides: int) -> Params:
    """im2col_gemm's declared defaults with some values replaced (validated like any input)."""
    return get_algorithm("im2col_gemm").space.validate(overrides)


def validate_gemm_params(raw: dict) -> Params:
    """Untrusted data (a DB row, a CLI string) to im2col_gemm params, or InvalidParamsError."""
    return get_algorithm("im2col_gemm").space.validate(raw)


__all__ = [
    "AutoconvError",
    "BackendUnavailableError",
    "Conv2d",
    "ConvSpec",
    "DeviceArray",
    "InvalidParamsError",
    "InvalidSpecError",
    "KernelCompileError",
    "KernelLaunchError",
    "Params",
    "Plan",
    "ResourceLimitError",
    "Session",
    "TuningDBError",
    "UnsupportedAlgorithmError",
    "conv2d",
    "default_gemm_params",
    "default_session",
    "get_algorithm",
    "get_backend",
    "list_algorithms",
    "lookup",
    "to_device",
    "validate_gemm_params",
]
