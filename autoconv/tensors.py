"""Checks on the arrays handed to a convolution, so a bad operand fails with a precise message."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.errors import InvalidSpecError
from autoconv.spec import ConvSpec


def as_float_array(value: Any, name: str) -> np.ndarray:
    """A host array from numpy input (or anything with __array__); refuses anything that is not
    floating point, as torch's conv2d refuses integer and boolean tensors."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's bad input
        raise InvalidSpecError(f"{name}: cannot be read as an array ({exc})") from None
    if array.dtype.kind != "f":
        raise InvalidSpecError(f"{name}: expected a floating-point array (float16, float32 or float64), "
                               f"got dtype {array.dtype}")
    return array


def check_operands(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   residual: Any = None) -> None:
    """The arrays must have exactly the shapes the spec describes (the residual: the output's)."""
    if tuple(x.shape) != spec.input_array_shape:
        raise InvalidSpecError(f"input: expected shape {spec.input_array_shape}{_in_layout(spec)}, got {tuple(x.shape)}")
    if tuple(weight.shape) != spec.weight_shape:
        raise InvalidSpecError(f"weight: expected shape {spec.weight_shape}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (spec.k,):
        raise InvalidSpecError(f"bias: expected shape ({spec.k},), got {tuple(bias.shape)}")
    if bias is None and spec.bias:
        raise InvalidSpecError("bias: the spec has bias=True but no bias array was given")
    if bias is not None and not spec.bias:
        raise InvalidSpecError("bias: a bias array was given for a spec with bias=False")
    check_residual(spec, residual)


def check_residual(spec: ConvSpec, residual: Any) -> None:
    """A residual exactly when the layer adds one, of the output's shape."""
    if residual is None and spec.residual:
        raise InvalidSpecError(f"residual: the layer adds a residual of shape {spec.output_array_shape}{_in_layout(spec)}, "
                               "but none was given")
    if residual is not None and not spec.residual:
        raise InvalidSpecError("residual: given for a layer without one (build it with residual=True)")
    if residual is not None and tuple(residual.shape) != spec.output_array_shape:
        raise InvalidSpecError(f"residual: expected the output's shape {spec.output_array_shape}{_in_layout(spec)}, "
                               f"got {tuple(residual.shape)}")


def _in_layout(spec: ConvSpec) -> str:
    return "" if spec.layout == "NCHW" else f" ({spec.layout})"
