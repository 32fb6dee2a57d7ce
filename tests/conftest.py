"""Shared fixtures: every backend through one parametrised fixture that skips absent ones."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from autoconv import ConvSpec, Plan, get_algorithm
from autoconv.backends import get_backend
from autoconv.backends.base import Backend
from autoconv.device import DeviceInfo
from autoconv.errors import BackendUnavailableError
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error


@pytest.fixture(autouse=True)
def isolated_tuning_dbs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own empty user DB and no shipped DBs, unless it sets its own."""
    from autoconv.settings import reload_settings

    monkeypatch.setenv("AUTOCONV_DB", str(tmp_path_factory.mktemp("userdb") / "tuning.db"))
    monkeypatch.setenv("AUTOCONV_SHIPPED_DB_DIR", "")
    reload_settings()
    yield
    monkeypatch.undo()
    reload_settings()


def backend_or_skip(name: str) -> Backend:
    try:
        return get_backend(name)
    except BackendUnavailableError as exc:
        pytest.skip(f"{name} backend unavailable here: {exc}")


@pytest.fixture(scope="session")
def cuda_simulator_modules():
    """One FakeCupy (the CuPy test double over the CUDA simulator) for the whole test run."""
    from autoconv.testing.cuda_simulator import SimulatorUnavailable, compiler

    try:
        compiler()
    except SimulatorUnavailable as exc:
        pytest.skip(str(exc))
    from autoconv.testing.fake_cupy import FakeCupy

    fake = FakeCupy()
    yield fake
    fake.simulator.close()


@pytest.fixture
def simulated_cuda(cuda_simulator_modules, monkeypatch: pytest.MonkeyPatch):
    """CuPy replaced by the FakeCupy test double for one test: the cuda backend runs on the
    simulator (semantics, never speed)."""
    from autoconv.serve.session import default_session

    monkeypatch.setitem(sys.modules, "cupy", cuda_simulator_modules.cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cuda_simulator_modules.cupyx)
    default_session().drop_backends("cuda")
    yield cuda_simulator_modules
    default_session().drop_backends("cuda")


@pytest.fixture(params=["numpy", "opencl", "cuda", "simulated-cuda"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend: the real cuda one skips without a GPU; simulated-cuda is CudaBackend on the
    FakeCupy test double."""
    if request.param == "simulated-cuda":
        request.getfixturevalue("simulated_cuda")
        return get_backend("cuda")
    return backend_or_skip(request.param)


@pytest.fixture(scope="session")
def opencl() -> Backend:
    return backend_or_skip("opencl")


def heuristic_plan(spec: ConvSpec, device: DeviceInfo | None, algorithm: str = "im2col_gemm") -> Plan:
    """An algorithm's untuned plan for a device."""
    return Plan(algorithm, get_algorithm(algorithm).heuristic(spec, device), "heuristic")


def plan_for(backend: Backend, algorithm: str, spec: ConvSpec) -> Plan:
    return heuristic_plan(spec, backend.device, algorithm)


def assert_matches_reference(backend: Backend, spec: ConvSpec, plan: Plan, seed: int = 0) -> None:
    """Run on random never-zero data into a NaN-poisoned output; compare to the float64 reference."""
    operands = random_operands(spec, seed)
    result = backend.prepare(spec, plan).run(*operands, poison=True)
    assert result.shape == spec.output_array_shape
    assert np.all(np.isfinite(result)), f"{plan.describe()} left output elements unwritten for {spec}"
    error = relative_error(result, reference_output(spec, operands))
    assert error < TOLERANCE, f"{plan.describe()} on {spec}: relative error {error:.2e}"


def assert_padding_channels_zero(runtime, array, channels: int) -> None:
    """A blocked device array's padding channels (past `channels` in its last block) hold zeros."""
    block = int(array.layout[4:-1])
    stored = np.empty(array.storage_shape, np.float32)
    array.wait()
    runtime.download(stored, array.buffer)
    assert not np.any(stored[:, -1, :, :, channels % block:])


def record_launches(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The entry of every kernel the backend enqueues from now on, in order (convs prepared from
    now on: the default session's prepared convs are dropped)."""
    from autoconv.serve.session import default_session

    launched: list[str] = []
    bind = backend.bind

    def spying_bind(kernel, source):
        enqueue = bind(kernel, source)
        return lambda buffers: launched.append(source.entry) or enqueue(buffers)

    monkeypatch.setattr(backend, "bind", spying_bind)
    default_session().clear_cache()
    return launched
