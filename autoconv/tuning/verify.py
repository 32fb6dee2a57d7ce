"""Verification shared by the tuner, export, compare and the tests: random never-zero operands,
the float64 reference, and the relative-error check every kernel must pass."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from autoconv import epilogue
from autoconv.algorithms.direct import direct_conv, host_working_bytes
from autoconv.layouts import NCHW, to_layout, to_nchw
from autoconv.resources import check_host
from autoconv.spec import ConvSpec

# Relative error a float32 result may have against the float64 reference.
TOLERANCE = 1e-4


Operands = Union[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]],
                 tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]]


def random_operands(spec: ConvSpec, seed: int = 0) -> Operands:
    """Random, never-zero float32 (input, weight, bias or None), and the residual after them when
    the layer adds one: the order PreparedConv.run takes them (`conv.run(*operands)`). The input
    and the residual are in the layer's layout (a blocked layout's padding channels zero)."""
    # float64 draws for magnitude and sign, then the float32 arrays: about five times their size.
    check_host(f"random operands for {spec}",
               5 * (spec.input_bytes + spec.weight_bytes + (spec.output_bytes if spec.residual else 0)))
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        # Uniform in ±[0.5, 1.5): no zeros, so a skipped term always changes the result.
        magnitude = rng.uniform(0.5, 1.5, size=shape)
        return (magnitude * rng.choice((-1.0, 1.0), size=shape)).astype(np.float32)

    x, weight = to_layout(draw(spec.input_shape), spec.layout), draw(spec.weight_shape)
    bias = draw((spec.k,)) if spec.bias else None
    if spec.residual:
        return x, weight, bias, to_layout(draw(spec.output_shape), spec.layout)
    return x, weight, bias


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    """max |result - reference| / max |reference|; NaN anywhere (an unwritten element) is infinite."""
    if result.shape != reference.shape or not np.all(np.isfinite(result)):
        return float("inf")
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(result.astype(np.float64) - reference))) / scale


def reference_output(spec: ConvSpec, operands: tuple[np.ndarray | None, ...]) -> np.ndarray:
    """The float64 reference result every generated kernel is checked against (direct loops in
    float64 on the host, then the epilogue), in the layer's layout."""
    check_host(f"the float64 reference of {spec}", host_working_bytes(spec, 8))
    x, weight, bias, residual = (*operands, None, None)[:4]
    assert x is not None and weight is not None
    if spec.layout != NCHW:
        plain = spec.replace(layout=NCHW)
        unblocked = None if residual is None else to_nchw(residual, spec.layout, spec.k)
        result = reference_output(plain, (to_nchw(x, spec.layout, spec.c), weight, bias, unblocked))
        return to_layout(result, spec.layout)
    return epilogue.apply(spec, direct_conv(spec, x, weight, bias, np.float64), residual)
