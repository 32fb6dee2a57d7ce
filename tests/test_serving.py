"""Serving: autoconv.Conv2d (resident weights, fused epilogues), device arrays chained on the
device, conv2d on the same machinery, and every way host memory reaches the kernels ("shared",
"mapped", "staged"), all run on PoCL against the float64 reference."""

import threading

import numpy as np
import pytest

import autoconv
from autoconv import Conv2d, ConvSpec, DeviceArray, get_algorithm
from autoconv.algorithms import IM2COL_BLAS, WINOGRAD, list_algorithms
from autoconv.backends import create_backend
from autoconv.errors import BackendUnavailableError, InvalidParamsError, InvalidSpecError
from autoconv.serve.session import default_session
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

from conftest import record_launches

MODES = ("shared", "mapped", "staged")
EPILOGUES = [(None, False), ("relu", True), ("relu6", False), (None, True)]
SPEC = ConvSpec(2, 6, 9, 11, 8, 3, 3, padding=1, bias=True)


@pytest.fixture(scope="module", params=MODES)
def device(request):
    """The OpenCL device run in each host-memory mode it can run."""
    try:
        backend = create_backend("opencl", host_memory=request.param)
    except BackendUnavailableError as exc:
        pytest.skip(f"opencl backend unavailable here: {exc}")
    except InvalidParamsError as exc:
        pytest.skip(str(exc))
    return backend


def assert_close(result, spec: ConvSpec, operands: tuple) -> None:
    host = np.asarray(result)
    assert host.shape == spec.output_shape
    assert np.all(np.isfinite(host)), f"unwritten output elements for {spec}"
    error = relative_error(host, reference_output(spec, operands))
    assert error < TOLERANCE, f"{spec}: relative error {error:.2e}"


def run_at_once(worker, count: int) -> list[BaseException]:
    """worker(0) .. worker(count - 1) on threads released together; what any of them raised."""
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            worker(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def fused(spec: ConvSpec, activation, residual: bool) -> ConvSpec:
    return spec.replace(activation=activation, residual=residual)


@pytest.mark.parametrize("activation,residual", EPILOGUES)
def test_every_algorithm_in_a_layer_matches_the_reference(device, activation, residual):
    spec = fused(SPEC, activation, residual)
    operands = random_operands(spec, seed=5)
    x, w, b = operands[:3]
    r = operands[3] if residual else None
    for algorithm in list_algorithms():
        if get_algorithm(algorithm).supports(spec, device.device) is not None:
            continue
        layer = Conv2d(w, b, padding=1, activation=activation, backend=device, algorithm=algorithm)
        host = layer(x, residual=r)
        assert isinstance(host, np.ndarray), algorithm
        assert_close(host, spec, operands)
        on_device = layer(device.adopt(x), residual=None if r is None else device.adopt(r))
        assert isinstance(on_device, DeviceArray), algorithm
        assert_close(on_device, spec, operands)
        if r is not None:  # a host residual beside a device input, and the other way round
            assert_close(layer(device.adopt(x), residual=r), spec, operands)
            assert_close(layer(x, residual=device.adopt(r)), spec, operands)


def bottleneck(device, seed: int = 0):
    """A ResNet bottleneck block (1x1 -> 3x3 -> 1x1, ReLU after each, the shortcut added before
    the last ReLU) with random weights, as layers, and its float64 reference."""
    rng = np.random.default_rng(seed)
    c, mid, h = 16, 8, 10

    def weights(*shape):
        return (rng.uniform(0.5, 1.5, shape) * rng.choice((-1.0, 1.0), shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    w1, b1, w2, b2, w3, b3 = weights(mid, c, 1, 1), weights(mid), weights(mid, mid, 3, 3), weights(mid), \
        weights(c, mid, 1, 1), weights(c)
    layers = (Conv2d(w1, b1, activation="relu", backend=device), Conv2d(w2, b2, padding=1, activation="relu", backend=device),
              Conv2d(w3, b3, activation="relu", backend=device))
    x = weights(1, c, h, h) * 4

    def reference(x64):
        s1 = ConvSpec(1, c, h, h, mid, 1, 1, bias=True, activation="relu")
        y1 = reference_output(s1, (x64, w1, b1))
        y2 = reference_output(ConvSpec(1, mid, h, h, mid, 3, 3, padding=1, bias=True, activation="relu"), (y1, w2, b2))
        return reference_output(ConvSpec(1, mid, h, h, c, 1, 1, bias=True, activation="relu", residual=True),
                                (y2, w3, b3, x64))
    return layers, x, reference(x.astype(np.float64))


def test_a_chained_bottleneck_block_never_leaves_the_device(device, monkeypatch):
    (c1, c2, c3), x, expected = bottleneck(device)
    x_dev = autoconv.to_device(x) if device is autoconv.get_backend("opencl") else device.adopt(x)
    for layer, shape in ((c1, x.shape), (c2, (1, 8, 10, 10)), (c3, (1, 8, 10, 10))):
        layer.prepare(shape, residual=layer is c3)
    touched: list[str] = []
    for name in ("upload", "download", "wait", "expose"):
        original = getattr(device, name)
        monkeypatch.setattr(device, name, lambda *a, _name=name, _original=original, **k:
                            touched.append(_name) or _original(*a, **k))
    y = c3(c2(c1(x_dev)), residual=x_dev)
    assert isinstance(y, DeviceArray)
    assert touched == [], f"the chain touched the host: {touched}"
    assert relative_error(np.asarray(y), expected) < TOLERANCE
    # The same block with host round trips between the layers gives the same result.
    assert relative_error(c3(np.asarray(c2(np.asarray(c1(x)))), residual=x), expected) < TOLERANCE


def test_threads_calling_one_layer_get_their_own_results(device):
    spec = fused(SPEC, "relu", True)
    _, w, b, _ = random_operands(spec, seed=1)
    for algorithm in ("implicit_gemm", WINOGRAD, IM2COL_BLAS):
        layer = Conv2d(w, b, padding=1, activation="relu", backend=device, algorithm=algorithm)
        inputs = [random_operands(spec, seed=100 + i) for i in range(8)]
        results: dict[int, list] = {}

        def worker(i: int) -> None:
            x, _, _, r = inputs[i]
            results[i] = [layer(x, residual=r) if j % 2 == 0 else np.asarray(layer(device.adopt(x), residual=r))
                          for j in range(4)]

        failures = run_at_once(worker, len(inputs))
        assert not failures, failures
        for i, (x, _, _, r) in enumerate(inputs):
            expected = reference_output(spec, (x, w, b, r))
            for result in results[i]:
                assert relative_error(result, expected) < TOLERANCE, algorithm


@pytest.mark.parametrize("algorithm", ["im2col_gemm", WINOGRAD, IM2COL_BLAS])
def test_a_layer_copies_its_weights_and_set_weights_replaces_them(opencl, algorithm):
    x, w, b = random_operands(SPEC, seed=2)
    original = (w.copy(), b.copy())
    layer = Conv2d(w, b, padding=1, algorithm=algorithm)
    assert_close(layer(x), SPEC, (x, *original))
    w *= 2.0  # the caller changes its arrays: the layer keeps the copy it made
    b += 1.0
    assert_close(layer(x), SPEC, (x, *original))
    with pytest.raises(ValueError):
        layer.weight[0, 0, 0, 0] = 1.0  # the layer's own copy is read-only
    layer.set_weights(w, b)
    assert_close(layer(x), SPEC, (x, w, b))
    with pytest.raises(InvalidSpecError, match="weight: expected shape"):
        layer.set_weights(w[:, :3], b)
    with pytest.raises(InvalidSpecError, match="bias: the layer was made with a bias"):
        layer.set_weights(w)


def test_conv2d_never_serves_weights_changed_in_place(opencl):
    x, w, b = random_operands(SPEC, seed=3)
    for algorithm in ("implicit_gemm", WINOGRAD):  # weights read in place, and transformed once
        assert_close(autoconv.conv2d(x, w, b, padding=1, algorithm=algorithm), SPEC, (x, w, b))
        w[1, 2, 0, 0] += 3.0
        assert_close(autoconv.conv2d(x, w, b, padding=1, algorithm=algorithm), SPEC, (x, w, b))


def test_a_device_that_shares_host_memory_copies_nothing(opencl, monkeypatch):
    if opencl.host_memory != "shared":
        pytest.skip(f"{opencl.device.name} does not compute in host memory")
    x, w, b = random_operands(SPEC, seed=4)
    layer = Conv2d(w, b, padding=1, algorithm="im2col_gemm")
    layer.prepare(x.shape)
    x_dev = autoconv.to_device(x)
    for name in ("upload", "download", "copy", "expose"):
        monkeypatch.setattr(opencl, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} on a shared-memory device"))
    assert_close(layer(x), SPEC, (x, w, b))
    y = layer(x_dev)
    assert np.shares_memory(np.asarray(y), np.asarray(y))  # a view of the memory the kernels wrote, twice
    assert_close(y, SPEC, (x, w, b))
    assert not np.shares_memory(y.numpy(), np.asarray(y))  # .numpy() is a copy


def test_pocl_computes_in_host_memory(opencl):
    if "portable computing language" not in opencl.device.platform.lower() or opencl.device.device_type != "cpu":
        pytest.skip("not PoCL's CPU device")
    assert opencl.host_memory == "shared"


def test_results_dropped_while_their_readers_are_queued_are_reused(opencl):
    # A chain enqueued far ahead of the device (a barrier holds the queue): each result is dropped
    # while the kernel reading it still waits, and the next result reuses its memory (the queue is
    # in order) instead of fresh pages; the chain still computes right.
    if opencl.host_memory != "shared":
        pytest.skip("results come from the host-memory pool only where the device shares it")
    import pyopencl as cl

    spec = ConvSpec(1, 8, 6, 6, 8, 3, 3, padding=1)
    x, w, _ = random_operands(spec, seed=12)
    w = w / 8  # the chain stays near 1
    layer = Conv2d(w, padding=1, backend=opencl)
    layer.prepare(x.shape)  # kernels built and weights loaded (and waited for) before the barrier
    expected = x.astype(np.float64)
    for _ in range(10):
        expected = reference_output(spec, (expected, w, None))
    gate = cl.UserEvent(opencl.context)
    cl.enqueue_barrier(opencl.queue, wait_for=[gate])
    y = opencl.adopt(np.array(x, dtype=np.float32))
    buffers = set()
    for _ in range(10):
        y = layer(y)
        buffers.add(id(y.buffer))
    assert y._ready.command_execution_status != cl.command_execution_status.COMPLETE  # all still queued
    gate.set_status(cl.command_execution_status.COMPLETE)
    assert relative_error(np.asarray(y), expected) < TOLERANCE
    assert len(buffers) <= 3, f"{len(buffers)} result buffers for a chain of 10 calls"


def test_staged_copies_go_through_reused_pinned_memory(monkeypatch):
    try:
        staged = create_backend("opencl", host_memory="staged")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    made: list[int] = []
    pinned = staged.pinned
    monkeypatch.setattr(staged, "pinned", lambda count: made.append(count) or pinned(count))
    x, w, b = random_operands(SPEC, seed=6)
    layer = Conv2d(w, b, padding=1, backend=staged, algorithm="implicit_gemm")
    for _ in range(3):
        assert_close(layer(x), SPEC, (x, w, b))
    assert len(made) == 3  # one set (input, output, residual) made once, then reused
    with pytest.raises(InvalidParamsError, match="staged"):
        staged.wrap(x, writable=False)


def test_a_device_array_behaves_like_an_array(opencl):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    array = autoconv.to_device(x)
    assert isinstance(array, DeviceArray) and array.shape == x.shape and array.dtype == np.float32
    assert (array.ndim, array.size, array.nbytes, len(array)) == (4, x.size, x.size * 4, 2)
    np.testing.assert_array_equal(np.asarray(array), x.astype(np.float32))
    np.testing.assert_array_equal(array.reshape(6, 20).numpy(), x.reshape(6, 20))
    x[0, 0, 0, 0] = 99  # to_device copied
    assert np.asarray(array)[0, 0, 0, 0] == 0
    assert "DeviceArray(shape=(2, 3, 4, 5)" in repr(array)
    with pytest.raises(ValueError, match="reshape"):
        array.reshape(7, 7)
    with pytest.raises(InvalidSpecError, match="integer|floating"):
        autoconv.to_device(np.arange(4))
    with pytest.raises(InvalidSpecError, match="host"):
        autoconv.to_device(x, backend="numpy")


def test_a_device_array_of_another_context_is_refused_by_name(opencl):
    other = create_backend("opencl")  # the same device, another context and queue
    x, w, b = random_operands(SPEC, seed=7)
    layer = Conv2d(w, b, padding=1)
    with pytest.raises(InvalidSpecError, match="input: the DeviceArray lives on .*another context"):
        layer(other.adopt(x))


def test_every_selector_of_one_device_shares_one_backend(opencl):
    session = default_session()
    assert session.backend("opencl", None) is session.backend("opencl", 0)
    assert session.backend("opencl", opencl.device.name) is session.backend("opencl")


def test_conv2d_reads_and_returns_device_arrays(opencl):
    x, w, b = random_operands(SPEC, seed=8)
    for algorithm in ("im2col_gemm", IM2COL_BLAS):  # on the device, and on the host (adopted)
        y = autoconv.conv2d(autoconv.to_device(x), w, b, padding=1, algorithm=algorithm)
        assert isinstance(y, DeviceArray)
        assert_close(y, SPEC, (x, w, b))
    unbatched = autoconv.conv2d(autoconv.to_device(x[0]), w, b, padding=1)
    assert isinstance(unbatched, DeviceArray) and unbatched.shape == SPEC.output_shape[1:]
    empty = autoconv.conv2d(autoconv.to_device(np.zeros((0, 6, 9, 11), np.float32)), w, b, padding=1)
    assert np.asarray(empty).shape == (0, 8, 9, 11)


def test_layer_shapes_unbatched_and_empty_inputs(opencl):
    x, w, b = random_operands(SPEC, seed=9)
    layer = Conv2d(w, b, padding="same")
    single = layer(x[1])
    assert single.shape == SPEC.output_shape[1:]
    assert_close(single[None], SPEC.replace(n=1), (x[1:], w, b))
    assert layer(np.zeros((0, 6, 9, 11), np.float32)).shape == (0, 8, 9, 11)
    assert layer(x.astype(np.float64)).dtype == np.float32  # any floating-point input, computed in float32
    assert set(layer.plans) == {((6, 9, 11), False, "NCHW"), ((2, 6, 9, 11), False, "NCHW")}
    assert "Conv2d(6 -> 8, 3x3" in repr(layer)


def test_a_layer_on_the_host_backend(opencl):
    spec = fused(SPEC, "relu6", True)
    x, w, b, r = random_operands(spec, seed=10)
    layer = Conv2d(w, b, padding=1, activation="relu6", backend="numpy")
    assert_close(layer(x, residual=r), spec, (x, w, b, r))
    assert_close(layer(autoconv.to_device(x), residual=r), spec, (x, w, b, r))  # read through numpy.asarray


@pytest.mark.parametrize("make,message", [
    (lambda w, b: Conv2d(w, b, activation="gelu"), "activation: expected None, 'relu' or 'relu6'"),
    (lambda w, b: Conv2d(w[0], b), "weight: expected a 4-D"),
    (lambda w, b: Conv2d(w, b[:3]), r"bias: expected shape \(8,\)"),
    (lambda w, b: Conv2d(w, b, groups=True), "groups: expected a positive int"),
    (lambda w, b: Conv2d(w, b, groups=3), "groups"),
    (lambda w, b: Conv2d(w, b, stride=2, padding="same"), "padding: 'same' is not supported for strided"),
    (lambda w, b: Conv2d(w, b, stride=(1, 0)), "stride: must be positive"),
    (lambda w, b: Conv2d(w, b, dilation="x"), "dilation: expected an int or a pair"),
    (lambda w, b: Conv2d(w, b, algorithm="fft"), "algorithm: 'fft' is not one of"),
    (lambda w, b: Conv2d(w.astype(np.int32), b), "weight: expected a floating-point array"),
    (lambda w, b: Conv2d(w, b, backend="tpu"), "backend: 'tpu' is not one of"),
    (lambda w, b: Conv2d(w, b, backend=object()), "backend: expected 'opencl', 'cuda', 'numpy' or a Backend"),
])
def test_bad_layer_arguments_are_one_precise_error(opencl, make, message):
    _, w, b = random_operands(SPEC, seed=11)
    with pytest.raises(autoconv.AutoconvError, match=message):
        make(w, b)


def test_bad_call_arguments_are_one_precise_error(opencl):
    spec = fused(SPEC, "relu", True)
    x, w, b, r = random_operands(spec, seed=12)
    layer = Conv2d(w, b, padding=1, activation="relu")
    with pytest.raises(InvalidSpecError, match="expects 6 input channels .* but input has c=5"):
        layer(x[:, :5])
    with pytest.raises(InvalidSpecError, match=r"residual: expected shape \(2, 8, 9, 11\), got \(2, 8, 9, 10\)"):
        layer(x, residual=r[..., :10])
    with pytest.raises(InvalidSpecError, match=r"residual: expected shape"):
        layer(autoconv.to_device(x), residual=autoconv.to_device(r[:1]))
    with pytest.raises(InvalidSpecError, match="input: expected a 3-D .* or 4-D"):
        layer(x[0, 0])
    with pytest.raises(InvalidSpecError, match="input: expected a floating-point array"):
        layer(x.astype(np.int64))


def test_chained_layers_run_the_winograd_filter_transform_once(opencl, monkeypatch):
    launched = record_launches(opencl, monkeypatch)
    x, w, b = random_operands(SPEC, seed=13)
    layer = Conv2d(w, b, padding=1, algorithm=WINOGRAD)
    for _ in range(3):
        assert_close(layer(autoconv.to_device(x)), SPEC, (x, w, b))
    assert launched.count("winograd_filter") == 1 and launched.count("winograd_output") == 3
    layer.set_weights(w * 2, b)
    assert launched.count("winograd_filter") == 2


def test_dropped_intermediates_of_a_chain_never_free_memory_under_a_queued_kernel(device):
    """Each l1 output (and each to_device input) is dropped as soon as the next layer has queued
    its kernels: the memory they own must outlive those kernels (a use-after-free otherwise)."""
    rng = np.random.default_rng(14)
    c, h = 24, 32
    w1 = (rng.standard_normal((c, c, 3, 3)) / 15).astype(np.float32)
    w2 = (rng.standard_normal((c, c, 1, 1)) / 5).astype(np.float32)
    first = Conv2d(w1, padding=1, activation="relu", backend=device, algorithm="direct")  # slow on purpose
    second = Conv2d(w2, activation="relu", backend=device, algorithm="implicit_gemm")
    inputs = [rng.standard_normal((1, c, h, h)).astype(np.float32) for _ in range(12)]
    s1 = ConvSpec(1, c, h, h, c, 3, 3, padding=1, activation="relu")
    s2 = ConvSpec(1, c, h, h, c, 1, 1, activation="relu")
    expected = [reference_output(s2, (reference_output(s1, (x, w1, None)), w2, None)) for x in inputs]
    for _ in range(3):
        outputs = [second(first(device.adopt(x.copy()))) for x in inputs]
        clutter = [np.full((1, c, h, h), 7.0, np.float32) for _ in range(40)]  # takes freed memory, if any
        for output, reference in zip(outputs, expected):
            assert relative_error(np.asarray(output), reference) < TOLERANCE
        del clutter


def test_threads_calling_conv2d_with_different_weights_get_their_own_results(opencl):
    """conv2d shares one prepared conv per layer shape: weights it transforms (Winograd) or
    copies (staged memory) stay loaded until the call that loaded them has queued its kernels."""
    operands = [random_operands(SPEC, seed=200 + i) for i in range(6)]
    expected = [reference_output(SPEC, ops) for ops in operands]
    wrong: list[str] = []

    def worker(i: int) -> None:
        x, w, b = operands[i]
        for _ in range(4):
            for algorithm in (WINOGRAD, "implicit_gemm"):
                error = relative_error(autoconv.conv2d(x, w, b, padding=1, algorithm=algorithm), expected[i])
                if not error < TOLERANCE:
                    wrong.append(f"thread {i} {algorithm}: relative error {error:.1e}")

    failures = run_at_once(worker, len(operands))
    assert not failures and not wrong, (failures, wrong)


def test_results_are_reused_only_once_nobody_holds_them(opencl):
    if opencl.host_memory != "shared":
        pytest.skip("result arrays are pooled where the device computes in host memory")
    x, w, b = random_operands(SPEC, seed=15)
    layer = Conv2d(w, b, padding=1, algorithm="implicit_gemm")
    expected = reference_output(SPEC, (x, w, b))
    held = [layer(x * (i + 1)) for i in range(3)]  # held: each its own memory
    views = [held[0][0]]  # a view keeps its base
    assert len({a.__array_interface__["data"][0] for a in held}) == 3
    dropped = layer(x).__array_interface__["data"][0]  # dropped at once: its memory is free again
    again = layer(x)
    assert again.__array_interface__["data"][0] == dropped
    for i, result in enumerate(held):
        assert relative_error(result, reference_output(SPEC, (x * (i + 1), w, b))) < TOLERANCE
    assert relative_error(views[0][None], expected[:1] * 1.0) < TOLERANCE
    device = layer(autoconv.to_device(x))  # a device array holds its memory too
    assert not np.shares_memory(np.asarray(device), layer(x))
