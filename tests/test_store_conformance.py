"""One contract, every result store (SQLite is the one implementation now), as Optuna tests its
storages: best-result bookkeeping, validation on read, merge, prune, measurements, read-only."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from autoconv import ConvSpec, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import TuningDBError
from autoconv.store import ResultStore, SQLiteStore, TunedResult

DEVICE = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 1024, (1024, 1024, 64))
SPEC = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)

# name -> (open read-write, open read-only)
STORES: dict[str, tuple[Callable[[Path], ResultStore], Callable[[Path], ResultStore]]] = {
    "sqlite": (lambda path: SQLiteStore(path / "t.db"), lambda path: SQLiteStore(path / "t.db", readonly=True)),
}


def result(median_ms: float, spec: ConvSpec = SPEC, device: DeviceInfo = DEVICE, templates: str = "t1",
           algorithm: str = "im2col_gemm", **params) -> TunedResult:
    return TunedResult(device=device.fingerprint(), spec=spec, algorithm=algorithm, template_hash=templates,
                       params=get_algorithm(algorithm).space.validate(params), median_ms=median_ms,
                       gflops=spec.flops / (median_ms * 1e6), rel_error=1e-6, default_ms=3.0, trials=10)


@pytest.fixture(params=sorted(STORES))
def opener(request, tmp_path):
    writer, reader = STORES[request.param]
    return lambda readonly=False: (reader if readonly else writer)(tmp_path)


@pytest.fixture
def store(opener):
    with opener() as database:
        database.record_device(DEVICE)
        yield database


class TestResultStore:
    def test_implements_the_protocol(self, store):
        assert isinstance(store, ResultStore)

    def test_keeps_only_the_best_verified_result_per_algorithm(self, store):
        assert store.save_result(result(1.0, MWG=32))
        assert not store.save_result(result(1.5, MWG=16))  # slower: the stored best stays
        assert store.save_result(result(0.5, MWG=128))
        assert store.save_result(result(0.7, algorithm="implicit_gemm", MWG=8))  # another algorithm: its own row
        assert store.save_result(result(2.0, algorithm="im2col_blas"))
        by_algorithm = {r.algorithm: r for r in store.results()}
        assert set(by_algorithm) == {"im2col_gemm", "implicit_gemm", "im2col_blas"}
        best = by_algorithm["im2col_gemm"]
        assert best.median_ms == 0.5 and best.params.MWG == 128 and best.spec == SPEC
        assert best.speedup_vs_default == pytest.approx(6.0) and by_algorithm["implicit_gemm"].params.MWG == 8
        unverified = TunedResult(**{**result(0.1).__dict__, "verified": False})
        assert not store.save_result(unverified)
        assert not store.save_result(result(3.0, algorithm="im2col_blas"))
        assert store.save_result(result(3.0, algorithm="im2col_blas"), replace=True)  # a fresh steady time
        assert {r.algorithm: r.median_ms for r in store.results()}["im2col_blas"] == 3.0

    def test_params_are_validated_by_their_algorithms_space(self, store):
        with pytest.raises(Exception, match="unknown parameter"):
            result(1.0, algorithm="im2col_blas", MWG=8)
        store.save_result(result(1.0, algorithm="direct"))
        (stored,) = store.results()
        assert stored.params.as_dict() == {}

    def test_merge_keeps_the_best_of_both(self, store, tmp_path):
        other_spec = ConvSpec(1, 128, 28, 28, 128, 3, 3, padding=1)
        store.save_result(result(1.0, MWG=32))
        with SQLiteStore(tmp_path / "other.db") as other:
            other.record_device(DEVICE)
            other.save_result(result(0.8, MWG=64))  # better on the shared key
            other.save_result(result(2.0, spec=other_spec))  # a new key
            stored, kept = store.merge_from(other)
        assert (stored, kept) == (2, 0)
        best = {r.spec: r for r in store.results()}
        assert best[SPEC].median_ms == 0.8 and best[SPEC].params.MWG == 64 and best[other_spec].median_ms == 2.0
        with SQLiteStore(tmp_path / "worse.db") as worse:
            worse.record_device(DEVICE)
            worse.save_result(result(5.0))
            assert store.merge_from(worse) == (0, 1)
        assert {r.spec: r.median_ms for r in store.results()}[SPEC] == 0.8

    def test_prune_removes_other_template_versions_and_devices(self, store):
        other_device = DeviceInfo("opencl", "X", "x", "Other", "2", "cpu", 2, 1 << 20, 4096, (4096, 4096, 4096))
        store.record_device(other_device)
        store.save_result(result(1.0, templates="old"))
        store.save_result(result(1.0, templates="new"))
        store.save_result(result(1.0, templates="new", device=other_device))
        assert store.prune(current_template_hash="new") == 1
        assert store.prune(device=other_device.fingerprint()) == 1
        assert [(r.template_hash, r.device) for r in store.results()] == [("new", DEVICE.fingerprint())]

    def test_measurements_keep_failures_with_their_status(self, store):
        store.record_layer(SPEC)
        params = get_algorithm("im2col_gemm").space.validate({})
        store.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", params, "compile_failed",
                                 float("inf"), float("inf"), "error: boom")
        store.record_measurement(DEVICE.fingerprint(), SPEC, "implicit_gemm", "t1", params, "too_large",
                                 float("inf"), float("inf"), "the scratch buffer needs 3 GiB")
        rows = list(store.measurements(DEVICE.fingerprint(), SPEC))
        assert [row["status"] for row in rows] == ["compile_failed", "too_large"]
        assert rows[0]["median_ms"] is None and "boom" in rows[0]["message"]
        with pytest.raises(ValueError):
            store.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", None, "fine", 1.0, 0.0)

    def test_timed_configs_are_the_verified_measurements_with_a_time(self, store):
        store.record_layer(SPEC)
        params = get_algorithm("im2col_gemm").space.validate({})
        store.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", params, "ok", 2.5, 1e-6)
        store.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", params, "wrong_result", float("inf"), 0.5)
        store.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t0", params, "ok", 3.0, 1e-6)
        (timed,) = store.timed_configs("t1")
        assert (timed.device, timed.spec, timed.algorithm, timed.params, timed.median_ms) == \
            (DEVICE.fingerprint(), SPEC, "im2col_gemm", params, 2.5)
        assert [t.median_ms for t in store.timed_configs()] == [2.5, 3.0]

    def test_devices_round_trip(self, store):
        (row,) = store.devices()
        assert row["fingerprint"] == DEVICE.fingerprint() and store.device(DEVICE.fingerprint())["name"] == DEVICE.name

    def test_read_only_handles_refuse_writes(self, store, opener):
        store.save_result(result(1.0))
        with opener(readonly=True) as reader:
            assert len(reader.results()) == 1
            with pytest.raises(TuningDBError, match="read-only"):
                reader.save_result(result(0.5))
