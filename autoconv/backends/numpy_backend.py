"""The numpy backend: algorithms with host code (direct loops, im2col + the library's BLAS) run on
the host CPU, timed with the wall clock."""

from __future__ import annotations

import platform
import threading
import time as _time

import numpy as np

from autoconv import epilogue
from autoconv.algorithms import get_algorithm, list_algorithms
from autoconv.backends.base import Backend, PreparedConv, Timing, calibrated_runs
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError
from autoconv.plan import Plan
from autoconv.resources import check_host
from autoconv.spec import ConvSpec
from autoconv.tensors import check_operands


class NumpyConv(PreparedConv):
    """A ConvSpec prepared on the host: nothing to compile, so preparing only checks the plan."""

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def transforms_weights(self) -> bool:
        return False

    @property
    def lends_weights(self) -> bool:
        return True  # host code reads the caller's weights where they are

    def __init__(self, spec: ConvSpec, plan: Plan) -> None:
        self.spec = spec
        self.plan = plan
        self._algorithm = get_algorithm(plan.algorithm)
        self._weights: tuple[np.ndarray, np.ndarray | None] | None = None
        self._lock = threading.RLock()

    def load_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self._weights = (np.array(weight, dtype=np.float32, order="C"),
                         None if bias is None else np.array(bias, dtype=np.float32, order="C"))

    def ensure_weights(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.load_weights(weight, bias)  # host code reads them in place: nothing to compare against

    def call(self, x: np.ndarray, residual: np.ndarray | None = None, *, weight: np.ndarray | None = None,
             bias: np.ndarray | None = None, device_output: bool = False, poison: bool = False) -> np.ndarray:
        """The serving call (see LaunchedConv.call): host arrays only."""
        if device_output:
            raise InvalidParamsError("the numpy backend computes on the host: it makes no device arrays")
        if weight is None:
            if self._weights is None:
                raise InvalidParamsError("no weights: call load_weights first or pass them")
            weight, bias = self._weights
        return self._finish(self._compute(x, weight, bias, residual), poison)

    def _finish(self, result: np.ndarray, poison: bool) -> np.ndarray:
        if poison:  # host code writes whole arrays; poisoning checks that the copy out is whole too
            out = np.full(self.spec.output_array_shape, np.nan, dtype=result.dtype)
            out[...] = result
            return out
        return result

    def _compute(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                 residual: np.ndarray | None = None) -> np.ndarray:
        return epilogue.apply(self.spec, self._algorithm.run_host(self.spec, x, weight, bias), residual)

    def run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            residual: np.ndarray | None = None, *, poison: bool = False) -> np.ndarray:
        check_operands(self.spec, x, weight, bias, residual)
        return self._finish(self._compute(x, weight, bias, residual), poison)

    def time(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
             residual: np.ndarray | None = None, *, warmup: int = 2, repeats: int = 10, rotate: int = 3, stage: str = "call",
             min_sample_ms: float = 0.0) -> Timing:
        check_operands(self.spec, x, weight, bias, residual)
        if stage == "weights":  # host algorithms use the weights as given: nothing to prepare
            return Timing((0.0,))
        # Distinct copies taken in turn, so no run finds its operands in cache from the one before.
        copies = [(x.copy(), weight.copy()) for _ in range(max(1, rotate))]
        last_ms = 0.0
        for i in range(max(1, warmup)):
            start = _time.perf_counter()
            self._compute(*copies[i % len(copies)], bias, residual)
            last_ms = (_time.perf_counter() - start) * 1e3

        def time_runs(runs: int, first: int = 0) -> float:
            start = _time.perf_counter()
            for j in range(runs):
                self._compute(*copies[(first + j) % len(copies)], bias, residual)
            return (_time.perf_counter() - start) * 1e3

        runs = calibrated_runs(time_runs, last_ms, min_sample_ms)
        return Timing(tuple(time_runs(runs, i * runs) / runs for i in range(repeats)))


class NumpyBackend(Backend):
    """The host CPU through numpy; its im2col_blas is the library-BLAS baseline."""

    name = "numpy"

    def __init__(self) -> None:
        self.algorithms = tuple(name for name in list_algorithms() if get_algorithm(name).host_code)
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
        reason = get_algorithm(plan.algorithm).supports(spec, self.device)
        if reason is not None:
            raise InvalidParamsError(f"algorithm: {plan.algorithm} does not support {spec}: {reason}")
        check_host(f"{plan.algorithm} on {spec}", get_algorithm(plan.algorithm).extra_host_bytes(spec))
        return NumpyConv(spec, plan)
