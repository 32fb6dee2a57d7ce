"""Winograd F(m x m, 3 x 3): its transform matrices as data, property-based 3x3 shapes on the
OpenCL device against the float64 reference (poisoned output), what it refuses and why, the
accuracy constraint of F(4x4) on both sides of its edge, and the filter transform run once per
weights."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autoconv import ConvSpec, Plan
from autoconv.algorithms import WINOGRAD, get_algorithm
from autoconv.algorithms.winograd import WINOGRAD4_MAX_CHANNELS, transform_matrices
from autoconv.errors import InvalidParamsError, InvalidSpecError
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

from conftest import assert_matches_reference, heuristic_plan, record_launches

ALGORITHM = get_algorithm(WINOGRAD)


def winograd_host(d: np.ndarray, g: np.ndarray, m: int) -> np.ndarray:
    """One output tile from one (m + 2)^2 input tile and a 3x3 filter, by the transforms."""
    bt, gm, at = transform_matrices(m)
    return at @ ((gm @ g @ gm.T) * (bt @ d @ bt.T)) @ at.T


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_the_correlation_exactly(m):
    rng = np.random.default_rng(m)
    d, g = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(winograd_host(d, g, m), direct, rtol=0, atol=1e-12)


@st.composite
def winograd_specs(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    top, left = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    asymmetric = draw(st.booleans())
    try:
        return ConvSpec(
            n=draw(st.integers(1, 4)), c=groups * draw(st.integers(1, 19)), h=draw(st.integers(1, 21)),
            w=draw(st.integers(1, 21)), k=groups * draw(st.integers(1, 13)), r=3, s=3, padding=(top, left),
            padding_end=(draw(st.integers(0, 2)), draw(st.integers(0, 2))) if asymmetric else None,
            groups=groups, bias=draw(st.booleans()))
    except InvalidSpecError:
        assume(False)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=winograd_specs(), seed=st.integers(0, 2**16), tile=st.sampled_from([2, 4]),
       xv=st.sampled_from([1, 2, 4, 16]), staged=st.booleans())
def test_winograd_matches_reference_on_random_3x3_shapes(opencl, spec, seed, tile, xv, staged):
    params = ALGORITHM.heuristic(spec, opencl.device).replace(TILE=tile, XV=xv)
    if staged:  # the batched GEMM with both operands staged in local memory, as on GPUs
        params = params.replace(MWG=16, WPTM=4, NWG=32, WPTN=4, VWN=4, SA=1, SB=1, KWG=8)
    assert_matches_reference(opencl, spec, Plan(WINOGRAD, params, "test"), seed)


@pytest.mark.parametrize("spec", [
    ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1, bias=True),   # ResNet-50 res2_3x3
    ConvSpec(2, 512, 14, 14, 512, 3, 3, padding=1),            # VGG-16 conv5 at batch 2
])
def test_winograd_heuristic_on_public_layers(opencl, spec):
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, WINOGRAD))


@pytest.mark.parametrize(("spec", "reason"), [
    (ConvSpec(1, 8, 8, 8, 8, 1, 1), "1x1 filters"),
    (ConvSpec(1, 8, 8, 8, 8, 5, 5), "5x5 filters"),
    (ConvSpec(1, 8, 9, 9, 8, 3, 3, stride=2), "stride 2x2"),
    (ConvSpec(1, 8, 9, 9, 8, 3, 3, dilation=(1, 2)), "dilation 1x2"),
])
def test_winograd_refuses_what_it_cannot_compute(opencl, spec, reason):
    said = ALGORITHM.supports(spec, opencl.device)
    assert said is not None and said.startswith("not supported: ") and reason in said
    with pytest.raises(InvalidParamsError, match="winograd does not support"):
        opencl.prepare(spec, heuristic_plan(ConvSpec(1, 8, 8, 8, 8, 3, 3), opencl.device, WINOGRAD))


def edge_spec(channels: int) -> ConvSpec:
    return ConvSpec(1, channels, 6, 6, 2, 3, 3, padding=1)


def test_f4_accuracy_constraint_edge_from_both_sides(opencl):
    inside, outside = edge_spec(WINOGRAD4_MAX_CHANNELS), edge_spec(WINOGRAD4_MAX_CHANNELS + 1)
    f4 = ALGORITHM.heuristic(inside, opencl.device).replace(TILE=4)
    assert f4.violations(opencl.device.limits(), inside) == []
    # At the edge F(4x4) is accurate, with room to spare.
    operands = random_operands(inside, seed=1)
    error = relative_error(opencl.prepare(inside, Plan(WINOGRAD, f4)).run(*operands, poison=True),
                           reference_output(inside, operands))
    assert error < TOLERANCE / 2
    # One channel past it F(4x4) is refused by name before anything is compiled; F(2x2) serves.
    broken = f4.violations(opencl.device.limits(), outside)
    assert [v.split(":")[0] for v in broken] == ["winograd4_channels"]
    with pytest.raises(InvalidParamsError, match="winograd4_channels"):
        opencl.prepare(outside, Plan(WINOGRAD, f4))
    assert ALGORITHM.heuristic(outside, opencl.device).TILE == 2
    assert_matches_reference(opencl, outside, heuristic_plan(outside, opencl.device, WINOGRAD))


def test_filter_transform_runs_once_per_weights(opencl, monkeypatch):
    spec = ConvSpec(1, 5, 9, 9, 7, 3, 3, padding=1, bias=True)
    launched = record_launches(opencl, monkeypatch)
    conv = opencl.prepare(spec, heuristic_plan(spec, opencl.device, WINOGRAD))
    x, weight, bias = random_operands(spec, seed=3)
    first = conv.run(x, weight, bias)
    again = conv.run(x, weight, bias)
    assert launched.count("winograd_filter") == 1 and launched.count("winograd_input") == 2
    np.testing.assert_array_equal(first, again)
    weight[0, 0, 1, 1] += 1.0  # changed in place by the caller: never served stale
    changed = conv.run(x, weight, bias)
    assert launched.count("winograd_filter") == 2
    assert relative_error(changed, reference_output(spec, (x, weight, bias))) < TOLERANCE
    assert conv.time(x, weight, bias, repeats=3, stage="weights").median_ms > 0


def test_conv2d_on_numpy_arrays_does_not_redo_the_filter_transform(opencl, monkeypatch):
    import autoconv

    spec = ConvSpec(1, 6, 10, 10, 4, 3, 3, padding=1, bias=True)
    x, weight, bias = random_operands(spec, seed=4)
    launched = record_launches(opencl, monkeypatch)
    first = autoconv.conv2d(x, weight, bias, padding=1, algorithm=WINOGRAD)
    assert launched.count("winograd_filter") == 1
    again = autoconv.conv2d(x.copy(), weight.copy(), bias, padding=1, algorithm=WINOGRAD)  # equal contents
    assert launched.count("winograd_filter") == 1 and launched.count("winograd_output") == 2
    np.testing.assert_array_equal(first, again)
    other = weight * 2
    doubled = autoconv.conv2d(x, other, bias, padding=1, algorithm=WINOGRAD)
    assert launched.count("winograd_filter") == 2
    assert relative_error(doubled, reference_output(spec, (x, other, bias))) < TOLERANCE
