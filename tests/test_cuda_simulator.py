"""The CUDA simulator and its CuPy test double (autoconv.testing): a simulator that cannot fail
proves nothing, so deliberately broken kernels must fail here, each in the way it would on a GPU
(an illegal address, an invalid configuration, or output left unwritten). Then the CUDA backend's
whole path runs on it: tune, export and the CLI (conformance and chains are in
test_backend_conformance.py and test_cuda.py, over the simulated backend too)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from autoconv import ConvSpec, Plan, get_algorithm
from autoconv.algorithms import DIRECT, IM2COL_GEMM
from autoconv.backends import cuda, get_backend
from autoconv.errors import KernelCompileError, KernelLaunchError

from conftest import assert_matches_reference

WIDE = ConvSpec(1, 2, 3, 300, 3, 3, 3, padding=1, bias=True)  # Q = 300: a grid of 2 blocks of 256 along x
GUARD = "if (q >= Q || p >= P) return;"


def broken_direct(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> None:
    """The direct kernel with one piece of its text replaced (for every conv prepared from now on)."""
    algorithm = type(get_algorithm(DIRECT))
    kernels = algorithm.kernels

    def mutated(self, spec, params, dialect):
        sources = kernels(self, spec, params, dialect)
        assert old in sources[0].text, "the template changed: update the mutation"
        return [dataclasses.replace(sources[0], text=sources[0].text.replace(old, new))] + sources[1:]
    monkeypatch.setattr(algorithm, "kernels", mutated)


@pytest.fixture
def simulated(simulated_cuda):
    return get_backend("cuda")


def test_the_simulator_runs_the_real_kernels_correctly(simulated):
    assert_matches_reference(simulated, WIDE, Plan(DIRECT))


@pytest.mark.parametrize("old, new, what", [
    (GUARD, "if (q > Q || p >= P) return;", "an off-by-one in a bound"),
    ("out[at] =", "out[at + 1] =", "a write past the output"),
    ("acc += plane[h * W + w]", "acc += plane[h * W + w - 1]", "a read before the input"),
    (GUARD, "", "a guard dropped, on the rounded-up grid"),
])
def test_an_out_of_bounds_kernel_fails_as_an_illegal_address(simulated, monkeypatch, old, new, what):
    broken_direct(monkeypatch, old, new)
    with pytest.raises(KernelLaunchError, match="illegal memory access") as caught:
        assert_matches_reference(simulated, WIDE, Plan(DIRECT))
    assert "AddressSanitizer" in str(caught.value), what
    assert_matches_reference(simulated, WIDE.replace(k=4), Plan(IM2COL_GEMM))  # a fresh device process serves on


def test_a_grid_too_small_leaves_output_unwritten_and_is_caught(simulated, monkeypatch):
    geometry = cuda.launch_geometry

    def short_grid(source):
        grid, block = geometry(source)
        return (max(1, grid[0] - 1), grid[1], grid[2]), block
    monkeypatch.setattr(cuda, "launch_geometry", short_grid)
    with pytest.raises(AssertionError, match="unwritten"):
        assert_matches_reference(simulated, WIDE, Plan(DIRECT))


def test_a_block_over_1024_threads_is_an_invalid_configuration(simulated, monkeypatch):
    monkeypatch.setattr(cuda, "launch_geometry", lambda source: ((1, 1, 1), (2048, 1, 1)))
    with pytest.raises(KernelLaunchError, match="invalid configuration"):
        assert_matches_reference(simulated, WIDE, Plan(DIRECT))


def test_a_kernel_over_48_kib_of_shared_memory_does_not_compile(simulated, monkeypatch):
    broken_direct(monkeypatch, "float acc = 0.0f;", "__shared__ float hog[12300]; hog[threadIdx.x] = 1.0f; float acc = hog[0] - 1.0f;")
    with pytest.raises(KernelCompileError, match="shared memory"):
        simulated.prepare(WIDE, Plan(DIRECT))


def test_a_kernel_within_48_kib_of_shared_memory_runs(simulated, monkeypatch):
    broken_direct(monkeypatch, GUARD, "__shared__ float most[12200]; most[threadIdx.x] = 1.0f; __syncthreads();"
                  + GUARD)
    assert_matches_reference(simulated, WIDE, Plan(DIRECT))


def test_a_barrier_some_threads_never_reach_is_a_hang_reported(simulated, monkeypatch):
    """Threads past the guard return before the barrier: the block cannot finish."""
    monkeypatch.setattr("autoconv.testing.cuda_simulator.LAUNCH_TIMEOUT_S", 3.0)
    broken_direct(monkeypatch, "float acc = 0.0f;", "__syncthreads(); float acc = 0.0f;")
    with pytest.raises(KernelLaunchError, match="did not finish"):
        assert_matches_reference(simulated, WIDE, Plan(DIRECT))
    assert_matches_reference(simulated, WIDE.replace(k=4), Plan(IM2COL_GEMM))


def test_a_kernel_that_does_not_compile_is_a_compile_error(simulated, monkeypatch):
    broken_direct(monkeypatch, "float acc = 0.0f;", "float acc = undeclared;")
    with pytest.raises(KernelCompileError, match="undeclared"):
        simulated.prepare(WIDE, Plan(DIRECT))


def test_barriers_and_shared_memory_are_per_block(simulated_cuda):
    """A block reverses its slice through shared memory: wrong without a working barrier, or with
    blocks sharing their shared memory."""
    cp = simulated_cuda.cupy
    module = cp.RawModule(code=r'''
    extern "C" __global__ void reverse(const float* __restrict__ a, float* __restrict__ b, int n) {
        __shared__ float tile[128];
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        tile[threadIdx.x] = a[i];
        __syncthreads();
        b[i] = tile[blockDim.x - 1 - threadIdx.x] + blockIdx.y * 1000.0f;
    }''')
    a = cp.asarray(np.arange(512, dtype=np.float32))
    b = cp.empty((2, 512), dtype=cp.float32)
    for y in range(2):
        module.get_function("reverse")((4, 1, 1), (128, 1, 1), (a, b[y], np.int32(512)))
    expected = np.arange(512, dtype=np.float32).reshape(4, 128)[:, ::-1].reshape(-1)
    np.testing.assert_array_equal(b.get(), np.stack([expected, expected]))


def test_device_memory_starts_as_garbage_and_refuses_implicit_host_use(simulated_cuda):
    cp = simulated_cuda.cupy
    fresh = cp.empty((4,), dtype=cp.float32)
    assert np.isnan(fresh.get()).all()  # uninitialised memory is not zeros: a missed write shows
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(fresh)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fresh + np.ones(4, dtype=np.float32)


def test_tune_run_and_export_through_the_cli_on_the_simulator(simulated_cuda, tmp_path):
    from autoconv.cli import app

    runner = CliRunner()
    db = tmp_path / "cuda.db"
    layer = "n=1,c=4,h=6,w=6,k=4,r=3,s=3,pad=1"
    tuned = runner.invoke(app, ["tune", "--layer", layer, "--backend", "cuda", "--trials", "3", "--repeats", "1",
                                "--db", str(db)], env={"COLUMNS": "200"})
    assert tuned.exit_code == 0, tuned.output
    assert "CUDA simulator" in tuned.output
    ran = runner.invoke(app, ["run", layer, "--backend", "cuda", "--repeats", "1", "--db", str(db)],
                        env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    out = tmp_path / "export"
    exported = runner.invoke(app, ["export", "--all", "--db", str(db), "--device", "CUDA simulator", "--out", str(out)],
                             env={"COLUMNS": "200"})
    assert exported.exit_code == 0, exported.output
    sources = sorted(out.rglob("*.cu"))
    assert sources, exported.output
    # What was exported is CUDA that the simulator compiles and whose entries it finds.
    cp = simulated_cuda.cupy
    for path in sources:
        text = path.read_text()
        for entry in re.findall(r"KERNEL void (\w+)\(", text):
            cp.RawModule(code=text).get_function(entry)
