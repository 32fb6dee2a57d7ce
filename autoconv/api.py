"""autoconv.conv2d: torch.nn.functional.conv2d's signature on numpy arrays, run by a generated kernel."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from autoconv.backends import get_backend
from autoconv.backends.base import Backend, PreparedConv
from autoconv.errors import InvalidSpecError
from autoconv.lookup import baseline_plan, lookup
from autoconv.plan import Plan
from autoconv.render import ALGORITHM_IM2COL_BLAS
from autoconv.spec import ConvSpec, IntOrPair
from autoconv.tensors import as_float_array

_prepared: dict[tuple[int, ConvSpec, Plan], PreparedConv] = {}
_prepared_lock = threading.Lock()
_MAX_PREPARED = 64  # each holds device buffers; keep the most recent few


def choose_plan(spec: ConvSpec, backend: Backend, db: str | Path | None = None) -> Plan:
    """The plan a backend runs a spec with when the caller does not pass one: the tuning DBs'
    answer (autoconv.lookup), or the library baseline on the host backend."""
    if backend.name == "numpy":
        return baseline_plan("baseline")
    return lookup(spec, backend, db)


def backend_for(plan: Plan, backend: Backend) -> Backend:
    """Where a plan runs: the device backend, or the host when the plan is a baseline the device
    backend has no kernel for (numpy's BLAS beat every generated OpenCL kernel on that layer)."""
    if plan.algorithm in backend.algorithms:
        return backend
    if plan.algorithm == ALGORITHM_IM2COL_BLAS:
        return get_backend("numpy")
    raise InvalidSpecError(f"plan: the {backend.name} backend cannot run {plan.algorithm!r} (runs {backend.algorithms})")


def prepared(spec: ConvSpec, backend: Backend, plan: Plan) -> PreparedConv:
    """A prepared conv reused across calls with the same spec, backend and plan."""
    key = (id(backend), spec, plan)
    with _prepared_lock:
        conv = _prepared.get(key)
        if conv is None:
            if len(_prepared) >= _MAX_PREPARED:
                _prepared.pop(next(iter(_prepared)))
            conv = backend.prepare(spec, plan)
            _prepared[key] = conv
        return conv


def conv2d(
    input: Any,
    weight: Any,
    bias: Any | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backend: str = "opencl",
    device: int | str | None = None,
    plan: Plan | None = None,
    db: str | Path | None = None,
) -> np.ndarray:
    """2-D convolution of an NCHW input with a (k, c/groups, r, s) weight, as torch's conv2d.

    stride, padding and dilation take an int or a pair; padding also takes "valid" or "same"
    (stride 1 only, as torch). Returns a new float32 NCHW numpy array.

    The plan comes from autoconv.lookup (tuning DB: `db`, else $AUTOCONV_DB or the user's cache,
    then the shipped DBs; an untuned shape falls back to the nearest tuned one, then defaults).
    """
    x = as_float_array(input, "input")
    w = as_float_array(weight, "weight")
    b = None if bias is None else as_float_array(bias, "bias")
    if b is not None and b.ndim != 1:
        raise InvalidSpecError(f"bias: expected a 1-D array of k values, got shape {b.shape}")
    if x.ndim != 4:
        raise InvalidSpecError(f"input: expected a 4-D NCHW array, got shape {x.shape}")
    if w.ndim != 4:
        raise InvalidSpecError(f"weight: expected a 4-D (k, c/groups, r, s) array, got shape {w.shape}")
    padding = _resolve_padding(padding, stride, dilation, w.shape)
    spec = ConvSpec.from_shapes(x.shape, w.shape, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, bias=b is not None)
    if plan is not None and not isinstance(plan, Plan):
        raise InvalidSpecError(f"plan: expected an autoconv.Plan (or None for the tuned plan), got {plan!r}")
    chosen_backend = get_backend(backend, device)
    chosen_plan = plan or choose_plan(spec, chosen_backend, db)
    conv = prepared(spec, backend_for(chosen_plan, chosen_backend), chosen_plan)
    return conv.run(x, w, b)


def _resolve_padding(padding: Any, stride: IntOrPair, dilation: IntOrPair, weight_shape: tuple[int, ...]) -> IntOrPair:
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    if padding != "same":
        raise InvalidSpecError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    from autoconv.spec import as_pair

    if as_pair(stride, "stride") != (1, 1):
        raise InvalidSpecError("padding: 'same' is only supported with stride 1 (as in torch)")
    dh, dw = as_pair(dilation, "dilation")
    total_h, total_w = dh * (weight_shape[2] - 1), dw * (weight_shape[3] - 1)
    if total_h % 2 or total_w % 2:
        raise InvalidSpecError("padding: 'same' needs an odd (dilated) kernel size here; pass explicit padding")
    return (total_h // 2, total_w // 2)
