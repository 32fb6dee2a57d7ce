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

    input is (n, c, h, w), or (c, h, w) unbatched (the result is then (k, p, q)); n may be 0.
    stride, padding and dilation take an int or a pair (a tuple or list); padding also takes
    "valid" or "same" (stride 1 only, as torch; an even dilated kernel extent is padded with the
    extra row and column at the bottom and right, as torch does). Inputs are floating point
    (float16, float32 or float64); the computation is float32 and so is the result.

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
    if x.ndim not in (3, 4):
        raise InvalidSpecError(f"input: expected a 3-D (c, h, w) unbatched or 4-D (n, c, h, w) array, "
                               f"got shape {x.shape}")
    if w.ndim != 4:
        raise InvalidSpecError(f"weight: expected a 4-D (k, c/groups, r, s) array, got shape {w.shape}")
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    begin, end = _resolve_padding(padding, stride, dilation, w.shape)
    batch = x.shape[0]
    # An empty batch is a valid call (torch returns an empty result): the layer is checked as if
    # it had one image, and nothing runs.
    spec = ConvSpec.from_shapes((max(batch, 1), *x.shape[1:]), w.shape, stride=stride, padding=begin,
                                dilation=dilation, groups=groups, bias=b is not None, padding_end=end)
    if plan is not None and not isinstance(plan, Plan):
        raise InvalidSpecError(f"plan: expected an autoconv.Plan (or None for the tuned plan), got {plan!r}")
    if algorithm is not None:
        get_algorithm(algorithm)  # a precise error for an unknown name
        if plan is not None and plan.algorithm != algorithm:
            raise InvalidSpecError(f"algorithm: {algorithm!r} contradicts the plan's {plan.algorithm!r}")
    if b is not None and b.shape != (spec.k,):
        raise InvalidSpecError(f"bias: expected shape ({spec.k},), got {b.shape}")
    if batch == 0:
        out = np.zeros((0, spec.k, spec.p, spec.q), dtype=np.float32)
    else:
        session = default_session()
        chosen_backend = session.backend(backend, device)
        chosen_plan = plan or choose_plan(spec, chosen_backend, db, algorithm=algorithm, session=session)
        conv = session.prepared(spec, backend_for(chosen_plan, chosen_backend, session), chosen_plan)
        out = conv.run(x, w, b)
    return out[0] if unbatched else out


def _resolve_padding(padding: Any, stride: IntOrPair, dilation: IntOrPair,
                     weight_shape: tuple[int, ...]) -> tuple[IntOrPair, tuple[int, int] | None]:
    """(padding before, padding after or None when the same) from torch's padding argument."""
    if not isinstance(padding, str):
        return padding, None
    if padding == "valid":
        return 0, None
    if padding != "same":
        raise InvalidSpecError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    if as_pair(stride, "stride") != (1, 1):
        raise InvalidSpecError("padding: 'same' is not supported for strided convolutions (as in torch)")
    dh, dw = as_pair(dilation, "dilation")
    total_h, total_w = dh * (weight_shape[2] - 1), dw * (weight_shape[3] - 1)
    # torch's split: half before, the odd one after (bottom and right).
    return (total_h // 2, total_w // 2), (total_h - total_h // 2, total_w - total_w // 2)
