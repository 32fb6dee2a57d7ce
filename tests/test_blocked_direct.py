"""The register-blocked direct convolution (autoconv/algorithms/blocked_direct.py) against the
float64 reference: property-based shapes (channel counts that are not multiples of the block,
odd sizes, strides, dilation, groups, asymmetric padding), every epilogue, sampled configs of its
whole space, both loop orders and every block; on OpenCL and on the CUDA simulator."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autoconv import ConvSpec, Plan, get_algorithm
from autoconv.algorithms import BLOCKED_DIRECT
from autoconv.algorithms.blocked_direct import BLOCKS, SPACE
from autoconv.errors import InvalidSpecError
from conftest import assert_matches_reference, heuristic_plan

ALGORITHM = get_algorithm(BLOCKED_DIRECT)


@st.composite
def blocked_specs(draw):
    r = draw(st.sampled_from([1, 2, 3, 5, 7]))
    s = draw(st.sampled_from([r, 1, 3]))
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    c_per_group = draw(st.integers(1, 37))
    k_per_group = draw(st.integers(1, 40)) if groups == 1 else 4 * draw(st.integers(1, 5))
    top, left = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    try:
        spec = ConvSpec(
            n=draw(st.integers(1, 3)), c=c_per_group * groups, h=draw(st.integers(1, 19)), w=draw(st.integers(1, 23)),
            k=k_per_group * groups, r=r, s=s, stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
            padding=(top, left), padding_end=(top + draw(st.integers(0, 1)), left + draw(st.integers(0, 1))),
            dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), groups=groups, bias=draw(st.booleans()),
            activation=draw(st.sampled_from(["none", "relu", "relu6"])), residual=draw(st.booleans()),
        )
    except InvalidSpecError:
        assume(False)
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocked_specs(), seed=st.integers(0, 2**16))
def test_the_heuristic_config_matches_the_reference_on_random_shapes(opencl, spec, seed):
    assert ALGORITHM.supports(spec, opencl.device) is None
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, BLOCKED_DIRECT), seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocked_specs(), seed=st.integers(0, 2**16), data=st.data())
def test_any_valid_config_matches_the_reference(opencl, spec, seed, data):
    configs = list(itertools.islice(SPACE.random_valid(opencl.device.limits(), random.Random(seed), spec), 1))
    params = data.draw(st.sampled_from(configs))
    assert_matches_reference(opencl, spec, Plan(BLOCKED_DIRECT, params), seed)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padx", [0, 1])
def test_every_block_and_loop_order_with_partial_blocks_and_tails(backend, block, order, padx):
    """Channels one past a whole block (a partial input block, a padded output block), a row that is
    not a multiple of PIX, padding on every side and a fused residual + relu6; the edges checked in
    the kernel (PADX=0) or the input copied with its zero border first (PADX=1)."""
    if BLOCKED_DIRECT not in backend.algorithms:
        pytest.skip(f"{backend.name} runs no generated kernels")
    spec = ConvSpec(2, block + 1, 7, 9, block + 1, 3, 3, padding=(1, 0), padding_end=(0, 2), bias=True,
                    activation="relu6", residual=True)
    params = SPACE.validate(dict(CB=block, KV=1, PIX=4, ORDER=order, PADX=padx))
    entries = [k.entry for k in ALGORITHM.kernels(spec, params, backend.dialect)] if hasattr(backend, "dialect") else []
    assert not entries or ("blocked_pad" in entries) == bool(padx)
    assert not params.violations(backend.device.limits(), spec)
    assert_matches_reference(backend, spec, Plan(BLOCKED_DIRECT, params))


def test_grouped_layers_need_whole_blocks_per_group_and_depthwise_is_refused(opencl):
    grouped = ConvSpec(1, 8, 6, 6, 16, 3, 3, padding=1, groups=2)
    assert ALGORITHM.supports(grouped, opencl.device) is None
    assert SPACE.validate(dict(CB=16)).violations(opencl.device.limits(), grouped)  # 8 filters per group
    assert_matches_reference(opencl, grouped, heuristic_plan(grouped, opencl.device, BLOCKED_DIRECT))
    depthwise = ConvSpec(1, 8, 6, 6, 8, 3, 3, padding=1, groups=8)
    assert "depthwise" in ALGORITHM.supports(depthwise, opencl.device)


def test_accumulators_beyond_the_registers_are_refused_before_compiling(opencl):
    too_many = SPACE.validate(dict(CB=16, KV=4, PIX=16))
    assert [v.split(":")[0] for v in too_many.violations(opencl.device.limits())] == ["registers"]


def test_the_heuristic_takes_the_devices_vector_width_and_fits_the_row(opencl):
    layer = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)
    params = ALGORITHM.heuristic(layer, opencl.device)
    assert not params.violations(opencl.device.limits(), layer)
    assert (-(-layer.q // params.PIX) * params.PIX - layer.q) * 8 <= layer.q
    if "avx512" in opencl.device.name:
        assert params.CB == 16
