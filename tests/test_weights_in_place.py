"""conv2d never serves weights changed in place, whatever the arrays' flags say: a read-only view
is not immutable (the memory under it can change). Weight and bias, writable and read-only views,
every algorithm and the host plan."""

from __future__ import annotations

import numpy as np
import pytest

import autoconv
from autoconv import ConvSpec
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

SPEC = ConvSpec(1, 8, 10, 10, 8, 3, 3, padding=1, bias=True)


def view(array: np.ndarray, read_only: bool) -> np.ndarray:
    seen = array.view()
    seen.flags.writeable = not read_only
    return seen


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only-view", "writable-view"])
@pytest.mark.parametrize("algorithm", [*autoconv.list_algorithms(), "host"])
def test_conv2d_serves_the_current_weight_and_bias_through_any_view(opencl, algorithm, read_only):
    x, w, b = random_operands(SPEC, seed=3)
    kwargs = {"backend": "numpy"} if algorithm == "host" else {"algorithm": algorithm}
    if algorithm != "host" and autoconv.get_algorithm(algorithm).supports(SPEC, opencl.device) is not None:
        pytest.skip(f"{algorithm} does not run {SPEC}")
    w_view, b_view = view(w, read_only), view(b, read_only)
    for change in ("first", "weight", "bias", "both"):
        if change in ("weight", "both"):
            w *= -1.5
        if change in ("bias", "both"):
            b += 2.0
        y = autoconv.conv2d(x, w_view, b_view, padding=1, **kwargs)
        error = relative_error(y, reference_output(SPEC, (x, w, b)))
        assert error < TOLERANCE, f"{algorithm} after changing the {change}: relative error {error:.2e}"


def test_conv2d_lets_dropped_weights_go_once_its_cache_is_cleared(opencl):
    """conv2d holds the latest call's weight and bias (documented in its docstring) until the
    session's cache lets its layer go."""
    import gc
    import weakref

    x, w, b = random_operands(SPEC, seed=4)
    autoconv.conv2d(x, w, b, padding=1)
    held = weakref.ref(w), weakref.ref(b)
    del w, b
    autoconv.default_session().clear_cache()
    gc.collect()
    assert held[0]() is None and held[1]() is None
