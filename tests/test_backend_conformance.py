"""One contract, every backend: absent backends (cuda here) skip."""

import re

import numpy as np
import pytest

from autoconv import ConvSpec, InvalidParamsError, Plan, get_algorithm, list_algorithms
from autoconv.backends.base import Timing
from autoconv.device import DeviceInfo

from conftest import assert_matches_reference, plan_for

SHAPES = [
    ConvSpec(2, 6, 9, 11, 4, 3, 3, padding=1, groups=2, bias=True),
    ConvSpec(1, 3, 17, 13, 8, 5, 5, stride=2, padding=2, dilation=2),
    ConvSpec(1, 8, 10, 10, 8, 3, 3, padding=1, groups=8),
    ConvSpec(3, 16, 7, 7, 37, 1, 1, bias=True),
]


class TestBackendConformance:
    def test_describes_its_device(self, backend):
        assert isinstance(backend.device, DeviceInfo)
        assert backend.device.backend == backend.name
        assert backend.name in backend.device.fingerprint()

    @pytest.mark.parametrize("spec", SHAPES, ids=str)
    def test_every_algorithm_matches_the_reference(self, backend, spec):
        for algorithm in backend.algorithms:
            reason = get_algorithm(algorithm).supports(spec, backend.device)
            if reason is None:
                assert_matches_reference(backend, spec, plan_for(backend, algorithm, spec))
            else:  # refused with the algorithm's own reason, before anything is compiled
                with pytest.raises(InvalidParamsError, match=f"{algorithm} does not support .*{re.escape(reason)}"):
                    backend.prepare(spec, plan_for(backend, algorithm, spec))

    def test_refuses_an_algorithm_it_does_not_run(self, backend):
        with pytest.raises(InvalidParamsError, match="algorithm"):
            backend.prepare(SHAPES[0], Plan("no_such_algorithm"))
        others = [name for name in list_algorithms() if name not in backend.algorithms]
        for name in others:
            with pytest.raises(InvalidParamsError, match="algorithm"):
                backend.prepare(SHAPES[0], Plan(name))

    def test_runs_what_the_registry_says_it_can(self, backend):
        for name in backend.algorithms:
            algorithm = get_algorithm(name)
            assert algorithm.host_code if backend.name == "numpy" else (algorithm.device_kernels or algorithm.library_gemm)

    def test_times_with_positive_samples(self, backend):
        spec = SHAPES[0]
        conv = backend.prepare(spec, plan_for(backend, backend.algorithms[-1], spec))
        x = np.ones(spec.input_shape, np.float32)
        w = np.ones(spec.weight_shape, np.float32)
        timing = conv.time(x, w, np.ones(spec.k, np.float32), warmup=1, repeats=3)
        assert isinstance(timing, Timing) and len(timing.samples_ms) == 3
        assert timing.min_ms > 0 and timing.gflops(spec) > 0
        # What runs only when the weights change is timed on its own (0 ms where nothing does).
        weights = conv.time(x, w, np.ones(spec.k, np.float32), warmup=1, repeats=3, stage="weights")
        assert isinstance(weights, Timing) and weights.min_ms >= 0

    @pytest.mark.parametrize("spec", [SHAPES[0].replace(activation="relu", residual=True),
                                      SHAPES[3].replace(activation="relu6")], ids=str)
    def test_serves_loaded_weights_with_a_fused_epilogue(self, backend, spec):
        """load_weights once, then call with the input (and residual) alone: every algorithm."""
        from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

        operands = random_operands(spec, seed=3)
        x, w, b = operands[:3]
        residual = operands[3] if spec.residual else None
        expected = reference_output(spec, operands)
        for algorithm in backend.algorithms:
            if get_algorithm(algorithm).supports(spec, backend.device) is not None:
                continue
            conv = backend.prepare(spec, plan_for(backend, algorithm, spec))
            conv.load_weights(w, b)
            for _ in range(2):  # the loaded weights serve every call
                result = conv.call(x, residual, poison=True)
                assert result.shape == spec.output_shape and np.all(np.isfinite(result)), algorithm
                assert relative_error(result, expected) < TOLERANCE, algorithm
            if conv.lends_weights:  # or weights read in place for one call
                assert relative_error(conv.call(x, residual, weight=w, bias=b), expected) < TOLERANCE, algorithm

    def test_prepared_conv_is_reusable_with_new_data(self, backend):
        spec = SHAPES[3]
        conv = backend.prepare(spec, plan_for(backend, backend.algorithms[-1], spec))
        rng = np.random.default_rng(1)
        bias = rng.standard_normal(spec.k).astype(np.float32)
        first = conv.run(rng.standard_normal(spec.input_shape).astype(np.float32),
                         rng.standard_normal(spec.weight_shape).astype(np.float32), bias)
        second = conv.run(rng.standard_normal(spec.input_shape).astype(np.float32),
                          rng.standard_normal(spec.weight_shape).astype(np.float32), bias)
        assert not np.allclose(first, second)


def test_runs_per_sample_reaches_the_minimum_sample_time():
    from autoconv.backends.base import MAX_RUNS_PER_SAMPLE, runs_per_sample

    assert runs_per_sample(5.0, 1.0) == 1 and runs_per_sample(0.3, 0.0) == 1
    assert runs_per_sample(0.3, 1.0) == 4 and runs_per_sample(0.01, 1.0) == 100
    assert runs_per_sample(0.0, 1.0) == MAX_RUNS_PER_SAMPLE


def test_a_tiny_kernels_samples_last_the_minimum_sample_time(backend):
    import time

    spec = ConvSpec(1, 4, 6, 6, 4, 1, 1)
    conv = backend.prepare(spec, plan_for(backend, backend.algorithms[-1], spec))
    x, w = np.ones(spec.input_shape, np.float32), np.ones(spec.weight_shape, np.float32)
    single = conv.time(x, w, warmup=1, repeats=3)
    started = time.perf_counter()
    batched = conv.time(x, w, warmup=1, repeats=3, min_sample_ms=2.0)
    took_ms = (time.perf_counter() - started) * 1e3
    assert len(batched.samples_ms) == 3 and batched.min_ms > 0
    if single.median_ms < 2.0:  # each of the 3 samples spanned 2 ms of back-to-back runs
        assert took_ms >= 3 * 2.0 * 0.9
