import dataclasses

import pytest

from autoconv import InvalidParamsError
from autoconv.params import (
    GEMM_PARAMS,
    DeviceLimits,
    GemmParams,
    check_gemm_params,
    default_gemm_params,
    gemm_space,
    validate_gemm_params,
)
from autoconv.render import render_gemm
from autoconv.spec import ConvSpec

POCL_LIKE = DeviceLimits(4096, (4096, 4096, 4096), 1 << 20)
SMALL_GPU = DeviceLimits(256, (256, 256, 64), 32 * 1024, max_vector_width=1)


def test_every_param_is_declared_once_with_a_meaning_and_a_default_in_its_choices():
    names = [decl.name for decl in GEMM_PARAMS]
    assert names == [field.name for field in dataclasses.fields(GemmParams)]
    for decl in GEMM_PARAMS:
        assert decl.meaning and decl.default in decl.choices


def test_defaults_satisfy_every_constraint_on_a_cpu_device():
    assert default_gemm_params().violations(POCL_LIKE) == []


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"MWG": 48}, "MWG"),
        ({"MWG": "64"}, "MWG"),
        ({"MWG": True}, "MWG"),
        ({"MWG": 64.0}, "MWG"),
        ({"KWG": -16}, "KWG"),
        ({"EVIL": 1}, "unknown"),
        ({"MWG": "1); } __kernel void x() { //"}, "MWG"),
    ],
)
def test_untrusted_values_are_refused_before_rendering(raw, message):
    with pytest.raises(InvalidParamsError, match=message):
        validate_gemm_params(raw)


def test_broken_constraints_are_named():
    params = default_gemm_params(MWG=8, WPTM=8, NWG=16, WPTN=16, VWN=16, KWG=4, VW=8, UNROLL=8)
    broken = " ".join(params.violations(POCL_LIKE))
    assert "vector_divides_k_tile" in broken and "unroll_divides_k_tile" in broken
    with pytest.raises(InvalidParamsError, match="vector_divides_k_tile"):
        check_gemm_params(params, POCL_LIKE)


def test_device_limits_are_constraints():
    big = default_gemm_params(MWG=128, WPTM=1, NWG=128, WPTN=1, VWN=1)
    assert any("work_group_size" in v for v in big.violations(SMALL_GPU))
    narrow = DeviceLimits(1024, (1024, 64, 64), 48 * 1024)
    tall = default_gemm_params(MWG=128, WPTM=1, NWG=16, WPTN=4, VWN=1)  # 4 x 128 work-items
    assert [v.split(":")[0] for v in tall.violations(narrow)] == ["work_item_sizes"]
    vector = default_gemm_params(WPTN=16, VWN=16)
    assert any("device_vector_width" in v for v in vector.violations(SMALL_GPU))
    staged = default_gemm_params(MWG=128, NWG=128, KWG=32, WPTM=8, WPTN=8, SA=1, SB=1, PADA=1)  # 32.5 KiB
    assert any("local_memory" in v for v in staged.violations(SMALL_GPU))


def test_the_space_holds_only_valid_configs_and_the_defaults():
    configs = []
    for index, params in enumerate(gemm_space(SMALL_GPU)):
        assert params.violations(SMALL_GPU) == []
        configs.append(params)
        if index > 5000:
            break
    assert len(configs) > 1000


def test_rendered_source_carries_exactly_the_params():
    params = default_gemm_params(MWG=16, NWG=32, WPTM=2, WPTN=4)
    text = render_gemm(ConvSpec(1, 4, 8, 8, 4, 3, 3), params).text
    for name, value in params.as_dict().items():
        assert f"#define {name} {value} " in text


@pytest.mark.parametrize("max_wg, local_mem", [(1024, 49152), (256, 32768), (64, 16384), (16, 4096)])
@pytest.mark.parametrize("device_type", ["gpu", "cpu"])
def test_the_heuristic_default_fits_small_devices(max_wg, local_mem, device_type):
    from autoconv.plan import heuristic_gemm_params
    from autoconv.spec import ConvSpec

    limits = DeviceLimits(max_wg, (max_wg, max_wg, 64), local_mem, max_vector_width=1 if max_wg == 16 else 16)
    params = heuristic_gemm_params(ConvSpec(1, 64, 28, 28, 64, 3, 3, padding=1), device_type, limits)
    assert params.violations(limits) == []
