"""Direct loops: one work-item per output element, looping over C/g*R*S straight from global
memory; no patch matrix. The naive baseline that shows what im2col + GEMM buys, and (in float64
on the host) the reference every kernel is checked against."""

from __future__ import annotations

import numpy as np

from autoconv import epilogue
from autoconv.algorithms.base import AlgorithmDefaults, Params
from autoconv.render import Dialect, KernelArg, KernelSource, geometry_args, int_args, render_template
from autoconv.spec import ConvSpec


def _padded(x: np.ndarray, spec: ConvSpec, dtype: type) -> np.ndarray:
    (top, left), (bottom, right) = spec.padding, spec.bottom_right
    return np.pad(x.astype(dtype, copy=False), ((0, 0), (0, 0), (top, bottom), (left, right)))


def window(xp: np.ndarray, spec: ConvSpec, r: int, s: int) -> np.ndarray:
    """The padded-input pixels that filter tap (r, s) meets at every output position: [n, c, p, q]."""
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    h0, w0 = r * dh, s * dw
    return xp[:, :, h0:h0 + sh * (spec.p - 1) + 1:sh, w0:w0 + sw * (spec.q - 1) + 1:sw]


def padded_input(x: np.ndarray, spec: ConvSpec, dtype: type) -> np.ndarray:
    return _padded(x, spec, dtype)


def direct_conv(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                dtype: type) -> np.ndarray:
    """Direct convolution on the host, tap by tap. In float64 it is the reference."""
    xp = _padded(x, spec, dtype)
    wt: np.ndarray = weight.astype(dtype, copy=False)
    out: np.ndarray = np.zeros(spec.output_shape, dtype=dtype)
    cg, kg = spec.c_per_group, spec.k_per_group
    for g in range(spec.groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = wt[g * kg:(g + 1) * kg]
        acc = out[:, g * kg:(g + 1) * kg]
        for r in range(spec.r):
            for s in range(spec.s):
                acc += np.einsum("ncpq,kc->nkpq", window(xs, spec, r, s), ws[:, :, r, s], optimize=True)
    if bias is not None:
        out += bias.astype(dtype).reshape(1, -1, 1, 1)
    return out


def host_working_bytes(spec: ConvSpec, itemsize: int) -> int:
    """Host memory a direct run allocates: the padded input, the output and temporaries."""
    padded = spec.n * spec.c * spec.padded_h * spec.padded_w
    return itemsize * (padded + 3 * spec.n * spec.k * spec.p * spec.q)


class Direct(AlgorithmDefaults):
    name = "direct"
    title = "direct loops"
    device_kernels = True
    host_code = True

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        text = render_template("shared/direct.j2", dialect=dialect, entry="direct_conv",
                               epilogue=epilogue.template_vars(spec))
        args = (KernelArg("x", "input"), KernelArg("wt", "weight"), KernelArg("bias", "bias"),
                KernelArg("out", "output"), *epilogue.residual_args(spec),
                *int_args(has_bias=int(spec.bias), K=spec.k, Kg=spec.k_per_group),
                *geometry_args(spec))
        return [KernelSource(text, "direct_conv", dialect.name, (spec.q, spec.p, spec.n * spec.k), None, args)]

    def extra_host_bytes(self, spec: ConvSpec) -> int:
        return host_working_bytes(spec, 4)

    def traffic_bytes(self, spec: ConvSpec, params: Params) -> int:
        """No reuse by design: every output element reads its receptive field and its filter."""
        taps = spec.c_per_group * spec.r * spec.s
        return spec.n * spec.k * spec.p * spec.q * 2 * taps * spec.itemsize + spec.output_bytes

    def run_host(self, spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        return direct_conv(spec, x, weight, bias, np.float32)
