"""CUDA without a GPU: every structural variant of the CUDA kernels, plus a random sample of the
CUDA space's valid configs, compiles with the machine's nvcc for sm_80 and sm_90; the backend
says "no CUDA device" clearly. With a GPU (scripts/gpu_check.sh) the marked tests run for real."""

import itertools
import random
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from autoconv import ConvSpec, Plan, default_gemm_params, get_algorithm
from autoconv.algorithms import BLOCKED_DIRECT, DEPTHWISE_DIRECT, DIRECT, IM2COL_BLAS, IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD
from autoconv.backends.affine import affine_source
from autoconv.spec import ACTIVATIONS
from autoconv.backends.pool import POOL_KINDS, PoolGeometry, pool_source
from autoconv.backends.reorder import reorder_source
from autoconv.device import DeviceInfo
from autoconv.errors import BackendUnavailableError
from autoconv.render import CUDA

# An H100's limits as CuPy reports them: 1024 threads per block, 48 KiB static shared memory.
H100 = DeviceInfo("cuda", "CUDA runtime 12.8", "nvidia", "NVIDIA H100 (sm_90, 132 SMs)", "12.8", "gpu", 132,
                  49152, 1024, (1024, 1024, 64))
SPEC = ConvSpec(2, 6, 9, 7, 10, 3, 2, padding=(1, 0), groups=2, bias=True)
STRUCTURAL = [default_gemm_params(MWG=32, NWG=32, WPTM=4, WPTN=4, VWN=1, SA=sa, SB=sb, B_TRANSPOSED=bt,
                                  IM2COL_ROWS=rows, VW=vw)
              for sa, sb, bt, rows, vw in itertools.product((0, 1), (0, 1), (0, 1), (0, 1), (1, 4))]
SAMPLED = list(itertools.islice(get_algorithm(IM2COL_GEMM).space.random_valid(H100.limits(), random.Random(4)), 16))
IMPLICIT_SPACE = get_algorithm(IMPLICIT_GEMM).space
IMPLICIT_STRUCTURAL = [IMPLICIT_SPACE.validate(dict(MWG=32, NWG=32, WPTM=4, WPTN=4, VWN=1, SA=sa, SB=sb, VW=vw))
                       for sa, sb, vw in itertools.product((0, 1), (0, 1), (1, 4))]
IMPLICIT_SAMPLED = list(itertools.islice(IMPLICIT_SPACE.random_valid(H100.limits(), random.Random(5)), 8))
POINTWISE = ConvSpec(2, 8, 8, 8, 12, 1, 1, bias=True)
WINOGRAD_SPEC = ConvSpec(2, 6, 9, 7, 10, 3, 3, padding=(1, 0), padding_end=(2, 1), groups=2, bias=True)
WINOGRAD_SPACE = get_algorithm(WINOGRAD).space
WINOGRAD_STRUCTURAL = [WINOGRAD_SPACE.validate(dict(TILE=tile, MWG=32, NWG=32, WPTM=4, WPTN=4, VWN=1, SA=sa, SB=sb))
                       for tile, sa, sb in itertools.product((2, 4), (0, 1), (0, 1))]
# Fused epilogues: the residual and an activation in every kernel that writes the output.
FUSED = SPEC.replace(activation="relu", residual=True)
FUSED_POINTWISE = POINTWISE.replace(activation="relu6", residual=True)
FUSED_WINOGRAD = WINOGRAD_SPEC.replace(activation="relu6", residual=True)
BLOCKED_SPACE = get_algorithm(BLOCKED_DIRECT).space
# Both loop orders, every block, partial blocks and tails, then a sample of the CUDA space.
BLOCKED_STRUCTURAL = [BLOCKED_SPACE.validate(dict(CB=cb, KV=1, PIX=pix, ORDER=order, LX=64))
                      for cb, pix, order in itertools.product((4, 8, 16), (1, 4), (0, 1)) if cb * pix <= 64]
BLOCKED_SPEC = ConvSpec(2, 6, 9, 7, 16, 3, 2, padding=(1, 0), padding_end=(2, 1), groups=2, bias=True,
                        activation="relu", residual=True)
BLOCKED_SAMPLED = list(itertools.islice(BLOCKED_SPACE.random_valid(H100.limits(), random.Random(6), BLOCKED_SPEC), 6))
nvcc = shutil.which("nvcc")
NCHW = "NCHW"


def _compile(text: str, tmp_path, name: str) -> str:
    source = tmp_path / f"{name}.cu"
    source.write_text(text)
    run = subprocess.run([nvcc, "-c", "--std=c++14", "-gencode", "arch=compute_80,code=sm_80",
                          "-gencode", "arch=compute_90,code=sm_90", str(source), "-o", str(tmp_path / f"{name}.o")],
                         capture_output=True, text=True, timeout=300)
    return "" if run.returncode == 0 else f"{name}:\n{run.stderr[-2000:]}"


@pytest.mark.skipif(nvcc is None, reason="nvcc is not on this machine")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    assert all(not p.violations(H100.limits()) for p in STRUCTURAL + SAMPLED)
    assert all(not p.violations(H100.limits()) for p in IMPLICIT_STRUCTURAL + IMPLICIT_SAMPLED)
    direct, blas, gemm, implicit = (get_algorithm(name) for name in (DIRECT, IM2COL_BLAS, IM2COL_GEMM, IMPLICIT_GEMM))
    sources = {"direct": direct.kernels(SPEC, direct.space.validate({}), CUDA)[0].text,
               "blas_im2col": blas.kernels(SPEC, blas.space.validate({}), CUDA)[0].text}
    for i, params in enumerate(STRUCTURAL + SAMPLED):
        sources[f"gemm{i}"] = gemm.kernels(SPEC, params, CUDA)[1].text
    for bt, rows in itertools.product((0, 1), (0, 1)):
        sources[f"im2col_{bt}{rows}"] = gemm.kernels(SPEC, default_gemm_params(B_TRANSPOSED=bt, IM2COL_ROWS=rows), CUDA)[0].text
    for i, params in enumerate(IMPLICIT_STRUCTURAL + IMPLICIT_SAMPLED):
        sources[f"implicit{i}"] = implicit.kernels(SPEC, params, CUDA)[0].text
        sources[f"implicit_pointwise{i}"] = implicit.kernels(POINTWISE, params, CUDA)[0].text
    assert all(not p.violations(H100.limits(), WINOGRAD_SPEC) for p in WINOGRAD_STRUCTURAL)
    winograd_texts = {k.text: f"winograd_{k.entry}_{i}" for i, params in enumerate(WINOGRAD_STRUCTURAL)
                      for k in get_algorithm(WINOGRAD).kernels(WINOGRAD_SPEC, params, CUDA)}
    sources.update({name: text for text, name in winograd_texts.items()})
    sources["direct_fused"] = direct.kernels(FUSED, direct.space.validate({}), CUDA)[0].text
    for i, params in enumerate(STRUCTURAL[::8]):
        sources[f"gemm_fused{i}"] = gemm.kernels(FUSED, params, CUDA)[1].text
    for i, params in enumerate(IMPLICIT_STRUCTURAL[::2]):
        sources[f"implicit_fused{i}"] = implicit.kernels(FUSED, params, CUDA)[-1].text
        sources[f"implicit_fused_pointwise{i}"] = implicit.kernels(FUSED_POINTWISE, params, CUDA)[-1].text
    for i, params in enumerate(WINOGRAD_STRUCTURAL[::2]):
        sources[f"winograd_output_fused{i}"] = get_algorithm(WINOGRAD).kernels(FUSED_WINOGRAD, params, CUDA)[-1].text
    blocked = get_algorithm(BLOCKED_DIRECT)
    assert all(not p.violations(H100.limits()) for p in BLOCKED_STRUCTURAL + BLOCKED_SAMPLED)
    for i, params in enumerate(BLOCKED_STRUCTURAL + BLOCKED_SAMPLED):
        for k in blocked.kernels(BLOCKED_SPEC if params.CB <= 8 else FUSED_POINTWISE, params, CUDA):
            sources[f"blocked_{k.entry}_{i}"] = k.text
    depthwise = get_algorithm(DEPTHWISE_DIRECT)
    for layout in (NCHW, "NCHW4c", "NCHW8c", "NCHW16c"):  # one filter per channel, in NCHW and blocked
        dw_spec = ConvSpec(2, 19, 9, 11, 19, 3, 5, stride=(1, 2), padding=(1, 2), padding_end=(2, 1), groups=19,
                           bias=True, activation="relu6", residual=True, layout=layout)
        for k in depthwise.kernels(dw_spec, depthwise.space.validate(dict(PIX=4, LX=64)), CUDA):
            sources[f"depthwise_{k.entry}_{layout}"] = k.text
    for block in (4, 8, 16):  # the channel-blocked layouts: the conv read and written in NCHW{b}c, and the reorders
        layout = f"NCHW{block}c"
        in_layout = FUSED_POINTWISE.replace(c=block * 2 + 1, k=block + 3, layout=layout)
        params = BLOCKED_SPACE.validate(dict(CB=block, KV=1, PIX=2, LX=64))
        sources[f"blocked_{layout}"] = blocked.kernels(in_layout, params, CUDA)[-1].text
        winograd_blocked = FUSED_WINOGRAD.replace(c=block + 3, k=block * 2 + 1, groups=1, layout=layout)
        for k in get_algorithm(WINOGRAD).kernels(winograd_blocked, WINOGRAD_STRUCTURAL[0], CUDA):
            if k.entry in ("winograd_input", "winograd_output"):  # the stages that see the layout
                sources[f"winograd_{k.entry}_{layout}"] = k.text
        for source, target in ((NCHW, layout), (layout, NCHW)):
            sources[f"reorder_{source}_{target}"] = reorder_source((2, 19, 5, 7), source, target, CUDA).text
        for kind in POOL_KINDS:  # a model's pooling on the device, in the layout and in NCHW
            geometry = PoolGeometry(kind, (3, 3), (2, 2), ((1, 1), (1, 1)))
            sources[f"pool_{kind}_{layout}"] = pool_source((2, 19, 9, 9), layout, geometry, CUDA).text
            sources[f"pool_{kind}_nchw"] = pool_source((2, 19, 9, 9), NCHW, geometry, CUDA).text
        for activation in ACTIVATIONS:  # a model's standalone BatchNormalization and its activation
            sources[f"affine_{activation}_{layout}"] = affine_source((2, 19, 9, 9), layout, activation, CUDA).text
            sources[f"affine_{activation}_nchw"] = affine_source((2, 19, 9, 9), NCHW, activation, CUDA).text
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(lambda item: _compile(item[1], tmp_path, item[0]), sources.items()) if f]
    assert not failures, "\n".join(failures)


def test_cuda_vector_accumulators_are_refused_before_compiling():
    wide = default_gemm_params(WPTN=4, VWN=4)
    assert any("device_vector_width" in v for v in wide.violations(H100.limits()))
    vector_transforms = WINOGRAD_SPACE.validate(dict(XV=4, VWN=1))
    assert [v.split(":")[0] for v in vector_transforms.violations(H100.limits())] == ["transform_vector_width"]


def test_no_cupy_or_no_device_is_a_clear_error(monkeypatch):
    from autoconv.backends import cuda

    monkeypatch.setitem(sys.modules, "cupy", None)  # as when CuPy is not installed
    with pytest.raises(BackendUnavailableError, match="needs CuPy"):
        cuda.CudaBackend()

    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        cuda.CudaBackend()


def test_the_tuner_plugs_into_the_cuda_backend(tmp_path):
    """What `autoconv tune --backend cuda` does, with a fake evaluator: CUDA limits reach the sampler."""
    from autoconv.store import SQLiteStore
    from autoconv.tuning.tuner import Outcome, tune_layer

    class Fake:
        algorithms = (IM2COL_GEMM, IMPLICIT_GEMM, DIRECT, IM2COL_BLAS)  # cuBLAS runs the baseline on the GPU

        def __call__(self, algorithm, params, bound_ms=None):
            assert params.get("VWN", 1) == 1 and not params.violations(H100.limits())
            return Outcome("ok", 1.0 + params.get("MWG", 128) / 128, 1e-6)

    with SQLiteStore(tmp_path / "c.db") as db:
        report = tune_layer(SPEC, H100, Fake(), db, trials=10)
    assert report.trials == 10 and report.baseline is not None and set(report.bests) == set(Fake.algorithms)


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu), "simulated"])
def cupy_module(request):
    """CuPy on a real GPU (skipped without one), or the FakeCupy test double whose kernels run on
    the CUDA simulator: the same checks run on both."""
    if request.param == "simulated":
        return request.getfixturevalue("simulated_cuda").cupy
    from autoconv.backends import get_backend

    try:
        get_backend("cuda")
        import cupy
    except (BackendUnavailableError, ImportError) as exc:
        pytest.skip(str(exc))
    return cupy


def test_cuda_matches_the_reference(cupy_module):
    """Every algorithm's CUDA kernels (each structural variant, every epilogue, Winograd's stages,
    im2col), launched with launch_geometry's grid and block, against the float64 reference."""
    from autoconv.backends import get_backend

    from conftest import assert_matches_reference, heuristic_plan

    backend = get_backend("cuda")
    for params in STRUCTURAL + SAMPLED:
        assert_matches_reference(backend, SPEC, Plan("im2col_gemm", params, "gpu check"))
    for params in IMPLICIT_STRUCTURAL + IMPLICIT_SAMPLED:
        assert_matches_reference(backend, SPEC, Plan(IMPLICIT_GEMM, params, "gpu check"))
        assert_matches_reference(backend, POINTWISE, Plan(IMPLICIT_GEMM, params, "gpu check"))
    for algorithm in (IM2COL_GEMM, IMPLICIT_GEMM):
        assert_matches_reference(backend, SPEC, heuristic_plan(SPEC, backend.device, algorithm))
    for params in WINOGRAD_STRUCTURAL:
        assert_matches_reference(backend, WINOGRAD_SPEC, Plan(WINOGRAD, params, "gpu check"))
    assert_matches_reference(backend, WINOGRAD_SPEC, heuristic_plan(WINOGRAD_SPEC, backend.device, WINOGRAD))
    assert_matches_reference(backend, SPEC, Plan(IM2COL_BLAS))
    assert_matches_reference(backend, SPEC, Plan(DIRECT))
    for spec in (FUSED, FUSED_POINTWISE):
        for algorithm in (IM2COL_GEMM, IMPLICIT_GEMM, DIRECT):
            assert_matches_reference(backend, spec, heuristic_plan(spec, backend.device, algorithm))
        assert_matches_reference(backend, spec, Plan(IM2COL_BLAS))
    assert_matches_reference(backend, FUSED_WINOGRAD, heuristic_plan(FUSED_WINOGRAD, backend.device, WINOGRAD))


def test_layers_chain_cupy_arrays(cupy_module):
    """Conv2d on CuPy arrays returns CuPy arrays (no copy to the host between layers), matches
    the float64 reference fused and unfused, and reads DLPack / __cuda_array_interface__ arrays."""

    import autoconv
    from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

    cupy = cupy_module
    spec = FUSED.replace(groups=1, c=6, k=6, padding=(1, 1), padding_end=None, s=3)
    x, w, b, r = random_operands(spec, seed=2)
    expected = reference_output(spec, (x, w, b, r))
    for algorithm in (IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD, DIRECT, IM2COL_BLAS):
        layer = autoconv.Conv2d(w, b, padding=1, activation="relu", backend="cuda", algorithm=algorithm)
        y = layer(cupy.asarray(x), residual=cupy.asarray(r))
        assert isinstance(y, cupy.ndarray)
        assert relative_error(cupy.asnumpy(y), expected) < TOLERANCE, algorithm
        assert relative_error(layer(x, residual=r), expected) < TOLERANCE, algorithm  # host arrays, pinned copies
        chained = autoconv.Conv2d(w, None, padding=1, backend="cuda", algorithm=algorithm)(y)  # y stays on the device
        assert isinstance(chained, cupy.ndarray)
        second = reference_output(spec.unfused().replace(bias=False), (cupy.asnumpy(y), w))
        assert relative_error(cupy.asnumpy(chained), second) < TOLERANCE, algorithm

    class Interface:  # what PyTorch and Numba CUDA arrays offer
        def __init__(self, array):
            self.array, self.__cuda_array_interface__ = array, array.__cuda_array_interface__
            self.shape = array.shape

    class DLPackOnly:  # a CUDA array of another library, reached through DLPack only
        def __init__(self, array):
            self.array, self.shape = array, array.shape

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    plain = spec.unfused()
    layer = autoconv.Conv2d(w, b, padding=1, backend="cuda")
    for wrapped in (Interface(cupy.asarray(x)), DLPackOnly(cupy.asarray(x))):
        y = layer(wrapped)
        assert isinstance(y, cupy.ndarray)
        assert relative_error(cupy.asnumpy(y), reference_output(plain, (x, w, b))) < TOLERANCE
    strided = cupy.asarray(np.ascontiguousarray(x.transpose(0, 1, 3, 2))).transpose(0, 1, 3, 2)  # not C order
    assert not strided.flags.c_contiguous
    assert relative_error(cupy.asnumpy(layer(strided)), reference_output(plain, (x, w, b))) < TOLERANCE
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        y = layer(torch.as_tensor(x, device="cuda"))
        assert relative_error(cupy.asnumpy(y), reference_output(plain, (x, w, b))) < TOLERANCE


def test_gpu_check_script_says_clearly_when_there_is_no_gpu(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OUT": str(tmp_path),
                              "HOME": str(tmp_path)})
    if run.returncode == 0:
        pytest.skip("this machine has a CUDA GPU: the script ran for real")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "no usable CUDA device" in run.stderr and "CuPy" in run.stderr
