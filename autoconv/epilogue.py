"""The fused epilogue: what a layer does to the convolution's result before storing it (bias, then
a residual operand, then an activation), in one place for the templates, the host path and the
float64 reference, so the three cannot drift apart."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoconv.render import KernelArg
from autoconv.spec import ConvSpec

# What a template renders when a kernel writes scratch rather than the layer's output.
NO_EPILOGUE = {"activation": "none", "residual": False}


def template_vars(spec: ConvSpec) -> dict[str, object]:
    """The `epilogue` variable of templates/shared/epilogue.j2 for a layer."""
    return {"activation": spec.activation, "residual": spec.residual}


def residual_args(spec: ConvSpec) -> tuple[KernelArg, ...]:
    """The kernel argument after `out` of every kernel that writes the output (none without one)."""
    return (KernelArg("residual", "residual"),) if spec.residual else ()


def apply(spec: ConvSpec, out: Any, residual: Any, xp: Any = np) -> Any:
    """The epilogue after the bias, in place on `out` (whose dtype it keeps); returns `out`.
    `xp` is the array module of `out` (numpy, or CuPy for cuBLAS results); `residual` holds the
    output's elements in order (any shape)."""
    if spec.residual:
        if residual is None:
            raise ValueError("the layer has a residual but none was given")
        out += residual.reshape(out.shape).astype(out.dtype, copy=False)
    if spec.activation == "relu":
        xp.maximum(out, 0, out=out)
    elif spec.activation == "relu6":
        xp.clip(out, 0, 6, out=out)
    return out
