"""autoconv.conv2d: torch.nn.functional.conv2d's signature on numpy arrays (or device arrays), run
by the plan the tuning databases give (or a forced algorithm), through the default Session's
prepared convs; autoconv.to_device puts a host array on a device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from autoconv.algorithms import get_algorithm
from autoconv.backends.base import Backend
from autoconv.backends.reorder import relayout
from autoconv.backends.runtime import is_device_backend
from autoconv.errors import InvalidSpecError
from autoconv.layouts import LAYOUTS, NCHW
from autoconv.plan import Plan
from autoconv.serve.runner import batched_shape, host_operand
from autoconv.serve.session import Session, default_session, device_runtime
from autoconv.spec import ConvSpec, IntOrPair, as_pair
from autoconv.tensors import as_float_array


def choose_plan(spec: ConvSpec, backend: Backend, db: str | Path | None = None, *, algorithm: str | None = None,
                session: Session | None = None) -> Plan:
    """The plan a backend runs a spec with when the caller does not pass one (Session.choose_plan)."""
    return (session or default_session()).choose_plan(spec, backend, db, algorithm=algorithm)


def backend_for(plan: Plan, backend: Backend, session: Session | None = None) -> Backend:
    """Where a plan runs: the device backend, or the host (Session.backend_for)."""
    return (session or default_session()).backend_for(plan, backend)


def to_device(array: Any, *, backend: str = "opencl", device: int | str | None = None, layout: str = NCHW) -> Any:
    """A float32 copy of an NCHW host array on a device, for layers chained there: an
    autoconv.DeviceArray on OpenCL, a CuPy array on CUDA (the default session's backend, so every
    layer on that device reads it). `layout` "NCHW{b}c" (b in 4, 8, 16) keeps it channel-blocked
    (OpenCL), reordered on the device. numpy.asarray brings a device array home, as NCHW."""
    if layout not in LAYOUTS:
        raise InvalidSpecError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    chosen = default_session().backend(backend, device)
    if not is_device_backend(chosen):
        raise InvalidSpecError(f"backend: {backend!r} computes on the host; it has no device arrays")
    host = as_float_array(array, "array")
    if layout != NCHW and host.ndim != 4:
        raise InvalidSpecError(f"array: a {layout} array is 4-D (n, c, h, w), got shape {host.shape}")
    adopted = chosen.adopt(np.array(host, dtype=np.float32, order="C", copy=True))
    return adopted if layout == NCHW else relayout(chosen, adopted, layout)


def layer_spec(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: IntOrPair, padding: Any,
               dilation: IntOrPair, groups: int, has_bias: bool, session: Session | None = None) -> ConvSpec:
    """The ConvSpec of a conv2d call with these shapes and arguments, memoised by the session (a
    model calls the same few layers again and again). The memo's key holds each argument's
    type, so True is not taken for 1 nor a refused value for an accepted one."""
    def build() -> ConvSpec:
        begin, end = resolve_padding(padding, stride, dilation, weight_shape)
        return ConvSpec.from_shapes(input_shape, weight_shape, stride=stride, padding=begin, dilation=dilation,
                                    groups=groups, bias=has_bias, padding_end=end)

    try:
        key = (input_shape, weight_shape, _typed(stride), _typed(padding), _typed(dilation), _typed(groups),
               has_bias)
        hash(key)
    except TypeError:  # an argument that cannot be a key: checked (and refused) the long way
        return build()
    return (session or default_session()).memoised_spec(key, build)


def _typed(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_typed(item) for item in value))
    return (type(value), value)


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

    Weights changed in place are always seen (compared by contents, or read in place). To make a
    loop of calls cheap, the session keeps the last layers it prepared (up to 64), and each holds
    the weight and bias arrays of its latest call: those arrays stay alive after you drop them,
    until 64 other layers have been used or `autoconv.default_session().clear_cache()` is called.
    A layer you call often is better made once as `autoconv.Conv2d`, which holds its own copy.
    """
    session = default_session()
    chosen_backend = session.backend(backend, device)
    runtime = device_runtime(chosen_backend)
    on_device = runtime is not None and runtime.device_buffer(input, "input") is not None
    x = input if on_device else as_float_array(input, "input")
    w = host_operand(weight, "weight")
    b = None if bias is None else host_operand(bias, "bias")
    if b is not None and b.ndim != 1:
        raise InvalidSpecError(f"bias: expected a 1-D array of k values, got shape {b.shape}")
    unbatched = len(x.shape) == 3
    shape = batched_shape(tuple(x.shape))
    if w.ndim != 4:
        raise InvalidSpecError(f"weight: expected a 4-D (k, c/groups, r, s) array, got shape {w.shape}")
    batch = shape[0]
    # An empty batch is a valid call (torch returns an empty result): the layer is checked as if
    # it had one image, and nothing runs.
    spec = layer_spec((max(batch, 1), *shape[1:]), w.shape, stride, padding, dilation, groups, b is not None,
                      session)
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
        return out[0] if unbatched else (runtime.adopt(out) if runtime is not None and on_device else out)
    chosen_plan = plan or session.choose_plan(spec, chosen_backend, db, algorithm=algorithm)
    out = session.runner(spec, chosen_backend, chosen_plan)(x, weight=w, bias=b)
    return out.reshape(out.shape[1:]) if unbatched else out


def resolve_padding(padding: Any, stride: IntOrPair, dilation: IntOrPair,
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
