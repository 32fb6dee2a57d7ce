import numpy as np
import pytest

from autoconv import ConvSpec, InvalidSpecError


def test_derived_sizes_match_the_gemm_view():
    spec = ConvSpec(n=2, c=64, h=56, w=56, k=128, r=3, s=3, stride=2, padding=1, groups=2)
    assert (spec.p, spec.q) == (28, 28)
    assert (spec.gemm_m, spec.gemm_n, spec.gemm_k) == (64, 2 * 28 * 28, 32 * 9)
    assert spec.flops == 2 * 2 * 64 * (2 * 28 * 28) * (32 * 9)
    assert spec.im2col_bytes == 2 * (32 * 9) * (2 * 28 * 28) * 4
    assert spec.output_shape == (2, 128, 28, 28)
    assert spec.weight_shape == (128, 32, 3, 3)


def test_dilation_and_asymmetric_arguments():
    spec = ConvSpec(n=1, c=3, h=17, w=13, k=8, r=5, s=3, stride=(2, 1), padding=(2, 0), dilation=(2, 3))
    assert spec.p == (17 + 4 - 2 * 4 - 1) // 2 + 1
    assert spec.q == (13 - 3 * 2 - 1) // 1 + 1


def test_ints_and_pairs_give_equal_specs_and_keys():
    a = ConvSpec(1, 8, 10, 10, 8, 3, 3, stride=1, padding=1)
    b = ConvSpec(1, 8, 10, 10, 8, 3, 3, stride=(1, 1), padding=(np.int64(1), 1))
    assert a == b and hash(a) == hash(b) and a.key() == b.key()


def test_keys_differ_for_every_field():
    base = ConvSpec(1, 8, 10, 10, 8, 3, 3)
    variants = [base.replace(n=2), base.replace(c=16), base.replace(h=11), base.replace(w=11),
                base.replace(k=16), base.replace(r=1), base.replace(s=1), base.replace(stride=2),
                base.replace(padding=1), base.replace(dilation=2), base.replace(groups=2),
                base.replace(bias=True)]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == len(variants) + 1


def test_spec_is_frozen():
    spec = ConvSpec(1, 8, 10, 10, 8, 3, 3)
    with pytest.raises(AttributeError):
        spec.n = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(n=0), "n"),
        (dict(c=-1), "c"),
        (dict(h=0), "h"),
        (dict(k=0), "k"),
        (dict(r=0), "r"),
        (dict(n=1.5), "n"),
        (dict(n=True), "n"),
        (dict(stride=0), "stride"),
        (dict(stride=(1, 2, 3)), "stride"),
        (dict(stride="2"), "stride"),
        (dict(padding=-1), "padding"),
        (dict(dilation=0), "dilation"),
        (dict(groups=3), "groups"),
        (dict(groups=0), "groups"),
        (dict(dtype="float16"), "dtype"),
        (dict(layout="NHWC"), "layout"),
        (dict(r=11, s=11), "output size"),
        (dict(bias="yes"), "bias"),
    ],
)
def test_invalid_arguments_are_named(kwargs, names):
    values = dict(n=1, c=8, h=10, w=10, k=8, r=3, s=3)
    values.update(kwargs)
    with pytest.raises(InvalidSpecError, match=names):
        ConvSpec(**values)


def test_from_shapes_checks_channel_agreement():
    with pytest.raises(InvalidSpecError, match="weight"):
        ConvSpec.from_shapes((1, 8, 10, 10), (4, 3, 3, 3), groups=2)
    with pytest.raises(InvalidSpecError, match="input"):
        ConvSpec.from_shapes((8, 10, 10), (4, 8, 3, 3))
    spec = ConvSpec.from_shapes((1, 8, 10, 10), (4, 4, 3, 3), groups=2, padding=1)
    assert spec.groups == 2 and spec.output_shape == (1, 4, 10, 10)
