"""2-D pooling of device arrays (autoconv/backends/pool.py): each ONNX pooling variant a model
meets, in NCHW and every blocked layout, against the numpy operators (themselves checked against
onnxruntime in test_onnx_model.py), non-finite values included; and the kernels' template kept
out of the hash that tuned results are keyed by."""

from __future__ import annotations

import numpy as np
import pytest

from autoconv.backends.pool import DevicePool, PoolGeometry
from autoconv.backends.reorder import relayout
from autoconv.graph.ops import OPS
from autoconv.graph.runner import _device_pool_geometry
from autoconv.layouts import LAYOUTS, NCHW
from conftest import assert_padding_channels_zero

VARIANTS = {
    "maxpool": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1])),
    "maxpool-ceil": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "maxpool-resnet": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avgpool": ("AveragePool", dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 1, 0, 1])),
    "avgpool-count-pad": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    "avgpool-ceil": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "avgpool-same": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "global-avgpool": ("GlobalAveragePool", {}),
}


def _input(shape: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, shape) * rng.choice((-1.0, 1.0), shape)).astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(VARIANTS), ids=list(VARIANTS))
def test_device_pooling_matches_the_numpy_operator_in_every_layout(opencl, case, layout):
    op, attrs = VARIANTS[case]
    x = _input((2, 19, 11, 10))  # 19 channels: a partial last block in every blocked layout
    expected = OPS[op]([x], attrs, 13)[0]
    geometry = _device_pool_geometry(op, x.shape, attrs)
    assert geometry is not None
    pool = DevicePool(opencl, x.shape, layout, geometry)
    assert pool.output_shape == expected.shape
    y = pool(relayout(opencl, x, layout) if layout != NCHW else opencl.adopt(x))
    assert y.layout == layout and y.shape == expected.shape
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-6, atol=1e-6)
    if layout != NCHW:  # the layout's padding channels come out zero
        assert_padding_channels_zero(opencl, y, 19)


def test_device_max_pooling_keeps_nan_and_inf_as_numpy(opencl):
    x = _input((1, 4, 6, 6))
    x[0, 0, 1, 1], x[0, 1, 2, 3], x[0, 2, 4, 4] = np.nan, np.inf, -np.inf
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    expected = OPS["MaxPool"]([x], attrs, 13)[0]
    for layout in LAYOUTS:
        pool = DevicePool(opencl, x.shape, layout, _device_pool_geometry("MaxPool", x.shape, attrs))
        got = np.asarray(pool(relayout(opencl, x, layout)))
        np.testing.assert_array_equal(got, expected)  # NaN where numpy has NaN, the infinities kept


def test_what_the_device_kernel_lacks_is_left_to_numpy():
    assert _device_pool_geometry("MaxPool", (1, 2, 9, 9), dict(kernel_shape=[3, 3], dilations=[2, 2])) is None
    assert _device_pool_geometry("MaxPool", (1, 2, 9), dict(kernel_shape=[3])) is None  # 1-D pooling
    with pytest.raises(ValueError, match="kind"):
        PoolGeometry("min", (2, 2), (1, 1), ((0, 0), (0, 0)))


def test_the_runtimes_own_templates_are_not_in_the_tuned_template_hash(monkeypatch):
    """Editing a reorder or pooling kernel must not make every tuned database stale: their templates
    are outside the hash, and no tuned algorithm renders them."""
    from autoconv import render
    from autoconv.algorithms import get_algorithm, list_algorithms
    from autoconv.spec import ConvSpec

    rendered: set[str] = set()
    original = render.render_template

    def spying(name: str, **variables: object) -> str:
        rendered.add(name)
        return original(name, **variables)

    for module in ("autoconv.algorithms.blocked_direct", "autoconv.algorithms.winograd", "autoconv.algorithms.gemm",
                   "autoconv.algorithms.direct", "autoconv.algorithms.im2col_gemm", "autoconv.algorithms.implicit_gemm",
                   "autoconv.algorithms.blas"):
        mod = __import__(module, fromlist=["x"])
        if hasattr(mod, "render_template"):
            monkeypatch.setattr(mod, "render_template", spying)
    spec = ConvSpec(1, 16, 8, 8, 16, 3, 3, padding=1, bias=True)
    for name in list_algorithms():
        algorithm = get_algorithm(name)
        algorithm.kernels(spec, algorithm.space.validate({}), render.OPENCL)
    assert rendered and not rendered & render.UNTUNED_TEMPLATES
    assert {"shared/reorder.j2", "shared/pool.j2", "shared/affine.j2"} == set(render.UNTUNED_TEMPLATES)
    hashed = render.template_hash()
    render.template_hash.cache_clear()
    monkeypatch.setattr(render, "UNTUNED_TEMPLATES", frozenset())
    assert render.template_hash() != hashed  # the exclusion is what keeps the hash
    render.template_hash.cache_clear()
