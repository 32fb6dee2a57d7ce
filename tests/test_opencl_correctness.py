"""Generated OpenCL kernels against the float64 reference: property-based shapes for every
algorithm with device kernels, the public layers, and configs sampled from each GEMM
algorithm's whole space."""

import itertools
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autoconv import ConvSpec, InvalidParamsError, Plan, default_gemm_params, get_algorithm
from autoconv.algorithms import DIRECT, IM2COL_GEMM, IMPLICIT_GEMM
from autoconv.errors import InvalidSpecError
from autoconv.layers import model_layers, model_names

from conftest import assert_matches_reference, heuristic_plan


@st.composite
def conv_specs(draw):
    r = draw(st.sampled_from([1, 2, 3, 5, 7, 11]))
    s = draw(st.sampled_from([r, 1, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    c_per_group = draw(st.integers(1, 6))
    if groups == "depthwise":
        c = draw(st.integers(1, 12))
        groups, k = c, c * draw(st.sampled_from([1, 2]))
    else:
        c = c_per_group * groups
        k = groups * draw(st.integers(1, 9))
    try:
        spec = ConvSpec(
            n=draw(st.integers(1, 4)), c=c, h=draw(st.integers(1, 23)), w=draw(st.integers(1, 23)), k=k,
            r=r, s=s, stride=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
            padding=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
            dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 2))), groups=groups,
            bias=draw(st.booleans()),
        )
    except InvalidSpecError:
        assume(False)
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=conv_specs(), seed=st.integers(0, 2**16))
def test_generated_gemm_matches_reference_on_random_shapes(opencl, spec, seed):
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device), seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=conv_specs(), seed=st.integers(0, 2**16), staged=st.booleans())
def test_implicit_gemm_matches_reference_on_random_shapes(opencl, spec, seed, staged):
    plan = heuristic_plan(spec, opencl.device, IMPLICIT_GEMM)
    if staged:  # the staged-B path computes patch addresses per element while filling local memory
        plan = Plan(IMPLICIT_GEMM, plan.params.replace(MWG=16, WPTM=4, NWG=32, WPTN=4, VWN=4, SA=1, SB=1, KWG=8))
    assert_matches_reference(opencl, spec, plan, seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=conv_specs(), seed=st.integers(0, 2**16))
def test_direct_kernel_matches_reference_on_random_shapes(opencl, spec, seed):
    assert_matches_reference(opencl, spec, Plan(DIRECT), seed)


def _scaled(spec: ConvSpec) -> ConvSpec:
    """Public layers shrunk to CI size, keeping kernel, stride, padding and groups."""
    if spec.flops <= 5e8:
        return spec
    c, k = min(spec.c, 64), min(spec.k, 64)
    if spec.groups == spec.c:
        c = k = min(spec.c, 64)
    h = w = max(min(spec.h, 24), spec.r)
    return spec.replace(c=c, k=k, h=h, w=w, groups=c if spec.groups == spec.c else spec.groups)


PUBLIC = [layer for model in model_names() for layer in model_layers(model)]


@pytest.mark.parametrize("layer", PUBLIC, ids=lambda layer: layer.label)
def test_public_layers(opencl, layer):
    spec = _scaled(layer.spec)
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device))
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, IMPLICIT_GEMM))
    assert_matches_reference(opencl, spec, Plan(DIRECT))


PUBLIC_LAYERS = Path(__file__).resolve().parent / "fixtures" / "public-layers.json"  # ../shared/layers/public.json


def test_public_layers_are_the_shared_list():
    listed = json.loads(PUBLIC_LAYERS.read_text())
    rows = {(m, row["name"]) for m, layers in listed.items() if not m.startswith("_") for row in layers}
    shapes = {(m, row["name"]): (row["c"], row["h"], row["w"], row["k"], row["r"], row["s"], row["stride"],
                                 row["pad"], row["groups"])
              for m, layers in listed.items() if not m.startswith("_") for row in layers}
    for layer in PUBLIC:
        if (layer.model, layer.name) in shapes:
            spec = layer.spec
            assert (spec.c, spec.h, spec.w, spec.k, spec.r, spec.s, spec.stride[0], spec.padding[0],
                    spec.groups) == shapes[layer.model, layer.name], f"{layer.label} differs from the shared list"
    built_in = {(layer.model, layer.name) for layer in PUBLIC}
    # Every shared layer is built in; resnet18 is ours alone (torchvision's shapes).
    assert rows <= built_in and {m for m, _ in built_in - rows} == {"resnet18"}


SPACE_SAMPLE = 40


@pytest.mark.parametrize("algorithm", [IM2COL_GEMM, IMPLICIT_GEMM])
def test_sampled_configs_of_the_whole_space_compile_and_are_correct(opencl, algorithm):
    space = get_algorithm(algorithm).space
    sample = list(itertools.islice(space.random_valid(opencl.device.limits(), random.Random(20261124)), SPACE_SAMPLE))
    # Also the extremes of each tile size, where edge handling is most stressed.
    sample += [space.validate(dict(MWG=8, WPTM=8, NWG=16, WPTN=16, VWN=16, KWG=4, VW=4, UNROLL=4, SA=0, SB=0)),
               space.validate(dict(MWG=128, WPTM=8, NWG=128, WPTN=8, KWG=32, VW=8, SA=1, SB=1))]
    # Odd sizes everywhere: M, N and K are multiples of no tile.
    spec = ConvSpec(2, 6, 9, 7, 10, 3, 2, padding=(1, 0), groups=2, bias=True)
    for params in sample:
        assert_matches_reference(opencl, spec, Plan(algorithm, params, "space sample"))


@pytest.mark.parametrize("vwn", [1, 4, 16])
@pytest.mark.parametrize("spec", [
    ConvSpec(1, 16, 8, 8, 24, 1, 1, bias=True),     # P*Q = 64: whole vectors, contiguous loads
    ConvSpec(3, 8, 5, 7, 12, 1, 1),                 # P*Q = 35: vectors cross images, gathered
    ConvSpec(2, 12, 4, 4, 8, 1, 1, groups=4),       # grouped pointwise
    ConvSpec(1, 8, 9, 9, 8, 1, 1, stride=2),        # strided 1x1: not contiguous
], ids=str)
def test_implicit_gemm_pointwise_paths(opencl, spec, vwn):
    params = get_algorithm(IMPLICIT_GEMM).space.validate(dict(MWG=8, WPTM=4, NWG=16, WPTN=16, VWN=vwn, SA=0, SB=0))
    assert_matches_reference(opencl, spec, Plan(IMPLICIT_GEMM, params, "pointwise"))


@pytest.mark.parametrize("b_transposed", [0, 1])
@pytest.mark.parametrize("whole_rows", [0, 1])
@pytest.mark.parametrize("spec", [
    ConvSpec(3, 6, 9, 7, 10, 3, 2, padding=(1, 0), groups=2, bias=True),
    ConvSpec(2, 4, 11, 10, 8, 3, 3, stride=(2, 3), padding=2, dilation=(2, 1)),
    ConvSpec(1, 8, 7, 7, 8, 1, 1, groups=8),
], ids=str)
def test_every_im2col_layout_and_work_split(opencl, spec, b_transposed, whole_rows):
    params = default_gemm_params(MWG=16, WPTM=4, NWG=32, WPTN=4, VWN=4, B_TRANSPOSED=b_transposed,
                                 IM2COL_ROWS=whole_rows)
    assert_matches_reference(opencl, spec, Plan(IM2COL_GEMM, params, "layout"))


def test_a_config_that_breaks_the_device_limits_is_never_compiled(opencl, monkeypatch):
    too_big = default_gemm_params(MWG=128, NWG=128, KWG=32, WPTM=1, WPTN=1, VWN=1, SA=1, SB=1)
    assert too_big.violations(opencl.device.limits())
    monkeypatch.setattr(opencl, "kernel", lambda source: pytest.fail("compiled a config that breaks constraints"))
    with pytest.raises(InvalidParamsError, match="work_group_size"):
        opencl.prepare(ConvSpec(1, 4, 8, 8, 4, 3, 3), Plan(IM2COL_GEMM, too_big))
