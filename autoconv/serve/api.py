"""autoconv.conv2d: torch.nn.functional.conv2d's signature on numpy arrays, run by the plan the
tuning databases give (or a forced algorithm), through the default Session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from autoconv.algorithms import BASELINE, get_algorithm
from autoconv.backends.base import Backend
from autoconv.errors import InvalidSpecError
from autoconv.plan import Plan
from autoconv.serve.session import Session, default_session
from autoconv.spec import ConvSpec, IntOrPair, as_pair
from autoconv.tensors import as_float_array


def choose_plan(spec: ConvSpec, backend: Backend, db: str | Path | None = None, *, algorithm: str | None = None,
                session: Session | None = None) -> Plan:
    """The plan a backend runs a spec with when the caller does not pass one: the tuning DBs'
    answer, or on the host backend the library baseline (unless an algorithm is forced)."""
    session = session or default_session()
    if backend.name == "numpy":
        chosen = algorithm or BASELINE
        if chosen not in backend.algorithms:
            raise InvalidSpecError(f"algorithm: the numpy backend runs {backend.algorithms}, not {chosen!r}")
        return Plan(chosen, None, "host")
    return session.lookup(spec, backend, db, algorithm=algorithm)


def backend_for(plan: Plan, backend: Backend, session: Session | None = None) -> Backend:
    """Where a plan runs: the device backend, or the host when the algorithm has host code the
    device backend does not run (the library baseline on OpenCL: numpy's BLAS)."""
    if plan.algorithm in backend.algorithms:
        return backend
    if get_algorithm(plan.algorithm).host_code:
        return (session or default_session()).backend("numpy")
    raise InvalidSpecError(f"plan: the {backend.name} backend cannot run {plan.algorithm!r} (runs {backend.algorithms})")


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
    algorithm: str | None = None,
    db: str | Path | None = None,
) -> np.ndarray:
    """2-D convolution of an NCHW input with a (k, c/groups, r, s) weight, as torch's conv2d.

    stride, padding and dilation take an int or a pair; padding also takes "valid" or "same"
    (stride 1 only, as torch). Returns a new float32 NCHW numpy array.

    The plan comes from autoconv.lookup (tuning DB: `db`, else $AUTOCONV_DB or the user's cache,
    then the shipped DBs; an untuned shape falls back to the nearest tuned one, then defaults).
    algorithm= forces one algorithm (autoconv.list_algorithms()): its tuned params for this layer
    and device if any, else its heuristic.
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
    if algorithm is not None:
        get_algorithm(algorithm)  # a precise error for an unknown name
        if plan is not None and plan.algorithm != algorithm:
            raise InvalidSpecError(f"algorithm: {algorithm!r} contradicts the plan's {plan.algorithm!r}")
    session = default_session()
    chosen_backend = session.backend(backend, device)
    chosen_plan = plan or choose_plan(spec, chosen_backend, db, algorithm=algorithm, session=session)
    conv = session.prepared(spec, backend_for(chosen_plan, chosen_backend, session), chosen_plan)
    return conv.run(x, w, b)


def _resolve_padding(padding: Any, stride: IntOrPair, dilation: IntOrPair, weight_shape: tuple[int, ...]) -> IntOrPair:
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    if padding != "same":
        raise InvalidSpecError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    if as_pair(stride, "stride") != (1, 1):
        raise InvalidSpecError("padding: 'same' is only supported with stride 1 (as in torch)")
    dh, dw = as_pair(dilation, "dilation")
    total_h, total_w = dh * (weight_shape[2] - 1), dw * (weight_shape[3] - 1)
    if total_h % 2 or total_w % 2:
        raise InvalidSpecError("padding: 'same' needs an odd (dilated) kernel size here; pass explicit padding")
    return (total_h // 2, total_w // 2)
