"""im2col + the library's BLAS: the baseline every generated kernel is measured against, an
algorithm like the others. On the host: numpy's im2col and matmul (OpenBLAS); a device backend
with a BLAS of its own (cuBLAS on CUDA) runs the im2col kernel and its library GEMM instead."""

from __future__ import annotations

import numpy as np

from autoconv.algorithms import im2col_gemm
from autoconv.algorithms.base import AlgorithmDefaults, Params
from autoconv.algorithms.direct import host_working_bytes, padded_input, window
from autoconv.render import Dialect, KernelSource
from autoconv.spec import ConvSpec

# The im2col a device BLAS reads: one element per work-item, pixels contiguous, least padding.
DEVICE_IM2COL = im2col_gemm.SPACE.validate(dict(NWG=16, WPTN=1, VWN=1, IM2COL_ROWS=0, B_TRANSPOSED=0))


def im2col(spec: ConvSpec, x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The patch matrix [groups, C/g·R·S, N·P·Q], rows ordered (c, r, s) like the weights."""
    xp = padded_input(x, spec, dtype)
    cols: np.ndarray = np.empty((spec.c, spec.r, spec.s, spec.n, spec.p, spec.q), dtype=dtype)
    for r in range(spec.r):
        for s in range(spec.s):
            cols[:, r, s] = window(xp, spec, r, s).transpose(1, 0, 2, 3)
    return cols.reshape(spec.groups, spec.gemm_k, spec.gemm_n)


def im2col_blas_conv(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """im2col, then one BLAS SGEMM per group through numpy.matmul."""
    if (spec.r, spec.s, spec.stride) == (1, 1, (1, 1)) and not spec.padded and spec.n == 1:
        cols = x.astype(np.float32, copy=False).reshape(spec.groups, spec.gemm_k, spec.gemm_n)  # no copy needed
    else:
        cols = im2col(spec, x)
    weights = weight.astype(np.float32, copy=False).reshape(spec.groups, spec.gemm_m, spec.gemm_k)
    product = np.matmul(weights, cols)  # [G, M, N·P·Q]
    out = product.reshape(spec.k, spec.n, spec.p, spec.q).transpose(1, 0, 2, 3)
    if bias is not None:
        out = out + bias.astype(np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(out)


class Im2colBlas(AlgorithmDefaults):
    name = "im2col_blas"
    title = "im2col + library BLAS"
    host_code = True
    library_gemm = True

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        """The im2col a device BLAS multiplies (its GEMM is the backend's library call)."""
        return [im2col_gemm.render_im2col(spec, DEVICE_IM2COL, dialect)]

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        return im2col_gemm.scratch_bytes(spec, DEVICE_IM2COL)

    def extra_host_bytes(self, spec: ConvSpec) -> int:
        return host_working_bytes(spec, 4) + spec.im2col_bytes

    def run_host(self, spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        return im2col_blas_conv(spec, x, weight, bias)
