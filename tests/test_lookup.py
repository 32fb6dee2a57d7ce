"""autoconv.lookup: exact (the fastest algorithm) → nearest → device default → vendor default →
heuristic, forced algorithms, current templates only, caching that notices DB changes, and
conv2d on top of it."""

import threading

import numpy as np
import pytest

import autoconv
from autoconv import ConvSpec, UnsupportedAlgorithmError, get_algorithm, lookup
from autoconv.algorithms import EMPTY_SPACE
from autoconv.device import DeviceInfo
from autoconv.render import template_hash
from autoconv.serve import lookup as lookup_module
from autoconv.store import SQLiteStore, TunedResult
from autoconv.tuning.verify import random_operands, reference_output, relative_error

from conftest import heuristic_plan

GPU = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 1024, (1024, 1024, 64))
SIBLING = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 2", "1.0", "gpu", 16, 49152, 1024, (1024, 1024, 64))
RES2 = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)
RES3 = ConvSpec(1, 128, 28, 28, 128, 3, 3, padding=1)
RES4 = ConvSpec(1, 256, 14, 14, 256, 3, 3, padding=1)
POINTWISE = ConvSpec(1, 64, 56, 56, 256, 1, 1)


def store(path, spec, device=GPU, median_ms=1.0, baseline_ms=5.0, templates=None, algorithm="im2col_gemm", **params):
    """One algorithm's tuned result, and the library baseline's time beside it."""
    with SQLiteStore(path) as db:
        db.record_device(device)
        db.save_result(TunedResult(
            device=device.fingerprint(), spec=spec, algorithm=algorithm, template_hash=templates or template_hash(),
            params=get_algorithm(algorithm).space.validate(params), median_ms=median_ms, gflops=1.0, rel_error=1e-6,
            default_ms=2.0, trials=5))
        if baseline_ms is not None:
            db.save_result(TunedResult(
                device=device.fingerprint(), spec=spec, algorithm="im2col_blas", template_hash=templates or template_hash(),
                params=EMPTY_SPACE.validate({}), median_ms=baseline_ms, gflops=1.0, rel_error=1e-6, default_ms=None,
                trials=1))


def test_exact_match(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES2, MWG=16)
    plan = lookup(RES2, GPU, db)
    assert plan.source == "tuned" and plan.params.MWG == 16


def test_nearest_tuned_shape_of_the_same_family(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES2, MWG=16)
    store(db, RES4, MWG=128)
    store(db, POINTWISE, MWG=8)  # 1x1: another family, never the nearest of a 3x3
    plan = lookup(RES3.replace(h=16, w=16), GPU, db)  # closer to RES4's GEMM than RES2's
    assert plan.params.MWG == 128 and plan.source.startswith("nearest tuned shape")
    assert lookup(ConvSpec(1, 32, 56, 56, 32, 3, 3, padding=1), GPU, db).params.MWG == 16


def test_device_default_then_vendor_default_then_heuristic(tmp_path):
    db = tmp_path / "t.db"
    store(db, POINTWISE, MWG=8, median_ms=0.5)
    store(db, ConvSpec(1, 128, 28, 28, 512, 1, 1), MWG=32)
    plan = lookup(RES2, GPU, db)  # no 3x3 tuned: the device's winner with the lowest estimate
    assert plan.source.startswith("device default") and plan.params.MWG == 8
    plan = lookup(RES2, SIBLING, db)  # nothing for this device: same vendor and type
    assert plan.source.startswith("vendor default") and plan.params.MWG == 8
    other_vendor = DeviceInfo("opencl", "X", "othervendor", "Other GPU", "1", "gpu", 8, 49152, 1024, (1024, 1024, 64))
    assert lookup(RES2, other_vendor, db) == heuristic_plan(RES2, other_vendor)


def test_the_heuristic_on_a_cpu_device_is_the_blocked_direct_convolution(tmp_path):
    # Measured on PoCL (benchmarks/fallback-pocl.md): untuned, it beats im2col + GEMM on every dense
    # layer there; depthwise layers, which it does not run, get the depthwise direct convolution;
    # GPUs keep im2col + GEMM.
    cpu = DeviceInfo("opencl", "PoCL", "GenuineIntel", "pthread-skylake-avx512", "3.1", "cpu", 2, 4194304, 4096,
                     (4096, 4096, 4096))
    db = tmp_path / "empty.db"
    SQLiteStore(db).close()
    assert lookup(RES2, cpu, db) == heuristic_plan(RES2, cpu, "blocked_direct")
    depthwise = ConvSpec(1, 32, 28, 28, 32, 3, 3, padding=1, groups=32)
    assert lookup(depthwise, cpu, db) == heuristic_plan(depthwise, cpu, "depthwise_direct")
    assert lookup(RES2, GPU, db) == heuristic_plan(RES2, GPU)
    assert lookup(RES2.replace(layout="NCHW8c"), GPU, db).algorithm == "blocked_direct"
    # Wide 3x3 stride-1 layers: Winograd; strided ones stay direct.
    assert lookup(RES4, cpu, db) == heuristic_plan(RES4, cpu, "winograd")
    assert lookup(RES4.replace(stride=2), cpu, db).algorithm == "blocked_direct"


def test_the_fastest_algorithm_of_the_layer_is_served(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES2, median_ms=3.0, baseline_ms=1.0, MWG=16)
    plan = lookup(RES2, GPU, db)
    assert plan.algorithm == "im2col_blas" and plan.source == "tuned"
    assert lookup(RES2, GPU, db, generated_only=True).params.MWG == 16
    store(db, RES2, median_ms=0.5, baseline_ms=None, algorithm="implicit_gemm", MWG=32)
    assert lookup(RES2, GPU, db).algorithm == "implicit_gemm"
    forced = lookup(RES2, GPU, db, algorithm="im2col_gemm")
    assert forced.algorithm == "im2col_gemm" and forced.params.MWG == 16 and forced.source == "tuned"


def test_a_forced_algorithm_without_results_gets_its_heuristic(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES2, MWG=16)
    plan = lookup(RES4, GPU, db, algorithm="implicit_gemm")
    assert plan.algorithm == "implicit_gemm" and plan.source == "heuristic"
    assert lookup(RES4, GPU, db, algorithm="direct").algorithm == "direct"


def test_a_forced_algorithm_that_does_not_support_the_shape_says_why(tmp_path, monkeypatch):
    implicit = get_algorithm("implicit_gemm")
    monkeypatch.setattr(type(implicit), "supports", lambda self, spec, device: "only 3x3 here" if spec.r != 3 else None)
    with pytest.raises(UnsupportedAlgorithmError, match="implicit_gemm does not support .*only 3x3 here"), \
            pytest.warns(RuntimeWarning, match="does not exist"):
        lookup(POINTWISE, GPU, tmp_path / "none.db", algorithm="implicit_gemm")
    db = tmp_path / "t.db"
    store(db, RES2, median_ms=0.1, baseline_ms=None, algorithm="implicit_gemm", MWG=8)
    # The nearest-shape fallback borrows only from algorithms that support the requested shape.
    store(db, ConvSpec(1, 64, 28, 28, 256, 1, 1), median_ms=0.1, baseline_ms=None, algorithm="implicit_gemm", MWG=8)
    store(db, ConvSpec(1, 64, 14, 14, 256, 1, 1), median_ms=1.0, baseline_ms=None, MWG=32)
    plan = lookup(POINTWISE, GPU, db)
    assert plan.algorithm == "im2col_gemm" and plan.params.MWG == 32


def test_results_of_other_template_versions_are_not_served(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES2, templates="0123456789abcdef", MWG=16)
    assert lookup(RES2, GPU, db) == heuristic_plan(RES2, GPU)


def test_params_that_do_not_fit_the_device_are_not_borrowed(tmp_path):
    db = tmp_path / "t.db"
    small = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 64, (64, 64, 64))
    store(db, RES4, device=small, baseline_ms=None, MWG=8, WPTM=1, NWG=64, WPTN=1)  # 512 work-items: too many
    assert lookup(RES3, small, db) == heuristic_plan(RES3, small)


def test_a_damaged_database_falls_back_and_never_crashes(tmp_path):
    db = tmp_path / "t.db"
    db.write_bytes(b"\x00garbage" * 500)
    with pytest.warns(RuntimeWarning):
        assert lookup(RES2, GPU, db) == heuristic_plan(RES2, GPU)
    with pytest.warns(RuntimeWarning, match="does not exist"):
        assert lookup(RES2, GPU, tmp_path / "missing.db") == heuristic_plan(RES2, GPU)


def test_cached_but_sees_new_results_and_is_thread_safe(tmp_path):
    db = tmp_path / "t.db"
    store(db, RES3, MWG=32)
    assert lookup(RES2, GPU, db).source.startswith("nearest")
    store(db, RES2, MWG=16)
    assert lookup(RES2, GPU, db).source == "tuned"
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(lookup(RES2, GPU, db))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8 and len(set(answers)) == 1


def test_user_db_before_shipped_db(tmp_path, monkeypatch):
    from autoconv.settings import reload_settings

    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    store(shipped_dir / "vendor.db", RES2, MWG=64)
    store(shipped_dir / "vendor.db", RES3, MWG=64)
    user = tmp_path / "user.db"
    store(user, RES2, MWG=16)
    monkeypatch.setenv("AUTOCONV_DB", str(user))
    monkeypatch.setenv("AUTOCONV_SHIPPED_DB_DIR", str(shipped_dir))
    reload_settings()
    assert lookup(RES2, GPU).params.MWG == 16
    assert lookup(RES3, GPU).params.MWG == 64 and lookup(RES3, GPU).source == "tuned"


def test_conv2d_runs_the_tuned_plan_and_the_baseline_plan(opencl, tmp_path):
    spec = ConvSpec(1, 8, 10, 10, 12, 3, 3, padding=1, bias=True)
    x, w, b = random_operands(spec, seed=5)
    expected = reference_output(spec, (x, w, b))
    db = tmp_path / "t.db"
    store(db, spec, device=opencl.device, MWG=16, NWG=32, WPTM=2, WPTN=4, VWN=4, SA=0, SB=1)
    from autoconv.serve.api import choose_plan

    assert choose_plan(spec, opencl, db).source == "tuned"
    out = autoconv.conv2d(x, w, b, padding=1, db=db)
    assert relative_error(out, expected) < 1e-4
    baseline_db = tmp_path / "b.db"
    store(baseline_db, spec, device=opencl.device, median_ms=9.0, baseline_ms=1.0, MWG=16)
    assert choose_plan(spec, opencl, baseline_db).algorithm == "im2col_blas"
    out = autoconv.conv2d(x, w, b, padding=1, db=baseline_db)
    assert relative_error(out, expected) < 1e-4 and np.all(np.isfinite(out))


def test_direct_loops_stored_alone_are_never_served_over_the_fallbacks(tmp_path):
    """A tuning cut short (or a baseline dropped as unsteady) can leave only the reference loops
    stored for a layer: the lookup goes on down the chain instead of serving them, for that layer,
    as a nearest shape, and as the device default, also after a merge."""
    db = tmp_path / "cut.db"
    store(db, RES3, median_ms=1.0, baseline_ms=2.0)  # a whole tuning: im2col_gemm won
    store(db, RES2, median_ms=160.0, baseline_ms=None, algorithm="direct")  # only direct stored
    plan = lookup(RES2, GPU, db)
    assert plan.algorithm != "direct" and plan.source.startswith("nearest tuned shape"), plan
    only_direct = tmp_path / "only-direct.db"
    store(only_direct, RES2, median_ms=160.0, baseline_ms=None, algorithm="direct")
    store(only_direct, RES4, median_ms=150.0, baseline_ms=None, algorithm="direct")
    plan = lookup(RES2, GPU, only_direct)
    assert plan.algorithm != "direct" and plan.source == "heuristic", plan
    merged = tmp_path / "merged.db"
    with SQLiteStore(merged) as target, SQLiteStore(only_direct, readonly=True) as source:
        target.merge_from(source)
    assert lookup(RES2, GPU, merged).source == "heuristic"
    store(db, RES2, median_ms=150.0, baseline_ms=1.0, algorithm="direct")  # with the baseline beside it
    assert lookup(RES2, GPU, db) == autoconv.Plan("im2col_blas", get_algorithm("im2col_blas").space.validate({}), "tuned")


def test_the_device_default_is_the_winner_estimated_fastest_not_the_most_frequent(tmp_path):
    """Two 1x1 layers won by the generated GEMM, one by blocked_direct: an untuned 3x3 layer is
    served the winner whose measured time, carried over by its algorithm's cost estimate, is the
    lowest, whichever algorithm won most often."""
    db = tmp_path / "e.db"
    slow, fast = ConvSpec(1, 128, 28, 28, 512, 1, 1), ConvSpec(1, 256, 14, 14, 1024, 1, 1)
    store(db, POINTWISE, median_ms=4.0, baseline_ms=50.0, MWG=8)
    store(db, slow, median_ms=4.0, baseline_ms=50.0, MWG=8)
    store(db, fast, median_ms=0.2, baseline_ms=50.0, algorithm="blocked_direct")
    plan = lookup(RES2, GPU, db)
    assert plan.algorithm == "blocked_direct" and plan.source.startswith("device default for dense layers"), plan
    assert plan.source.endswith(f"the winner on {fast}")
    db = tmp_path / "slow.db"  # the same layers, blocked_direct slow on its layer
    store(db, POINTWISE, median_ms=4.0, baseline_ms=50.0, MWG=8)
    store(db, slow, median_ms=4.0, baseline_ms=50.0, MWG=8)
    store(db, fast, median_ms=40.0, baseline_ms=50.0, algorithm="blocked_direct")
    plan = lookup(RES2, GPU, db)
    assert plan.algorithm == "im2col_gemm" and plan.params.MWG == 8, plan
    winners = [r for r in SQLiteStore(db).results() if r.algorithm != "im2col_blas"]
    chosen = min(winners, key=lambda r: lookup_module.estimated_ms(r, RES2))
    assert plan.source.endswith(f"the winner on {chosen.spec}") and chosen.algorithm == "im2col_gemm"


def test_a_depthwise_layer_never_takes_the_dense_layers_default(tmp_path):
    """A device whose most frequent winner is Winograd (on dense 3x3 layers): an untuned depthwise
    layer is not served it; with a depthwise layer tuned, that layer's winner is its default."""
    db = tmp_path / "w.db"
    for spec in (RES2, RES3, RES4):
        store(db, spec, median_ms=1.0, baseline_ms=3.0, algorithm="winograd")
    depthwise = ConvSpec(1, 32, 112, 112, 32, 3, 3, padding=1, groups=32)
    plan = lookup(depthwise, GPU, db)
    assert plan.algorithm != "winograd" and plan.source == "heuristic", plan
    store(db, ConvSpec(1, 64, 56, 56, 64, 3, 3, stride=2, padding=1, groups=64), median_ms=2.0, baseline_ms=1.0)
    plan = lookup(depthwise, GPU, db)
    assert plan.algorithm == "im2col_blas" and plan.source.startswith("device default for depthwise layers")
    dense = lookup(POINTWISE, GPU, db)  # dense: the dense layers' winners that can run it (not Winograd, 3x3 only)
    assert dense.algorithm == "im2col_blas" and dense.source.startswith("device default for dense layers")
