"""The numpy backend: the float64 reference, direct loops, and im2col + the library's BLAS."""

from __future__ import annotations

import time as _time

import numpy as np

from autoconv.backends.base import DeviceInfo, Timing
from autoconv.errors import InvalidParamsError
from autoconv.plan import Plan
from autoconv.resources import check_host
from autoconv.render import ALGORITHM_DIRECT, ALGORITHM_IM2COL_BLAS, ALGORITHM_REFERENCE
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands


def _padded(x: np.ndarray, spec: ConvSpec, dtype: type) -> np.ndarray:
    ph, pw = spec.padding
    return np.pad(x.astype(dtype, copy=False), ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _window(xp: np.ndarray, spec: ConvSpec, r: int, s: int) -> np.ndarray:
    """The input pixels that filter tap (r, s) meets at every output position: [n, c, p, q]."""
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    h0, w0 = r * dh, s * dw
    return xp[:, :, h0:h0 + sh * (spec.p - 1) + 1:sh, w0:w0 + sw * (spec.q - 1) + 1:sw]


def direct_conv(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                dtype: type) -> np.ndarray:
    """Direct convolution, tap by tap: no patch matrix. In float64 it is the reference."""
    xp = _padded(x, spec, dtype)
    wt = weight.astype(dtype, copy=False)
    out = np.zeros(spec.output_shape, dtype=dtype)
    cg, kg = spec.c_per_group, spec.k_per_group
    for g in range(spec.groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = wt[g * kg:(g + 1) * kg]
        acc = out[:, g * kg:(g + 1) * kg]
        for r in range(spec.r):
            for s in range(spec.s):
                acc += np.einsum("ncpq,kc->nkpq", _window(xs, spec, r, s), ws[:, :, r, s], optimize=True)
    if bias is not None:
        out += bias.astype(dtype).reshape(1, -1, 1, 1)
    return out


def im2col(spec: ConvSpec, x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The patch matrix [groups, C/g·R·S, N·P·Q], rows ordered (c, r, s) like the weights."""
    xp = _padded(x, spec, dtype)
    cols = np.empty((spec.c, spec.r, spec.s, spec.n, spec.p, spec.q), dtype=dtype)
    for r in range(spec.r):
        for s in range(spec.s):
            cols[:, r, s] = _window(xp, spec, r, s).transpose(1, 0, 2, 3)
    return cols.reshape(spec.groups, spec.gemm_k, spec.gemm_n)


def im2col_blas_conv(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """im2col, then one BLAS SGEMM per group through numpy.matmul: the library baseline."""
    cols = im2col(spec, x)
    weights = weight.astype(np.float32, copy=False).reshape(spec.groups, spec.gemm_m, spec.gemm_k)
    product = np.matmul(weights, cols)  # [G, M, N·P·Q]
    out = product.reshape(spec.k, spec.n, spec.p, spec.q).transpose(1, 0, 2, 3)
    if bias is not None:
        out = out + bias.astype(np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(out)


def host_working_bytes(spec: ConvSpec, algorithm: str) -> int:
    """Host memory one run of an algorithm allocates: the padded input and the output in its
    working precision, twice the output for temporaries, and the patch matrix for im2col."""
    itemsize = 8 if algorithm == ALGORITHM_REFERENCE else 4
    padded = spec.n * spec.c * (spec.h + 2 * spec.padding[0]) * (spec.w + 2 * spec.padding[1])
    output = spec.n * spec.k * spec.p * spec.q
    scratch = spec.im2col_bytes if algorithm == ALGORITHM_IM2COL_BLAS else 0
    return itemsize * (padded + 3 * output) + scratch


class NumpyConv:
    """A ConvSpec prepared on the host: nothing to compile, so preparing only checks the plan."""

    def __init__(self, spec: ConvSpec, plan: Plan) -> None:
        self.spec = spec
        self.plan = plan

    def _compute(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        algorithm = self.plan.algorithm
        if algorithm == ALGORITHM_REFERENCE:
            return direct_conv(self.spec, x, weight, bias, np.float64)
        if algorithm == ALGORITHM_DIRECT:
            return direct_conv(self.spec, x, weight, bias, np.float32)
        return im2col_blas_conv(self.spec, x, weight, bias)

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            *, poison: bool = False) -> np.ndarray:
        check_operands(self.spec, x, weight, bias)
        result = self._compute(x, weight, bias)
        if poison:
            out = np.full(self.spec.output_shape, np.nan, dtype=result.dtype)
            out[...] = result
            return out
        return result

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             *, warmup: int = 2, repeats: int = 10, rotate: int = 3) -> Timing:
        check_operands(self.spec, x, weight, bias)
        # Distinct copies taken in turn, so no run finds its operands in cache from the one before.
        copies = [(x.copy(), weight.copy()) for _ in range(max(1, rotate))]
        for i in range(warmup):
            self._compute(*copies[i % len(copies)], bias)
        samples = []
        for i in range(repeats):
            operands = copies[i % len(copies)]
            start = _time.perf_counter()
            self._compute(*operands, bias)
            samples.append((_time.perf_counter() - start) * 1e3)
        return Timing(tuple(samples))


class NumpyBackend:
    """The host CPU through numpy; its im2col_blas is the library-BLAS baseline."""

    name = "numpy"
    algorithms = (ALGORITHM_REFERENCE, ALGORITHM_DIRECT, ALGORITHM_IM2COL_BLAS)

    def __init__(self) -> None:
        import platform

        self.device = DeviceInfo(
            backend="numpy", platform="numpy " + np.__version__, vendor="host",
            name=platform.processor() or platform.machine(), driver=np.__version__, device_type="host",
            compute_units=1, local_mem_bytes=0, max_work_group_size=1, max_work_item_sizes=(1, 1, 1),
        )

    def prepare(self, spec: ConvSpec, plan: Plan) -> NumpyConv:
        if plan.algorithm not in self.algorithms:
            raise InvalidParamsError(
                f"algorithm: the numpy backend runs {self.algorithms}, not {plan.algorithm!r}"
            )
        check_host(f"{plan.algorithm} on {spec}", host_working_bytes(spec, plan.algorithm))
        return NumpyConv(spec, plan)
