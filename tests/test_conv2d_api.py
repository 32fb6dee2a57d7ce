"""autoconv.conv2d follows torch.nn.functional.conv2d's argument conventions."""

import numpy as np
import pytest

import autoconv
from autoconv import BackendUnavailableError, InvalidSpecError
from autoconv.tuning.verify import random_operands, relative_error
from autoconv.tuning.verify import reference_output as reference

pytestmark = pytest.mark.usefixtures("opencl")


@pytest.mark.parametrize(
    "stride, padding, dilation, groups",
    [(1, 0, 1, 1), (2, 1, 1, 1), ((2, 1), (1, 2), (2, 1), 1), (1, "same", 1, 2), (1, "valid", 2, 4), (1, 1, 1, 8)],
)
def test_argument_conventions(stride, padding, dilation, groups):
    spec_padding = {"same": 1, "valid": 0}.get(padding, padding) if isinstance(padding, str) else padding
    spec = autoconv.ConvSpec(2, 8, 11, 9, 8, 3, 3, stride=stride, padding=spec_padding, dilation=dilation,
                             groups=groups, bias=True)
    x, w, b = random_operands(spec, seed=3)
    out = autoconv.conv2d(x, w, b, stride, padding, dilation, groups)
    assert out.dtype == np.float32 and out.shape == spec.output_shape
    assert relative_error(out, reference(spec, (x, w, b))) < 1e-4


def test_accepts_float64_and_lists_and_returns_float32():
    x = np.random.default_rng(0).uniform(0.5, 1.5, (1, 2, 5, 5))
    w = np.random.default_rng(1).uniform(0.5, 1.5, (3, 2, 3, 3))
    out = autoconv.conv2d(x.tolist(), w, padding=1)
    assert out.dtype == np.float32 and out.shape == (1, 3, 5, 5)
    spec = autoconv.ConvSpec(1, 2, 5, 5, 3, 3, 3, padding=1)
    assert relative_error(out, reference(spec, (x.astype(np.float32), w.astype(np.float32), None))) < 1e-4


def test_numpy_backend_gives_the_same_answer():
    spec = autoconv.ConvSpec(1, 4, 9, 9, 6, 3, 3, padding=1, bias=True)
    x, w, b = random_operands(spec)
    opencl = autoconv.conv2d(x, w, b, padding=1)
    host = autoconv.conv2d(x, w, b, padding=1, backend="numpy")
    assert relative_error(opencl, host.astype(np.float64)) < 1e-4


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: autoconv.conv2d(x[0, 0], w), "input"),
        (lambda x, w: autoconv.conv2d(x, w[0]), "weight"),
        (lambda x, w: autoconv.conv2d(x, w, groups=3), "groups"),
        (lambda x, w: autoconv.conv2d(x, w[:, :2]), "weight"),
        (lambda x, w: autoconv.conv2d(x, w, np.ones(5, np.float32)), "bias"),
        (lambda x, w: autoconv.conv2d(x, w, np.ones((4, 1), np.float32)), "bias"),
        (lambda x, w: autoconv.conv2d(x, w, stride=0), "stride"),
        (lambda x, w: autoconv.conv2d(x, w, stride=(1, 1, 1)), "stride"),
        (lambda x, w: autoconv.conv2d(x, w, padding=-1), "padding"),
        (lambda x, w: autoconv.conv2d(x, w, padding="full"), "padding"),
        (lambda x, w: autoconv.conv2d(x, w, padding="same", stride=2), "padding"),
        (lambda x, w: autoconv.conv2d(x, w, dilation=9), "output size"),
        (lambda x, w: autoconv.conv2d(np.array([["a"]]), w), "input"),
        (lambda x, w: autoconv.conv2d(x, w, backend="metal"), "backend"),
        (lambda x, w: autoconv.conv2d(x, w, device=99), "device"),
        (lambda x, w: autoconv.conv2d(x, w, device="no-such-gpu"), "device"),
    ],
)
def test_bad_input_gets_a_precise_error(call, message):
    x = np.ones((1, 4, 8, 8), np.float32)
    w = np.ones((4, 4, 3, 3), np.float32)
    with pytest.raises(autoconv.AutoconvError, match=message):
        call(x, w)


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        autoconv.get_backend("cuda")


def test_invalid_spec_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        autoconv.conv2d(np.ones((1, 4, 8, 8)), np.ones((4, 4, 3, 3)), stride=0)
    assert issubclass(InvalidSpecError, autoconv.AutoconvError)


@pytest.mark.parametrize("algorithm", autoconv.list_algorithms())
@pytest.mark.parametrize("stride", [1, 2])
def test_an_algorithm_can_be_forced(algorithm, stride):
    spec = autoconv.ConvSpec(1, 8, 10, 10, 12, 3, 3, stride=stride, padding=1, bias=True)
    x, w, b = random_operands(spec, seed=5)
    reason = autoconv.get_algorithm(algorithm).supports(spec, autoconv.get_backend().device)
    if reason is not None:  # one clear error naming the algorithm and why, never a wrong answer
        with pytest.raises(autoconv.AutoconvError, match=f"{algorithm} does not support"):
            autoconv.conv2d(x, w, b, stride=stride, padding=1, algorithm=algorithm)
        return
    out = autoconv.conv2d(x, w, b, stride=stride, padding=1, algorithm=algorithm)
    assert relative_error(out, reference(spec, (x, w, b))) < 1e-4


def test_forcing_an_unknown_algorithm_is_one_clear_error():
    with pytest.raises(autoconv.AutoconvError, match="algorithm: 'fft' is not one of"):
        autoconv.conv2d(np.ones((1, 4, 8, 8), np.float32), np.ones((4, 4, 3, 3), np.float32), algorithm="fft")
