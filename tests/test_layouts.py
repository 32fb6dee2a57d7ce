"""Channel-blocked layouts (autoconv/layouts.py): NCHW{b}c specs computed against the float64
reference, reorders that round-trip exactly (host and generated kernels), layouts flowing
between Conv2d layers with no reorder inside a blocked chain, and the layout in the key, the
database, the layer text and export."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoconv
from autoconv import ConvSpec, Plan, get_algorithm, list_algorithms, lookup
from autoconv.algorithms import BLOCKED_DIRECT, DEPTHWISE_DIRECT, WINOGRAD
from autoconv.backends.reorder import relayout, reorder_on_device
from autoconv.errors import InvalidSpecError
from autoconv.layers import layer_text, parse_layer
from autoconv.layouts import BLOCKS, LAYOUTS, NCHW, array_shape, to_layout, to_nchw
from autoconv.render import template_hash
from autoconv.serve.lookup import UnsupportedAlgorithmError
from autoconv.store import SQLiteStore, TunedResult
from autoconv.tuning.verify import random_operands, reference_output
from conftest import assert_matches_reference, heuristic_plan, record_launches
from test_blocked_direct import blocked_specs
from test_winograd import winograd_specs

BLOCKED = [layout for layout in LAYOUTS if layout != NCHW]
# The algorithms whose kernels read and write the channel-blocked layouts.
RUN_BLOCKED = {BLOCKED_DIRECT, WINOGRAD}  # dense layers; depthwise ones: DEPTHWISE_DIRECT
tensor_shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9))


def _random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, shape) * rng.choice((-1.0, 1.0), shape)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(shape=tensor_shapes, layout=st.sampled_from(BLOCKED))
def test_host_reorders_round_trip_exactly_with_zero_padding(shape, layout):
    x = _random(shape)
    blocked = to_layout(x, layout)
    b = int(layout[4:-1])
    assert blocked.shape == array_shape(shape, layout) == (shape[0], -(-shape[1] // b), shape[2], shape[3], b)
    n, c = shape[:2]
    if c % b:
        assert not np.any(blocked[:, -1, :, :, c % b:])  # the padding channels
    assert blocked[0, (c - 1) // b, 0, 0, (c - 1) % b] == x[0, c - 1, 0, 0]
    assert np.array_equal(to_nchw(blocked, layout, c), x)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=tensor_shapes, layout=st.sampled_from(BLOCKED), other=st.sampled_from(BLOCKED))
def test_device_reorder_kernels_round_trip_exactly(opencl, shape, layout, other):
    x = _random(shape)
    blocked = relayout(opencl, x, layout)
    assert blocked.layout == layout and blocked.shape == shape and blocked.storage_shape == array_shape(shape, layout)
    stored = np.empty(blocked.storage_shape, np.float32)
    blocked.wait()
    opencl.download(stored, blocked.buffer)
    assert np.array_equal(stored, to_layout(x, layout))  # padding channels written as zero
    assert np.array_equal(np.asarray(blocked), x)  # numpy.asarray always gives NCHW
    assert np.array_equal(np.asarray(relayout(opencl, blocked, other)), x)
    assert np.array_equal(np.asarray(relayout(opencl, blocked, NCHW)), x)


def test_reorder_kernels_run_on_the_cuda_simulator(simulated_cuda):
    cuda = autoconv.backends.get_backend("cuda")
    x = _random((2, 19, 3, 5))
    for layout in BLOCKED:
        source = cuda.adopt(x)
        blocked, buffer = reorder_on_device(cuda, cuda.device_buffer(source, "input"), x.shape, NCHW, layout)
        assert np.array_equal(simulated_cuda.cupy.asnumpy(blocked), to_layout(x, layout))
        back, _ = reorder_on_device(cuda, buffer, x.shape, layout, NCHW)
        assert np.array_equal(simulated_cuda.cupy.asnumpy(back), x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=blocked_specs(), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**16))
def test_blocked_direct_in_every_blocked_layout_matches_the_reference(opencl, spec, block, seed):
    """Input, output and residual in NCHW{b}c (the padding channels zero in, and written zero out:
    the reference compares them too, into a NaN-poisoned output)."""
    spec = spec.replace(layout=f"NCHW{block}c")
    reason = get_algorithm(BLOCKED_DIRECT).supports(spec, opencl.device)
    if spec.groups > 1 and (spec.c_per_group % block or spec.k_per_group % block):
        assert reason is not None and "whole blocks" in reason
        return
    assert reason is None
    assert_matches_reference(opencl, spec, heuristic_plan(spec, opencl.device, BLOCKED_DIRECT), seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=winograd_specs(), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**16), tile=st.sampled_from([2, 4]),
       xv=st.sampled_from([1, 4]), activation=st.sampled_from(["none", "relu", "relu6"]), residual=st.booleans())
def test_winograd_in_every_blocked_layout_matches_the_reference(opencl, spec, block, seed, tile, xv, activation,
                                                                residual):
    """The transforms read and write NCHW{b}c (channel counts not multiples of b: the padding
    channels zero in, written zero out, into a NaN-poisoned output), every epilogue."""
    spec = spec.replace(layout=f"NCHW{block}c", activation=activation, residual=residual)
    algorithm = get_algorithm(WINOGRAD)
    assert algorithm.supports(spec, opencl.device) is None
    params = algorithm.heuristic(spec, opencl.device).replace(TILE=tile, XV=xv)
    assert_matches_reference(opencl, spec, Plan(WINOGRAD, params, "test"), seed)


@pytest.mark.parametrize("layout", BLOCKED)
def test_every_backend_runs_a_blocked_layer_or_says_why(backend, layout):
    """Every algorithm × blocked layout × epilogue: blocked_direct and Winograd compute it; every
    other algorithm refuses it with a reason naming the layout (a Conv2d runs those layers in NCHW
    between reorders)."""
    spec = ConvSpec(2, 21, 7, 9, 19, 3, 3, padding=(1, 0), padding_end=(0, 2), bias=True, activation="relu6",
                    residual=True, layout=layout)
    for name in list_algorithms():
        reason = get_algorithm(name).supports(spec, backend.device)
        if name in RUN_BLOCKED:
            assert reason is None
            if name in backend.algorithms:
                assert_matches_reference(backend, spec, heuristic_plan(spec, backend.device, name))
        elif name == DEPTHWISE_DIRECT:  # runs every layout, depthwise layers only
            assert reason is not None and "depthwise" in reason, reason
            depthwise = spec.replace(k=spec.c, groups=spec.c)
            assert get_algorithm(name).supports(depthwise, backend.device) is None
            if name in backend.algorithms:
                assert_matches_reference(backend, depthwise, heuristic_plan(depthwise, backend.device, name))
        else:
            assert reason is not None and layout in reason, (name, reason)
            if name in backend.algorithms:
                with pytest.raises(autoconv.InvalidParamsError, match=layout):
                    backend.prepare(spec, heuristic_plan(spec, backend.device, name))


def test_a_blocked_config_must_use_the_layouts_block(opencl):
    spec = ConvSpec(1, 32, 8, 8, 32, 3, 3, padding=1, layout="NCHW8c")
    params = get_algorithm(BLOCKED_DIRECT).space.validate(dict(CB=16))
    assert any(v.startswith("block_is_layout") for v in params.violations(opencl.device.limits(), spec))
    assert get_algorithm(BLOCKED_DIRECT).heuristic(spec, opencl.device).CB == 8


def test_a_blocked_layer_untuned_is_served_a_direct_convolution_or_refused_with_why(opencl):
    dense = ConvSpec(1, 32, 8, 8, 48, 3, 3, padding=1, layout="NCHW16c")
    assert lookup(dense, opencl.device).algorithm == BLOCKED_DIRECT  # the generated GEMM reads NCHW only
    depthwise = ConvSpec(1, 32, 8, 8, 32, 3, 3, padding=1, groups=32, layout="NCHW16c")
    assert lookup(depthwise, opencl.device).algorithm == DEPTHWISE_DIRECT
    split = ConvSpec(1, 32, 8, 8, 32, 3, 3, padding=1, groups=8, layout="NCHW16c")  # 4 channels per group
    with pytest.raises(UnsupportedAlgorithmError, match="NCHW16c"):
        lookup(split, opencl.device)


# Layouts flowing between layers -----------------------------------------------------------------

def _weights(k: int, c: int, r: int, seed: int) -> np.ndarray:
    return _random((k, c, r, r), seed)


def _reference_chain(x: np.ndarray, layers: list[tuple[np.ndarray, dict]]) -> np.ndarray:
    out = x.astype(np.float64)
    for weight, options in layers:
        spec = ConvSpec.from_shapes(out.shape, weight.shape, padding=options.get("padding", 0),
                                    groups=options.get("groups", 1), activation=options.get("activation"))
        out = reference_output(spec, (out, weight.astype(np.float64), None))
    return out


def test_a_chain_of_blocked_layers_never_reorders_between_layers(opencl, monkeypatch):
    """Three blocked layers: one reorder in (the host input), none between the layers, no host
    trip (every result a DeviceArray in NCHW16c), and numpy.asarray at the end gives NCHW."""
    layers = [(_weights(32, 20, 3, 1), dict(padding=1, activation="relu")),
              (_weights(40, 32, 1, 2), dict(activation="relu6")),
              (_weights(24, 40, 3, 3), dict(padding=1))]
    convs = [autoconv.Conv2d(w, layout="NCHW16c", **options) for w, options in layers]
    x = _random((1, 20, 11, 9), 4)
    launched = record_launches(opencl, monkeypatch)
    y = x
    for conv in convs:
        y = conv(y)
        assert isinstance(y, autoconv.DeviceArray) and y.layout == "NCHW16c"
    assert launched.count("reorder_to_blocked") == 1 and "reorder_to_nchw" not in launched, launched
    assert all(plan.algorithm == BLOCKED_DIRECT for conv in convs for plan in conv.plans.values())
    reference = _reference_chain(x, layers)
    result = np.asarray(y)
    assert result.shape == reference.shape
    assert np.max(np.abs(result - reference)) / np.max(np.abs(reference)) < 1e-4


def test_a_layer_no_algorithm_runs_blocked_computes_in_nchw_between_two_reorders(opencl, monkeypatch):
    dense = _weights(32, 16, 3, 5)
    grouped = _weights(32, 4, 3, 6)  # 8 groups of 4 channels: no whole block of 8 per group
    first = autoconv.Conv2d(dense, padding=1, layout="NCHW8c")
    second = autoconv.Conv2d(grouped, padding=1, groups=8)  # layout None: keeps its input's
    x = autoconv.to_device(_random((1, 16, 10, 10), 7), layout="NCHW8c")
    assert x.layout == "NCHW8c" and np.asarray(x).shape == (1, 16, 10, 10)
    launched = record_launches(opencl, monkeypatch)
    y = second(first(x))
    assert y.layout == "NCHW8c"
    assert second.computes_in((1, 32, 10, 10), layout="NCHW8c") == NCHW
    assert launched.count("reorder_to_nchw") == 1 and launched.count("reorder_to_blocked") == 1, launched
    reference = _reference_chain(np.asarray(x), [(dense, dict(padding=1)), (grouped, dict(padding=1, groups=8))])
    assert np.max(np.abs(np.asarray(y) - reference)) / np.max(np.abs(reference)) < 1e-4


def test_a_first_layer_of_few_channels_reads_nchw_and_its_result_is_reordered(opencl, monkeypatch):
    # Three colour channels fill 3 of 16 lanes: the layer computes in NCHW and only its result is
    # reordered, with no reorder of the (NCHW) input.
    weight = _weights(32, 3, 7, 11)
    first = autoconv.Conv2d(weight, stride=2, padding=3, activation="relu", layout="NCHW16c")
    x = _random((1, 3, 30, 30), 12)
    assert first.computes_in(x.shape, layout="NCHW16c") == NCHW
    launched = record_launches(opencl, monkeypatch)
    y = first(autoconv.to_device(x))
    assert y.layout == "NCHW16c"
    assert "reorder_to_nchw" not in launched and launched.count("reorder_to_blocked") == 1, launched
    spec = ConvSpec.from_shapes(x.shape, weight.shape, stride=2, padding=3, activation="relu")
    reference = reference_output(spec, (x, weight, None))
    assert np.max(np.abs(np.asarray(y) - reference)) / np.max(np.abs(reference)) < 1e-4
    # Half a block or fewer stays NCHW; more than half is computed blocked.
    assert autoconv.Conv2d(_weights(8, 8, 1, 13), layout="NCHW16c").computes_in((1, 8, 4, 4), layout="NCHW16c") == NCHW
    assert autoconv.Conv2d(_weights(8, 9, 1, 14), layout="NCHW16c").computes_in((1, 9, 4, 4),
                                                                               layout="NCHW16c") == "NCHW16c"


def test_a_residual_in_the_layers_layout_or_in_nchw(opencl, monkeypatch):
    weight = _weights(24, 24, 3, 8)
    layer = autoconv.Conv2d(weight, padding=1, activation="relu", layout="NCHW16c")
    x, shortcut = _random((2, 24, 6, 6), 9), _random((2, 24, 6, 6), 10)
    spec = ConvSpec.from_shapes(x.shape, weight.shape, padding=1, activation="relu", residual=True)
    reference = reference_output(spec, (x, weight, None, shortcut))
    blocked_x, blocked_shortcut = (autoconv.to_device(a, layout="NCHW16c") for a in (x, shortcut))
    launched = record_launches(opencl, monkeypatch)
    out = layer(blocked_x, residual=blocked_shortcut)
    assert "reorder_to_blocked" not in launched  # both already in the layer's layout
    assert np.max(np.abs(np.asarray(out) - reference)) / np.max(np.abs(reference)) < 1e-4
    out = layer(x, residual=shortcut)  # host arrays: reordered for it
    assert out.layout == "NCHW16c"
    assert np.max(np.abs(np.asarray(out) - reference)) / np.max(np.abs(reference)) < 1e-4


def test_layout_arguments_are_checked(opencl, simulated_cuda):
    weight = _weights(8, 8, 1, 11)
    with pytest.raises(InvalidSpecError, match="layout: expected None or one of"):
        autoconv.Conv2d(weight, layout="NHWC")
    with pytest.raises(InvalidSpecError, match="layout: expected one of"):
        autoconv.to_device(np.ones((1, 8, 2, 2), np.float32), layout="NCHW3c")
    with pytest.raises(InvalidSpecError, match="layout:"):
        ConvSpec(1, 8, 4, 4, 8, 1, 1, layout="NCHW32c")
    with pytest.raises(InvalidSpecError, match="numpy"):
        autoconv.Conv2d(weight, layout="NCHW8c", backend="numpy")
    with pytest.raises(InvalidSpecError, match="carry a layout"):
        autoconv.Conv2d(weight, layout="NCHW8c", backend="cuda")
    blocked = autoconv.to_device(np.ones((1, 8, 2, 2), np.float32), layout="NCHW4c")
    with pytest.raises(ValueError, match="reshape"):
        blocked.reshape(8, 4)
    with pytest.raises(InvalidSpecError, match="NCHW4c device array"):
        autoconv.conv2d(blocked, weight)  # the functional form computes NCHW: said, not misread
    assert "layout='NCHW4c'" in repr(blocked)


# The layout in the key, the database, the layer text and export ----------------------------------

def test_the_layout_is_in_the_key_the_database_and_the_layer_text(opencl, tmp_path):
    plain = ConvSpec(1, 32, 8, 8, 48, 3, 3, padding=1)
    blocked = plain.replace(layout="NCHW16c")
    assert plain.key() != blocked.key() and blocked.key().endswith("_float32_NCHW16c")
    assert parse_layer(layer_text(blocked)).spec == blocked and "NCHW16c" in str(blocked)
    db = tmp_path / "layouts.db"
    params = get_algorithm(BLOCKED_DIRECT).space.validate(dict(CB=16, KV=3, PIX=4))
    with SQLiteStore(db) as store:
        store.record_device(opencl.device)
        store.save_result(TunedResult(device=opencl.device.fingerprint(), spec=blocked, algorithm=BLOCKED_DIRECT,
                                      template_hash=template_hash(), params=params, median_ms=0.1, gflops=1.0,
                                      rel_error=1e-7, default_ms=0.2, trials=3))
    with SQLiteStore(db) as store:
        assert [r.spec for r in store.results()] == [blocked]
    assert lookup(blocked, opencl.device, db) == Plan(BLOCKED_DIRECT, params, "tuned")
    assert lookup(plain, opencl.device, db).source != "tuned"  # another layout: another layer


# The layout as a tuning dimension ---------------------------------------------------------------

def test_compare_measures_each_blocked_layout_with_its_reorders(opencl):
    from autoconv.compare import compare_layer

    spec = ConvSpec(1, 20, 10, 10, 24, 3, 3, padding=1, bias=True, activation="relu")
    rows = compare_layer(spec, opencl, repeats=2)
    blocked = [row for row in rows if row.layout != NCHW]
    assert {(row.algorithm, row.layout) for row in blocked} == {(a, layout) for a in RUN_BLOCKED for layout in BLOCKED}
    for row in blocked:
        assert row.verified and row.variant == f"{row.algorithm} ({row.layout})"
        assert 0 < row.reorder_ms < row.median_ms  # the reorders are counted in its time
    assert all(row.layout == NCHW for row in rows if row.algorithm not in RUN_BLOCKED)


def test_tune_with_layouts_tunes_each_layout_as_its_own_layer(opencl, tmp_path):
    from typer.testing import CliRunner

    from autoconv.cli import app

    db = tmp_path / "layouts.db"
    result = CliRunner().invoke(app, ["tune", "n=1,c=16,h=8,w=8,k=16,r=1,s=1", "--layouts", "NCHW,NCHW8c",
                                      "--trials", "2", "--db", str(db), "--json"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    with SQLiteStore(db) as store:
        results = store.results()
    assert {r.spec.layout for r in results} == {NCHW, "NCHW8c"}
    assert {r.algorithm for r in results if r.spec.layout == "NCHW8c"} == {BLOCKED_DIRECT}  # the one that runs it
    assert len({r.algorithm for r in results if r.spec.layout == NCHW}) > 1
    bad = CliRunner().invoke(app, ["tune", "n=1,c=16,h=8,w=8,k=16,r=1,s=1", "--layouts", "NHWC", "--db", str(db)])
    assert bad.exit_code != 0 and "--layouts" in bad.output and "NCHW16c" in bad.output


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_the_blocked_vector_epilogue_keeps_nan_and_inf_as_the_reference(opencl, activation):
    """The blocked layout stores whole vectors through its own (vector) epilogue: NaN and ±inf in the
    input, on the inside and on the border, give the reference's non-finite pattern."""
    spec = ConvSpec(1, 20, 7, 9, 24, 3, 3, padding=1, bias=True, activation=activation, residual=True,
                    layout="NCHW8c")
    x, weight, bias, residual = random_operands(spec, seed=3)
    x[0, 0, 3, 4, 2], x[0, 1, 0, 0, 5], x[0, 2, 6, 8, 3] = np.nan, np.inf, -np.inf
    result = opencl.prepare(spec, heuristic_plan(spec, opencl.device, BLOCKED_DIRECT)).run(x, weight, bias, residual)
    reference = reference_output(spec, (x, weight, bias, residual))
    assert np.array_equal(np.isnan(result), np.isnan(reference))
    assert np.array_equal(np.isposinf(result), np.isposinf(reference))
    assert np.array_equal(np.isneginf(result), np.isneginf(reference))
    finite = np.isfinite(reference)
    assert np.max(np.abs(result[finite] - reference[finite])) / np.max(np.abs(reference[finite])) < 1e-4
