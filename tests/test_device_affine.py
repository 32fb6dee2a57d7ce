"""The per-channel affine map of device arrays (autoconv/backends/affine.py), what a model's
BatchNormalization that follows no convolution runs as, with its Relu or Clip(0, 6): in NCHW and
every blocked layout on every device backend, against the numpy operators (themselves checked
against onnxruntime in test_onnx_model.py), non-finite values included."""

from __future__ import annotations

import numpy as np
import pytest

from autoconv.backends.affine import DeviceAffine
from autoconv.backends.reorder import relayout
from autoconv.graph.ops import OPS, activate
from autoconv.layouts import LAYOUTS, NCHW
from conftest import assert_padding_channels_zero


def _host(y) -> np.ndarray:
    """A device result on the host (a CuPy array, real or simulated, only through .get())."""
    return y.get() if hasattr(y, "get") else np.asarray(y)


def _case(channels: int = 19, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, channels, 5, 7)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    mean, var = rng.standard_normal(channels).astype(np.float32), rng.uniform(0.5, 2.0, channels).astype(np.float32)
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    return x, (scale, bias, mean, var), factor, bias - mean * factor


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_the_affine_map_matches_batch_normalization_and_its_activation_in_every_layout(backend, layout, activation):
    if backend.name == "numpy" or (layout != NCHW and not getattr(backend, "layout_arrays", False)):
        pytest.skip("a device backend whose arrays carry this layout")
    x, stats, factor, shift = _case()
    x *= 4  # values past 6 for relu6
    expected = activate(OPS["BatchNormalization"]([x, *stats], {}, 13)[0], None if activation == "none" else activation)
    affine = DeviceAffine(backend, x.shape, layout, factor, shift, activation)
    y = affine(relayout(backend, x, layout) if layout != NCHW else backend.adopt(x.copy()))
    assert getattr(y, "layout", NCHW) == layout and y.shape == x.shape
    np.testing.assert_allclose(_host(y), expected, rtol=2e-6, atol=2e-6)
    if layout != NCHW:  # the layout's padding channels come out zero
        assert_padding_channels_zero(backend, y, 19)


def test_nan_and_the_infinities_pass_as_numpy_has_them(opencl):
    x, stats, factor, shift = _case(channels=4)
    x[0, 0, 1, 1], x[0, 1, 2, 3], x[1, 2, 4, 4] = np.nan, np.inf, -np.inf
    for activation in ("relu", "relu6"):
        expected = activate(OPS["BatchNormalization"]([x, *stats], {}, 13)[0], activation)
        for layout in LAYOUTS:
            affine = DeviceAffine(opencl, x.shape, layout, factor, shift, activation)
            got = np.asarray(affine(relayout(opencl, x, layout) if layout != NCHW else opencl.adopt(x.copy())))
            np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)  # NaN where numpy has NaN


def test_bad_factors_and_activations_are_refused(opencl):
    x, _, factor, shift = _case(channels=4)
    with pytest.raises(ValueError, match="expected 4 values each"):
        DeviceAffine(opencl, x.shape, NCHW, factor[:3], shift)
    with pytest.raises(ValueError, match="activation"):
        DeviceAffine(opencl, x.shape, NCHW, factor, shift, "gelu")
