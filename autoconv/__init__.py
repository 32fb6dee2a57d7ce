"""autoconv: generated, autotuned im2col + GEMM convolution kernels for OpenCL and CUDA."""

from autoconv.api import conv2d
from autoconv.backends import get_backend
from autoconv.lookup import lookup
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
from autoconv.params import GemmParams, default_gemm_params, validate_gemm_params
from autoconv.plan import Plan
from autoconv.spec import ConvSpec

__version__ = "0.1.0"

__all__ = [
    "AutoconvError",
    "BackendUnavailableError",
    "ConvSpec",
    "GemmParams",
    "InvalidParamsError",
    "InvalidSpecError",
    "KernelCompileError",
    "KernelLaunchError",
    "Plan",
    "ResourceLimitError",
    "TuningDBError",
    "conv2d",
    "default_gemm_params",
    "get_backend",
    "lookup",
    "validate_gemm_params",
]
