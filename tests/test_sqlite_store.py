"""The SQLite store's own matters: schema and migrations (a v1 file made by autoconv before the
algorithm registry migrates without losing a row), WAL, and damaged, foreign or newer files."""

import shutil
import sqlite3
from pathlib import Path

import pytest

from autoconv import ConvSpec
from autoconv.device import DeviceInfo
from autoconv.errors import TuningDBError
from autoconv.store import SCHEMA_VERSION, SQLiteStore

V1_FIXTURE = Path(__file__).parent / "fixtures" / "v1-tuning.db"
CPU = "opencl|Portable Computing Language|pocl|pthread-skylake-avx512-AMD EPYC|3.1+debian"
GPU = "opencl|Fake CL|fakevendor|Fake GPU 1|1.0"


@pytest.fixture
def db(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as database:
        yield database


def test_schema_is_versioned_and_uses_wal(db):
    applied = list(db.db["_sqlite_migrations"].rows)
    assert len(applied) == SCHEMA_VERSION >= 2
    assert db.db.journal_mode == "wal"
    assert {"devices", "layers", "results", "measurements"} <= set(db.db.table_names())
    SQLiteStore(db.path).close()  # reopening applies nothing twice
    assert len(list(db.db["_sqlite_migrations"].rows)) == SCHEMA_VERSION


def _v1_rows(path):
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("select * from results order by id")]


def test_a_v1_database_migrates_without_losing_a_row(tmp_path):
    path = tmp_path / "v1.db"
    shutil.copy(V1_FIXTURE, path)
    before = _v1_rows(path)
    assert len(before) == 4 and "baseline_ms" in before[0]
    with sqlite3.connect(path) as conn:
        measurements = conn.execute("select count(*) from measurements").fetchone()[0]
    with SQLiteStore(path) as db:
        results = db.results()
        assert len(list(db.db["measurements"].rows)) == measurements
    rows = {(r.device, r.spec.key(), r.algorithm, r.template_hash): r for r in results}
    for old in before:
        key = (old["device"], old["layer"])
        if old["params"] is None:  # the baseline had won: the row is now the baseline's own
            blas = rows[(*key, "im2col_blas", old["template_hash"])]
            assert blas.median_ms == old["median_ms"] and blas.params.as_dict() == {}
            continue
        gemm = rows[(*key, "im2col_gemm", old["template_hash"])]
        assert (gemm.median_ms, gemm.default_ms, gemm.trials) == (old["median_ms"], old["default_ms"], old["trials"])
        if old["baseline_ms"] is not None:
            assert rows[(*key, "im2col_blas", old["template_hash"])].median_ms == old["baseline_ms"]
        else:
            assert (*key, "im2col_blas", old["template_hash"]) not in rows
    assert len(results) == 6  # 4 rows, of which 2 held a baseline time beside a generated best
    with SQLiteStore(path) as again:  # migrating twice changes nothing
        assert len(again.results()) == 6


def test_a_v1_database_is_read_without_being_written(tmp_path):
    path = tmp_path / "v1.db"
    shutil.copy(V1_FIXTURE, path)
    original = path.read_bytes()
    with SQLiteStore(path, readonly=True) as reader:
        assert {r.algorithm for r in reader.results()} == {"im2col_gemm", "im2col_blas"}
        assert {row["fingerprint"] for row in reader.devices()} == {CPU, GPU}
    assert path.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["v1.db"]


def test_garbage_and_foreign_files_are_refused_clearly(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TuningDBError, match="garbage.db"):
        SQLiteStore(garbage)
    with pytest.warns(RuntimeWarning):
        assert SQLiteStore.open_for_lookup(garbage) is None
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("create table cats (name text)").connection.commit()
    with pytest.raises(TuningDBError, match="not an autoconv tuning database"):
        SQLiteStore(foreign)
    assert SQLiteStore.open_for_lookup(tmp_path / "absent.db") is None


def test_a_database_from_a_newer_autoconv_is_refused(db):
    db.db["_sqlite_migrations"].insert({"migration_set": "autoconv", "name": "m999_future", "applied_at": "x"})
    db.db.conn.commit()
    with pytest.raises(TuningDBError, match="newer autoconv"):
        SQLiteStore(db.path)
    with pytest.raises(TuningDBError, match="newer autoconv"):
        SQLiteStore(db.path, readonly=True)


def test_a_row_with_invalid_params_is_ignored_with_a_warning(db):
    from autoconv.store import TunedResult
    from autoconv import default_gemm_params

    device = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 1024, (1024, 1024, 64))
    db.record_device(device)
    spec = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)
    for templates in ("t1", "t2"):
        db.save_result(TunedResult(device=device.fingerprint(), spec=spec, algorithm="im2col_gemm",
                                   template_hash=templates, params=default_gemm_params(), median_ms=1.0, gflops=1.0,
                                   rel_error=1e-6, default_ms=None, trials=1))
    db.db.execute("update results set params = ? where template_hash = 't2'",
                  ['{"MWG": "64]; } __kernel void evil() {"}'])
    db.db.conn.commit()
    with pytest.warns(RuntimeWarning, match="MWG"):
        served = db.results()
    assert [r.template_hash for r in served] == ["t1"]
