"""The tuning database: schema and migrations, best-result bookkeeping, validation on read,
merge and prune, and damaged or foreign files."""

import sqlite3

import pytest

from autoconv import ConvSpec, default_gemm_params
from autoconv.backends.base import DeviceInfo
from autoconv.errors import TuningDBError
from autoconv.tuning_db import SCHEMA_VERSION, TunedResult, TuningDB

DEVICE = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 1024, (1024, 1024, 64))
SPEC = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)


def result(median_ms: float, spec: ConvSpec = SPEC, device: DeviceInfo = DEVICE, templates: str = "t1", **params) -> TunedResult:
    return TunedResult(device=device.fingerprint(), spec=spec, algorithm="im2col_gemm", template_hash=templates,
                       params=default_gemm_params(**params), median_ms=median_ms, gflops=spec.flops / (median_ms * 1e6),
                       rel_error=1e-6, baseline="numpy BLAS", baseline_ms=2.0, default_ms=3.0, trials=10)


@pytest.fixture
def db(tmp_path):
    with TuningDB(tmp_path / "t.db") as database:
        database.record_device(DEVICE)
        yield database


def test_schema_is_versioned_and_uses_wal(db):
    applied = list(db.db["_sqlite_migrations"].rows)
    assert len(applied) == SCHEMA_VERSION >= 1
    assert db.db.journal_mode == "wal"
    assert {"devices", "layers", "results", "measurements"} <= set(db.db.table_names())
    TuningDB(db.path).close()  # reopening applies nothing twice
    assert len(list(db.db["_sqlite_migrations"].rows)) == SCHEMA_VERSION


def test_keeps_only_the_best_verified_result_per_key(db):
    assert db.save_result(result(1.0, MWG=32))
    assert not db.save_result(result(1.5, MWG=16))  # slower: the stored best stays
    assert db.save_result(result(0.5, MWG=128))
    (stored,) = db.results()
    assert stored.median_ms == 0.5 and stored.params.MWG == 128 and stored.spec == SPEC
    assert stored.speedup_vs_baseline == pytest.approx(4.0) and stored.speedup_vs_default == pytest.approx(6.0)
    unverified = TunedResult(**{**result(0.1).__dict__, "verified": False})
    assert not db.save_result(unverified)
    assert db.results()[0].median_ms == 0.5


def test_a_row_with_invalid_params_is_ignored_with_a_warning(db):
    db.save_result(result(1.0))
    db.save_result(result(1.0, templates="t2"))
    db.db.execute("update results set params = ? where template_hash = 't2'",
                  ['{"MWG": "64]; } __kernel void evil() {"}'])
    db.db.conn.commit()
    with pytest.warns(RuntimeWarning, match="MWG"):
        served = db.results()
    assert [r.template_hash for r in served] == ["t1"]


def test_merge_keeps_the_best_of_both(tmp_path, db):
    other_spec = ConvSpec(1, 128, 28, 28, 128, 3, 3, padding=1)
    db.save_result(result(1.0, MWG=32))
    with TuningDB(tmp_path / "other.db") as other:
        other.record_device(DEVICE)
        other.save_result(result(0.8, MWG=64))  # better on the shared key
        other.save_result(result(2.0, spec=other_spec))  # a new key
        stored, kept = db.merge_from(other)
    assert (stored, kept) == (2, 0)
    best = {r.spec: r for r in db.results()}
    assert best[SPEC].median_ms == 0.8 and best[SPEC].params.MWG == 64 and best[other_spec].median_ms == 2.0
    with TuningDB(tmp_path / "worse.db") as worse:
        worse.record_device(DEVICE)
        worse.save_result(result(5.0))
        assert db.merge_from(worse) == (0, 1)
    assert {r.spec: r.median_ms for r in db.results()}[SPEC] == 0.8


def test_prune_removes_other_template_versions_and_devices(db):
    other_device = DeviceInfo("opencl", "X", "x", "Other", "2", "cpu", 2, 1 << 20, 4096, (4096, 4096, 4096))
    db.record_device(other_device)
    db.save_result(result(1.0, templates="old"))
    db.save_result(result(1.0, templates="new"))
    db.save_result(result(1.0, templates="new", device=other_device))
    assert db.prune(current_template_hash="new") == 1
    assert db.prune(device=other_device.fingerprint()) == 1
    assert [(r.template_hash, r.device) for r in db.results()] == [("new", DEVICE.fingerprint())]


def test_measurements_keep_failures_with_their_status(db):
    db.record_layer(SPEC)
    db.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", default_gemm_params(), "compile_failed",
                          float("inf"), float("inf"), "error: boom")
    (row,) = db.measurements(DEVICE.fingerprint(), SPEC)
    assert row["status"] == "compile_failed" and row["median_ms"] is None and "boom" in row["message"]
    with pytest.raises(ValueError):
        db.record_measurement(DEVICE.fingerprint(), SPEC, "im2col_gemm", "t1", None, "fine", 1.0, 0.0)


def test_garbage_and_foreign_files_are_refused_clearly(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TuningDBError, match="garbage.db"):
        TuningDB(garbage)
    with pytest.warns(RuntimeWarning):
        assert TuningDB.open_for_lookup(garbage) is None
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("create table cats (name text)").connection.commit()
    with pytest.raises(TuningDBError, match="not an autoconv tuning database"):
        TuningDB(foreign)
    assert TuningDB.open_for_lookup(tmp_path / "absent.db") is None


def test_a_database_from_a_newer_autoconv_is_refused(db, tmp_path):
    db.db["_sqlite_migrations"].insert({"migration_set": "autoconv", "name": "m999_future", "applied_at": "x"})
    db.db.conn.commit()
    with pytest.raises(TuningDBError, match="newer autoconv"):
        TuningDB(db.path)


def test_read_only_handles_refuse_writes(db):
    db.save_result(result(1.0))
    with TuningDB(db.path, readonly=True) as reader:
        assert len(reader.results()) == 1
        with pytest.raises(TuningDBError, match="read-only"):
            reader.save_result(result(0.5))
