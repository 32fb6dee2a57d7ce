"""Each algorithm's ParamSpace: declared once, validated before rendering, constraints named,
conditional params, and the GEMM heuristic fitted to small devices."""

import pytest

from autoconv import InvalidParamsError, default_gemm_params, get_algorithm, list_algorithms, validate_gemm_params
from autoconv.device import DeviceInfo, DeviceLimits
from autoconv.render import OPENCL
from autoconv.spec import ConvSpec

POCL_LIKE = DeviceLimits(4096, (4096, 4096, 4096), 1 << 20)
SMALL_GPU = DeviceLimits(256, (256, 256, 64), 32 * 1024, max_vector_width=1)


@pytest.mark.parametrize("algorithm", list_algorithms())
def test_every_param_is_declared_once_with_a_meaning_and_a_default_in_its_choices(algorithm):
    space = get_algorithm(algorithm).space
    assert len(set(space.names)) == len(space.names)
    for decl in space.params:
        assert decl.meaning and decl.default in decl.choices
    assert list(space.validate({}).as_dict()) == list(space.names)


def test_params_that_do_not_matter_keep_their_defaults():
    space = get_algorithm("im2col_gemm").space
    unstaged = space.validate({"SA": 0, "SB": 0, "VW": 8, "PADA": 2, "PADB": 1})
    assert "VW" not in space.sampled_values(unstaged) and "PADA" not in space.sampled_values(unstaged)
    assert space.canonical(unstaged) == space.validate({"SA": 0, "SB": 0})
    staged_a = space.validate({"SA": 1, "SB": 0, "PADA": 2, "PADB": 1})
    assert space.sampled_values(staged_a)["PADA"] == 2 and "PADB" not in space.sampled_values(staged_a)


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
        params.space.check(params, POCL_LIKE)


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
    for index, params in enumerate(get_algorithm("im2col_gemm").space.all_valid(SMALL_GPU)):
        assert params.violations(SMALL_GPU) == []
        configs.append(params)
        if index > 5000:
            break
    assert len(configs) > 1000


@pytest.mark.parametrize("algorithm", ["im2col_gemm", "implicit_gemm"])
def test_rendered_source_carries_exactly_the_params(algorithm):
    space = get_algorithm(algorithm).space
    params = space.validate(dict(MWG=16, NWG=32, WPTM=2, WPTN=4))
    text = get_algorithm(algorithm).kernels(ConvSpec(1, 4, 8, 8, 4, 3, 3), params, OPENCL)[-1].text
    for name, value in params.as_dict().items():
        assert f"#define {name} {value} " in text


@pytest.mark.parametrize("max_wg, local_mem", [(1024, 49152), (256, 32768), (64, 16384), (16, 4096)])
@pytest.mark.parametrize("device_type", ["gpu", "cpu"])
@pytest.mark.parametrize("algorithm", list_algorithms())
def test_the_heuristic_default_fits_small_devices(max_wg, local_mem, device_type, algorithm):
    backend = "cuda" if max_wg == 16 else "opencl"  # CUDA: scalar accumulators only
    device = DeviceInfo(backend, "P", "v", "small", "1", device_type, 1, local_mem, max_wg, (max_wg, max_wg, 64))
    params = get_algorithm(algorithm).heuristic(ConvSpec(1, 64, 28, 28, 64, 3, 3, padding=1), device)
    assert params.violations(device.limits()) == []
