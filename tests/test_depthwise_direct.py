"""The depthwise direct convolution (autoconv/algorithms/depthwise_direct.py) against the float64
reference: property-based depthwise shapes (channel counts that are not multiples of the block, odd
sizes, strides, dilation, asymmetric padding), every layout and epilogue, sampled configs of its
space; on OpenCL and on the CUDA simulator (every backend)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import autoconv
from autoconv import ConvSpec, Plan, get_algorithm, lookup
from autoconv.algorithms import DEPTHWISE_DIRECT
from autoconv.algorithms.depthwise_direct import SPACE
from autoconv.errors import InvalidSpecError
from autoconv.layouts import LAYOUTS
from conftest import assert_matches_reference, heuristic_plan

ALGORITHM = get_algorithm(DEPTHWISE_DIRECT)


@st.composite
def depthwise_specs(draw):
    r = draw(st.sampled_from([1, 3, 5, 7]))
    s = draw(st.sampled_from([r, 1, 3]))
    c = draw(st.integers(1, 37))
    top, left = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    try:
        spec = ConvSpec(
            n=draw(st.integers(1, 3)), c=c, h=draw(st.integers(1, 19)), w=draw(st.integers(1, 23)), k=c, r=r, s=s,
            stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
            padding=(top, left), padding_end=(top + draw(st.integers(0, 1)), left + draw(st.integers(0, 1))),
            dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), groups=c, bias=draw(st.booleans()),
            activation=draw(st.sampled_from(["none", "relu", "relu6"])), residual=draw(st.booleans()),
            layout=draw(st.sampled_from(LAYOUTS)),
        )
    except InvalidSpecError:
        assume(False)
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=depthwise_specs(), seed=st.integers(0, 2**16))
def test_the_heuristic_config_matches_the_reference_on_random_shapes(opencl, spec, seed):
    assert ALGORITHM.supports(spec, opencl.device) is None
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, DEPTHWISE_DIRECT), seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=depthwise_specs(), seed=st.integers(0, 2**16))
def test_any_valid_config_matches_the_reference(opencl, spec, seed):
    params = next(itertools.islice(SPACE.random_valid(opencl.device.limits(), random.Random(seed), spec), 1))
    assert_matches_reference(opencl, spec, Plan(DEPTHWISE_DIRECT, params), seed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_backend_runs_it_in_every_layout(backend, layout):
    """Channels one past a whole block, a row that is not a multiple of PIX, padding on every side,
    a stride, a dilation and a fused residual + relu6, on every backend that runs generated kernels."""
    if DEPTHWISE_DIRECT not in backend.algorithms:
        pytest.skip(f"{backend.name} runs no generated kernels")
    spec = ConvSpec(2, 17, 9, 11, 17, 3, 5, stride=(1, 2), padding=(1, 2), padding_end=(2, 1), dilation=(2, 1),
                    groups=17, bias=True, activation="relu6", residual=True, layout=layout)
    assert_matches_reference(backend, spec, Plan(DEPTHWISE_DIRECT, SPACE.validate(dict(PIX=4))))


def test_only_depthwise_layers_and_the_lookup_serves_them_untuned(opencl):
    dense = ConvSpec(1, 16, 8, 8, 16, 3, 3, padding=1)
    assert "depthwise layers only" in ALGORITHM.supports(dense, opencl.device)
    multiplier = ConvSpec(1, 16, 8, 8, 32, 3, 3, padding=1, groups=16)  # two filters per channel
    assert "depthwise layers only" in ALGORITHM.supports(multiplier, opencl.device)
    depthwise = ConvSpec(1, 32, 28, 28, 32, 3, 3, padding=1, groups=32)
    if opencl.device.device_type == "cpu":  # on a CPU device in NCHW too (benchmarks/fallback-pocl.md)
        assert lookup(depthwise, opencl.device).algorithm == DEPTHWISE_DIRECT
    assert lookup(depthwise.replace(layout="NCHW8c"), opencl.device).algorithm == DEPTHWISE_DIRECT


def test_a_blocked_chain_through_a_depthwise_layer_never_reorders(opencl, monkeypatch):
    """A separable block kept in NCHW16c: pointwise, depthwise, pointwise, no reorder between them."""
    import numpy as np

    from conftest import record_launches
    from autoconv.tuning.verify import reference_output

    rng = np.random.default_rng(3)
    expand, depthwise, project = (rng.standard_normal(shape).astype(np.float32) * 0.3
                                  for shape in ((48, 16, 1, 1), (48, 1, 3, 3), (16, 48, 1, 1)))
    layers = [autoconv.Conv2d(expand, activation="relu6", layout="NCHW16c"),
              autoconv.Conv2d(depthwise, padding=1, groups=48, activation="relu6"),
              autoconv.Conv2d(project)]
    x = rng.standard_normal((1, 16, 10, 10)).astype(np.float32)
    y = autoconv.to_device(x, layout="NCHW16c")
    launched = record_launches(opencl, monkeypatch)
    for layer in layers:
        y = layer(y)
    assert y.layout == "NCHW16c" and not any(name.startswith("reorder") for name in launched), launched
    expected = x.astype(np.float64)
    for layer, options in zip(layers, (dict(activation="relu6"), dict(padding=1, groups=48, activation="relu6"), {})):
        spec = ConvSpec.from_shapes(expected.shape, layer.weight.shape, **options)
        expected = reference_output(spec, (expected, layer.weight.astype(np.float64), None))
    assert np.max(np.abs(np.asarray(y) - expected)) / np.max(np.abs(expected)) < 1e-4
