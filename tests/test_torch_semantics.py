"""autoconv.conv2d against torch.nn.functional.conv2d's documented semantics, written from its
documentation (not from autoconv's code): output size floor((H + pad_top + pad_bottom -
dilation*(kernel-1) - 1) / stride) + 1; padding an int, a pair (tuple or list), "valid" (none) or
"same" (stride 1 only; total dilation*(kernel-1), half before and the odd one after); unbatched
(C, H, W) input gives (K, P, Q); an empty batch gives an empty result; groups split channels.
Each case is checked against a plain nested-loop reference in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoconv
from autoconv import ConvSpec, InvalidSpecError, get_algorithm
from autoconv.algorithms import DIRECT, IM2COL_GEMM, IMPLICIT_GEMM
from autoconv.layers import parse_layer
from autoconv.tuning.verify import relative_error

from conftest import assert_matches_reference, heuristic_plan

pytestmark = pytest.mark.usefixtures("opencl")


def pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def torch_reference(x, w, b, stride=1, padding=0, dilation=1, groups=1) -> np.ndarray:
    """torch's conv2d, as its documentation defines it, with loops (small shapes only)."""
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    kh, kw = w.shape[2], w.shape[3]
    if padding == "valid":
        top = bottom = left = right = 0
    elif padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        top, left = th // 2, tw // 2
        bottom, right = th - top, tw - left
    else:
        (top, left) = pair(padding)
        bottom, right = top, left
    n, c, h, wd = x.shape
    k = w.shape[0]
    padded = np.zeros((n, c, h + top + bottom, wd + left + right))
    padded[:, :, top:top + h, left:left + wd] = x
    p = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    q = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, k, p, q))
    cg, kg = c // groups, k // groups
    for img in range(n):
        for f in range(k):
            g = f // kg
            for i in range(p):
                for j in range(q):
                    patch = padded[img, g * cg:(g + 1) * cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                                   j * sw:j * sw + dw * (kw - 1) + 1:dw]
                    out[img, f, i, j] = np.sum(patch * w[f]) + (b[f] if b is not None else 0.0)
    return out[0] if unbatched else out


CASES = [
    # input shape, weight shape, bias, stride, padding, dilation, groups
    ((2, 4, 7, 6), (6, 4, 3, 3), True, 1, 0, 1, 1),
    ((2, 4, 7, 6), (6, 4, 3, 3), False, 2, 1, 1, 1),
    ((4, 7, 6), (6, 4, 3, 3), True, 1, 1, 1, 1),                    # unbatched
    ((4, 7, 6), (6, 2, 3, 3), False, (2, 1), (1, 0), 1, 2),         # unbatched, grouped, pairs
    ((1, 4, 9, 8), (4, 1, 3, 3), True, 1, "same", 1, 4),            # depthwise, same
    ((1, 3, 9, 8), (5, 3, 2, 2), False, 1, "same", 1, 1),           # even kernel: asymmetric same
    ((3, 9, 8), (5, 3, 2, 3), True, 1, "same", (3, 1), 1),          # even dilated extent
    ((1, 3, 9, 8), (5, 3, 4, 4), False, 1, "same", 2, 1),           # even kernel, dilation 2: extent 6
    ((1, 3, 9, 8), (5, 3, 3, 3), False, 1, "valid", 2, 1),
    ((2, 6, 11, 5), (6, 3, 1, 3), True, [1, 2], [0, 1], [1, 2], 2), # lists
    ((1, 2, 5, 5), (3, 2, 5, 5), False, 1, 0, 1, 1),                # kernel as large as the input
]


@pytest.mark.parametrize("input_shape, weight_shape, bias, stride, padding, dilation, groups", CASES,
                         ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("algorithm", [None, IM2COL_GEMM, IMPLICIT_GEMM, DIRECT, "im2col_blas"])
def test_torch_semantics_table(input_shape, weight_shape, bias, stride, padding, dilation, groups, algorithm):
    rng = np.random.default_rng(7)
    x = rng.uniform(0.5, 1.5, input_shape).astype(np.float32) * rng.choice((-1, 1), input_shape)
    w = rng.uniform(0.5, 1.5, weight_shape).astype(np.float32) * rng.choice((-1, 1), weight_shape)
    b = rng.uniform(0.5, 1.5, weight_shape[0]).astype(np.float32) if bias else None
    expected = torch_reference(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                               stride, padding, dilation, groups)
    out = autoconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm=algorithm)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_floating_inputs_are_computed_in_float32(dtype):
    x = np.linspace(-1, 1, 2 * 3 * 6 * 6).reshape(2, 3, 6, 6).astype(dtype)
    w = np.linspace(-1, 1, 4 * 3 * 3 * 3).reshape(4, 3, 3, 3).astype(dtype)
    out = autoconv.conv2d(x, w, padding=1)
    assert out.dtype == np.float32
    expected = torch_reference(x.astype(np.float64), w.astype(np.float64), None, 1, 1)
    assert relative_error(out, expected) < 1e-4


def test_an_empty_batch_gives_an_empty_result():
    out = autoconv.conv2d(np.zeros((0, 3, 9, 8), np.float32), np.ones((5, 3, 3, 3), np.float32), stride=2, padding=1)
    assert out.shape == (0, 5, 5, 4) and out.dtype == np.float32
    with pytest.raises(InvalidSpecError, match="groups"):  # still checked like any call
        autoconv.conv2d(np.zeros((0, 3, 9, 8), np.float32), np.ones((5, 3, 3, 3), np.float32), groups=2)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: autoconv.conv2d(x[None], w), "3-D .* or 4-D"),
    (lambda x, w: autoconv.conv2d(x[0, 0], w), "3-D .* or 4-D"),
    (lambda x, w: autoconv.conv2d(x, w, stride=(2,)), "stride: expected an int or a pair"),
    (lambda x, w: autoconv.conv2d(x, w, padding=(1,)), "padding: expected an int or a pair"),
    (lambda x, w: autoconv.conv2d(x, w, dilation=(1, 1, 1)), "dilation: expected an int or a pair"),
    (lambda x, w: autoconv.conv2d(x, w, padding="same", stride=2), "not supported for strided"),
    (lambda x, w: autoconv.conv2d(x, w, padding="full"), "'valid' or 'same'"),
    (lambda x, w: autoconv.conv2d(x, w, padding=-1), "non-negative"),
    (lambda x, w: autoconv.conv2d(x, w, stride=0), "stride"),
    (lambda x, w: autoconv.conv2d(x, w, groups=0), "groups"),
    (lambda x, w: autoconv.conv2d(x.astype(np.int64), w), "floating-point"),
    (lambda x, w: autoconv.conv2d(x, w.astype(bool)), "floating-point"),
    (lambda x, w: autoconv.conv2d(x, w, np.ones(3, np.float32)), "bias: expected shape"),
    (lambda x, w: autoconv.conv2d(x, w[:, :3]), "weight: shape"),
    (lambda x, w: autoconv.conv2d(x[:, :, :1, :1], w), "output size"),
])
def test_what_torch_refuses_is_refused_with_a_clear_message(call, message):
    x = np.ones((1, 4, 8, 8), np.float32)
    w = np.ones((6, 4, 3, 3), np.float32)
    with pytest.raises(InvalidSpecError, match=message):
        call(x, w)


def test_asymmetric_padding_is_part_of_the_layer_and_its_key():
    symmetric = ConvSpec(1, 3, 9, 8, 5, 2, 2, padding=1)
    assert symmetric.padding_end == (1, 1) and symmetric.key() == ConvSpec(1, 3, 9, 8, 5, 2, 2, padding=(1, 1)).key()
    assert "_pe" not in symmetric.key()  # the keys of tuned symmetric layers never change
    asymmetric = ConvSpec(1, 3, 9, 8, 5, 2, 2, padding=(0, 0), padding_end=(1, 1))
    assert asymmetric.key() != ConvSpec(1, 3, 9, 8, 5, 2, 2).key() and not asymmetric.symmetric
    assert (asymmetric.p, asymmetric.q) == (9, 8)
    assert symmetric.replace(padding=2).padding_end == (2, 2)
    assert parse_layer("c=3,h=9,w=8,k=5,r=2,s=2,pad=0,pad_bottom=1,pad_right=1").spec == asymmetric
    with pytest.raises(InvalidSpecError, match="padding_end"):
        ConvSpec(1, 3, 9, 8, 5, 2, 2, padding_end=(-1, 0))


def test_asymmetric_layers_round_trip_through_the_store(tmp_path):
    from autoconv.store import SQLiteStore, TunedResult
    from autoconv.device import DeviceInfo
    from autoconv.render import template_hash

    FAKE = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU", "1.0", "gpu", 8, 49152, 256, (256, 256, 64))

    spec = ConvSpec(1, 3, 9, 8, 5, 2, 2, padding=(0, 1), padding_end=(1, 0))
    with SQLiteStore(tmp_path / "t.db") as db:
        db.record_device(FAKE)
        db.save_result(TunedResult(device=FAKE.fingerprint(), spec=spec, algorithm=IM2COL_GEMM,
                                   template_hash=template_hash(), params=get_algorithm(IM2COL_GEMM).space.validate({}),
                                   median_ms=1.0, gflops=1.0, rel_error=1e-6, default_ms=None, trials=1))
        (stored,) = db.results()
    assert stored.spec == spec and autoconv.lookup(spec, FAKE, tmp_path / "t.db").source == "tuned"


@st.composite
def asymmetric_specs(draw):
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    try:
        return ConvSpec(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 5)), h=draw(st.integers(1, 12)),
                        w=draw(st.integers(1, 12)), k=draw(st.integers(1, 7)), r=r, s=s,
                        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                        padding=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                        padding_end=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), bias=draw(st.booleans()))
    except InvalidSpecError:
        return ConvSpec(1, 2, 6, 6, 3, 2, 2, padding=(0, 1), padding_end=(1, 0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=asymmetric_specs(), algorithm=st.sampled_from([IM2COL_GEMM, IMPLICIT_GEMM, DIRECT]), seed=st.integers(0, 999))
def test_asymmetric_padding_matches_the_reference_on_random_shapes(opencl, spec, algorithm, seed):
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, algorithm), seed)


def test_onnx_asymmetric_pads_become_a_layer(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from autoconv.onnx_layers import onnx_layers

    w = numpy_helper.from_array(np.ones((4, 3, 2, 2), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="upper", auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["x", "w"], ["z"], name="explicit", pads=[0, 1, 1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    layers, skipped = onnx_layers(tmp_path / "m.onnx")
    assert skipped == []
    upper, explicit = (layer.spec for layer in layers)
    assert (upper.padding, upper.padding_end, upper.p, upper.q) == ((0, 0), (1, 1), 8, 8)
    assert (explicit.padding, explicit.padding_end) == ((0, 1), (1, 0))
