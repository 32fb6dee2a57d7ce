"""The algorithm registry: every way autoconv can compute a convolution, by name.

The tuner, the lookup, the backends and export ask the registry and never branch on an
algorithm's name; a new algorithm is one module (plus its templates) registered here."""

from __future__ import annotations

from autoconv.algorithms.base import (
    EMPTY_SPACE,
    Algorithm,
    Constraint,
    LayerConstraint,
    ParamDecl,
    Params,
    ParamSpace,
)
from autoconv.algorithms.blas import Im2colBlas
from autoconv.algorithms.blocked_direct import BlockedDirect
from autoconv.algorithms.depthwise_direct import DepthwiseDirect
from autoconv.algorithms.direct import Direct
from autoconv.algorithms.im2col_gemm import Im2colGemm
from autoconv.algorithms.implicit_gemm import ImplicitGemm
from autoconv.algorithms.winograd import Winograd
from autoconv.errors import InvalidParamsError

IM2COL_GEMM = "im2col_gemm"
IMPLICIT_GEMM = "implicit_gemm"
WINOGRAD = "winograd"
DIRECT = "direct"
BLOCKED_DIRECT = "blocked_direct"
DEPTHWISE_DIRECT = "depthwise_direct"
IM2COL_BLAS = "im2col_blas"
BASELINE = IM2COL_BLAS  # what every generated kernel is compared with

_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm (static configuration: done at import, like entry points)."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"{algorithm!r} does not implement the Algorithm protocol")
    if algorithm.name in _REGISTRY:
        raise ValueError(f"an algorithm named {algorithm.name!r} is already registered")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidParamsError(f"algorithm: {name!r} is not one of {list_algorithms()}") from None


def list_algorithms() -> tuple[str, ...]:
    """The registered algorithm names, in registration order."""
    return tuple(_REGISTRY)


for _algorithm in (Im2colGemm(), ImplicitGemm(), Winograd(), BlockedDirect(), DepthwiseDirect(), Direct(), Im2colBlas()):
    register(_algorithm)

__all__ = ["Algorithm", "BASELINE", "BLOCKED_DIRECT", "Constraint", "DEPTHWISE_DIRECT", "DIRECT", "EMPTY_SPACE", "IM2COL_BLAS", "IM2COL_GEMM",
           "IMPLICIT_GEMM", "LayerConstraint", "ParamDecl", "ParamSpace", "Params", "WINOGRAD",
           "get_algorithm", "list_algorithms", "register"]
