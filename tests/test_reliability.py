"""Reliability: one regression test per defect of the hardening issue (the exact scenario and its
neighbours), and property-based fuzzing of the LAYER parser and of stored result rows.

A damaged database or journal is a miss or a one-line error, never a traceback and never served;
nothing a user owns is deleted; resources are checked before work."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import autoconv
from autoconv import ConvSpec, InvalidSpecError, Plan, ResourceLimitError, default_gemm_params, get_algorithm, lookup
from autoconv.algorithms import DIRECT, IM2COL_BLAS, IM2COL_GEMM, IMPLICIT_GEMM
from autoconv.cli import app
from autoconv.device import DeviceInfo
from autoconv.layers import parse_layer
from autoconv.render import template_hash
from autoconv.store import SQLiteStore, TunedResult
from autoconv.tuning.study import journal_path, journal_storage, study_name, worker_identity
from autoconv.tuning.tuner import DeviceEvaluator, Outcome, tunable, tune_layer

from conftest import heuristic_plan

runner = CliRunner()
WIDE = {"COLUMNS": "250"}
L = "n=1,c=16,h=14,w=14,k=16,r=3,s=3,pad=1"
L_SPEC = parse_layer(L).spec
FAKE_GPU = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU", "1.0", "gpu", 8, 16384, 64, (64, 64, 64))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c" / "build_and_run.sh"


def cli(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={**WIDE, **(env or {})})


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


class FakeEvaluator:
    """Deterministic times; the tuner's loop without timing noise. baseline_spread: how much the
    library baseline's repeats disagree (a busy machine)."""

    algorithms = (IM2COL_GEMM, IMPLICIT_GEMM, DIRECT, IM2COL_BLAS)

    def __init__(self, baseline_ms: float = 1.5, baseline_spread: float = 0.01):
        self.measured = []
        self.baseline_ms, self.baseline_spread = baseline_ms, baseline_spread

    def __call__(self, algorithm, params, bound_ms=None):
        self.measured.append((algorithm, params))
        if algorithm == IM2COL_BLAS:
            return Outcome("ok", self.baseline_ms, 1e-6, spread=self.baseline_spread, repeats=7)
        if not params:
            return Outcome("ok", 30.0, 1e-6, spread=0.01, repeats=7)
        return Outcome("ok", 1.0 + abs(params.MWG - 32) / 32 + abs(params.NWG - 64) / 64, 1e-6, spread=0.01, repeats=7)


def store_result(path: Path, device: DeviceInfo, spec: ConvSpec = L_SPEC, median_ms: float = 1.0, **params) -> None:
    with SQLiteStore(path) as db:
        db.record_device(device)
        db.save_result(TunedResult(
            device=device.fingerprint(), spec=spec, algorithm="im2col_gemm", template_hash=template_hash(),
            params=default_gemm_params(**(params or {"MWG": 16, "WPTM": 4})), median_ms=median_ms, gflops=1.0,
            rel_error=1e-6, default_ms=2.0, trials=6))


@pytest.fixture
def tuned_db(opencl, tmp_path) -> Path:
    """What `autoconv tune L --trials 6 --db t.db` leaves, without the minutes of measuring."""
    path = tmp_path / "t.db"
    store_result(path, opencl.device)
    return path


def chattr_available(tmp_path: Path) -> bool:
    probe = tmp_path / "chattr-probe"
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    return ok


@contextmanager
def immutable(*paths: Path):
    """Make files or directories read-only even for root (chattr +i), always undone."""
    for path in paths:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        for path in paths:
            subprocess.run(["chattr", "-i", str(path)], check=False)


# 1. export never deletes what a user owns ----------------------------------------------------------

def test_export_refuses_a_directory_with_a_manifest_and_user_files(tuned_db, tmp_path):
    out = tmp_path / "d"
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    (out / "src" / "a.c").write_text("x")
    output = one_line_error(cli("export", L, "--db", str(tuned_db), "--out", str(out)))
    assert "not an earlier autoconv export" in output
    assert (out / "src" / "a.c").read_text() == "x" and (out / "manifest.json").read_text() == "{}"


def test_export_refuses_an_earlier_export_the_user_added_files_to(tuned_db, tmp_path):
    out = tmp_path / "d"
    assert cli("export", L, "--db", str(tuned_db), "--out", str(out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    output = one_line_error(cli("export", L, "--db", str(tuned_db), "--out", str(out)))
    assert "notes.txt" in output and (out / "notes.txt").read_text() == "mine"
    assert (out / "manifest.json").is_file()


def test_export_replaces_an_untouched_earlier_export_and_follows_the_umask(tuned_db, tmp_path):
    out = tmp_path / "d"
    old = os.umask(0o022)
    try:
        assert cli("export", L, "--db", str(tuned_db), "--out", str(out), "--reference").exit_code == 0
        assert cli("export", L, "--db", str(tuned_db), "--out", str(out)).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert not (out / "reference").exists()


# 2. a torn or damaged Optuna journal is repaired, not fatal -------------------------------------

@pytest.mark.parametrize("damage", ["torn_60", "torn_1", "torn_200", "garbage_line", "binary_tail"])
def test_a_damaged_journal_keeps_its_valid_prefix(tmp_path, damage):
    db_path = tmp_path / "x.db"
    with SQLiteStore(db_path) as db:
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=4)
    journal = journal_path(db_path)
    size = journal.stat().st_size
    if damage.startswith("torn_"):
        os.truncate(journal, size - int(damage.split("_")[1]))
    elif damage == "garbage_line":
        with open(journal, "ab") as f:
            f.write(b'{"op_code": 4, "worker_id": \n')
    else:
        with open(journal, "ab") as f:
            f.write(b"\x00\xff\xfe garbage")
    with SQLiteStore(db_path) as db, pytest.warns(RuntimeWarning, match="damaged tail"):
        report = tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=8)
    assert report.trials == 8
    (aside,) = tmp_path.glob("x.db.optuna.journal.damaged-*")
    assert aside.stat().st_size > 0
    with SQLiteStore(db_path) as db:  # and the next run finds a whole journal
        assert tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=8).trials == 8


def test_every_later_tune_works_after_a_torn_journal_cli(opencl, tmp_path):
    db_path = tmp_path / "t.db"
    tiny = "n=1,c=4,h=6,w=6,k=4,r=3,s=3,pad=1"
    assert cli("tune", tiny, "--trials", "2", "--repeats", "1", "--db", str(db_path)).exit_code == 0
    os.truncate(journal_path(db_path), journal_path(db_path).stat().st_size - 60)
    result = cli("tune", "n=1,c=4,h=5,w=5,k=4,r=1,s=1", "--trials", "2", "--repeats", "1", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    assert "damaged tail" in result.output and "Traceback" not in result.output


# 3 and 11. damaged rows, tables and params are misses or one line, never served or copied -------

RESULT_COLUMNS = {
    "median_ms": [None, "fast", -1.0, 0.0, float("inf"), b"\x00"],
    "default_ms": ["x", -2.0, 0.0],  # (SQLite stores NaN as NULL: no default time, a valid value)
    "spread": ["wide", -0.5],
    "repeats": ["seven", -1],
    "rel_error": ["x", 0.5, -1.0],
    "trials": ["many", -3, 1.5],
    "verified": [0, None, "yes"],
    "params": ["{", "[]", '{"MWG": 3}', '{"MWG": "64]; evil"}', "[" * 100_000 + "]" * 100_000, "x" * 10_000],
    "device": [None, b"\x07", "a device with no devices row"],
    "autoconv_version": [b"\x03"],  # (an int in a TEXT column is stored as text: not damage)
    "algorithm": ["winograd_from_the_future", None],
}


@pytest.mark.parametrize("column, value", [(c, v) for c, values in RESULT_COLUMNS.items() for v in values],
                         ids=lambda v: repr(v)[:20])
def test_a_damaged_result_column_is_never_served_or_merged(opencl, tuned_db, tmp_path, column, value):
    with sqlite3.connect(tuned_db) as conn:
        conn.execute(f"update results set {column} = ?", [value])
    with warnings.catch_warnings(record=True) as seen:  # a damaged row is skipped with a warning, or not read
        warnings.simplefilter("always")
        assert lookup(L_SPEC, opencl, tuned_db, shipped=False).source != "tuned"
    assert all(issubclass(w.category, RuntimeWarning) and "autoconv: ignoring" in str(w.message) for w in seen)
    listed = cli("db", "list", "--db", str(tuned_db))
    assert listed.exit_code == 0 and "Traceback" not in listed.output
    merged = tmp_path / "merged.db"
    assert cli("db", "merge", str(tuned_db), "--db", str(merged)).exit_code == 0
    with SQLiteStore(merged, readonly=True) as db:
        assert db.results() == []


@pytest.mark.parametrize("column", ["n", "k", "stride_h", "pad_w", "dilation_w", "groups", "bias", "layout", "activation",
                                    "residual"])
def test_a_damaged_layer_column_is_never_served(opencl, tuned_db, column):
    with sqlite3.connect(tuned_db) as conn:
        conn.execute(f"update layers set {column} = ?", ["broken"])
    with pytest.warns(RuntimeWarning, match="autoconv: ignoring"):
        assert lookup(L_SPEC, opencl, tuned_db, shipped=False).source != "tuned"
    assert cli("db", "show", L, "--db", str(tuned_db)).exit_code in (0, 1)


def test_run_and_conv2d_survive_a_null_median(opencl, tuned_db):
    with sqlite3.connect(tuned_db) as conn:
        conn.execute("update results set median_ms = NULL")
    result = cli("run", L, "--db", str(tuned_db), "--repeats", "1")
    assert result.exit_code == 0, result.output
    x, w = np.ones(L_SPEC.input_shape, np.float32), np.ones(L_SPEC.weight_shape, np.float32)
    autoconv.default_session().clear_cache()  # the run above cached its (fallback) answer
    with pytest.warns(RuntimeWarning, match="median_ms"):
        out = autoconv.conv2d(x, w, padding=1, db=tuned_db)
    assert out.shape == L_SPEC.output_shape


@pytest.mark.parametrize("table", ["results", "layers", "devices", "measurements"])
def test_a_dropped_table_is_one_line_everywhere(opencl, tuned_db, tmp_path, table):
    with sqlite3.connect(tuned_db) as conn:
        conn.execute(f"drop table {table}")
    for args in (["db", "list"], ["db", "show", L], ["export", "--all", "--out", str(tmp_path / "o")]):
        output = one_line_error(cli(*args, "--db", str(tuned_db)))
        assert "damaged" in output and table in output
    assert cli("run", L, "--db", str(tuned_db), "--repeats", "1").exit_code == 0


def test_deeply_nested_params_are_skipped_by_list_show_and_export(opencl, tuned_db, tmp_path):
    with sqlite3.connect(tuned_db) as conn:
        conn.execute("update results set params = ?", ["[" * 100_000 + "]" * 100_000])
    assert cli("db", "list", "--db", str(tuned_db)).exit_code == 0
    assert cli("db", "show", L, "--db", str(tuned_db)).exit_code in (0, 1)
    output = one_line_error(cli("export", "--all", "--db", str(tuned_db), "--out", str(tmp_path / "o")))
    assert "holds no result" in output


# 4 and 5. resources are checked before anything is allocated ---------------------------------------

def test_a_layer_beyond_the_devices_largest_buffer_is_one_line(opencl):
    from autoconv.layers import parse_layer

    # The smallest batch whose im2col matrix exceeds this device's largest buffer (devices differ).
    per_image = parse_layer("vgg16/conv1_2").spec.im2col_bytes
    batch = opencl.device.max_alloc_bytes // per_image + 1
    started = time.monotonic()
    output = one_line_error(cli("run", "vgg16/conv1_2", "--batch", str(batch), "--algorithm", "im2col_gemm"))
    assert "allocates at most" in output and "GiB" in output
    assert time.monotonic() - started < 30


def test_an_impossible_layer_is_refused_before_any_host_array(opencl):
    output = one_line_error(cli("run", "n=64,c=4096,h=4096,w=4096,k=16,r=3,s=3,pad=1"))
    assert "needs" in output and ("allocates at most" in output or "host memory" in output)
    huge = ConvSpec(64, 4096, 4096, 4096, 16, 3, 3, padding=1)
    with pytest.raises(ResourceLimitError, match="host memory"):
        autoconv.get_backend("numpy").prepare(huge, Plan("im2col_blas"))
    from autoconv.tuning.verify import random_operands

    with pytest.raises(ResourceLimitError, match="host memory"):
        random_operands(huge)


def test_the_tuner_records_a_config_too_large_for_the_device_as_a_failure(opencl):
    from autoconv.backends.opencl import OpenCLBackend

    small = OpenCLBackend()
    small.device = replace(opencl.device, max_alloc_bytes=4096)
    spec = ConvSpec(1, 8, 12, 12, 8, 3, 3, padding=1)  # its im2col scratch is 20 KiB
    plan = heuristic_plan(spec, opencl.device)
    outcome = DeviceEvaluator(small, spec, repeats=1)(plan.algorithm, plan.params)
    assert outcome.status == "too_large" and outcome.median_ms == float("inf") and "4.0 KiB" in outcome.message
    with pytest.raises(ResourceLimitError):
        small.prepare(spec, Plan("direct")).time(*[np.ones(s, np.float32) for s in (spec.input_shape, spec.weight_shape)])


def test_int32_overflowing_kernel_arguments_are_refused(opencl):
    from autoconv.backends.base import check_fits
    from autoconv.algorithms.im2col_gemm import render_im2col
    from autoconv.render import OPENCL

    spec = ConvSpec(4096, 1, 1024, 1024, 1, 1, 1)  # N*P*Q = 2**32
    unlimited = replace(opencl.device, max_alloc_bytes=0, global_mem_bytes=0)
    with pytest.raises(ResourceLimitError, match="32-bit"):
        check_fits(unlimited, spec, 0, [render_im2col(spec, heuristic_plan(spec, None).params, OPENCL)])


# 6 and 9. live trials of another tuner are left alone; a killed default is measured again ----------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_tuners_running_trial_is_not_failed_but_a_dead_ones_is(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as db:
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=2)
        storage = journal_storage(db.path)
        study = optuna.load_study(study_name=study_name(FAKE_GPU, L_SPEC, "im2col_gemm", template_hash()),
                                  storage=storage)
        live = study.ask()
        live.set_user_attr("worker", worker_identity())
        dead = study.ask()
        dead.set_user_attr("worker", {**worker_identity(), "pid": _dead_pid()})
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=4, storage=storage)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[live.number] == optuna.trial.TrialState.RUNNING
    assert states[dead.number] == optuna.trial.TrialState.FAIL


def test_two_tuners_of_one_layer_on_one_db_both_finish(opencl, tmp_path):
    db_path = tmp_path / "t.db"
    command = [sys.executable, "-m", "autoconv.cli", "tune", "n=1,c=8,h=10,w=10,k=8,r=3,s=3,pad=1", "--trials", "6",
               "--repeats", "1", "--db", str(db_path)]
    env = {**os.environ, "AUTOCONV_SHIPPED_DB_DIR": ""}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out + err
        assert "Traceback" not in err and "UpdateFinishedTrialError" not in err


def test_a_kill_during_the_default_trial_measures_the_default_on_resume(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as db:
        storage = journal_storage(db.path)
        study = optuna.create_study(study_name=study_name(FAKE_GPU, L_SPEC, "im2col_gemm", template_hash()),
                                    storage=storage)
        space = get_algorithm(IM2COL_GEMM).space
        default = space.canonical(heuristic_plan(L_SPEC, FAKE_GPU).params)
        study.enqueue_trial(space.sampled_values(default), user_attrs={"default": True})
        killed = study.ask()  # the first run took the default and was killed while measuring it
        killed.set_user_attr("worker", {**worker_identity(), "pid": _dead_pid()})
        fake = FakeEvaluator()
        report = tune_layer(L_SPEC, FAKE_GPU, fake, db, trials=5, storage=storage, algorithms=(IM2COL_GEMM,))
    assert fake.measured[0] == (IM2COL_GEMM, default)
    assert report.bests[IM2COL_GEMM].default_ms == FakeEvaluator()(IM2COL_GEMM, default).median_ms


# 7. many processes creating one new database at once --------------------------------------------

def test_concurrent_creation_of_a_new_database(tmp_path):
    script = "import sys; from autoconv.store import SQLiteStore; SQLiteStore(sys.argv[1]).close()"
    for round_ in range(3):
        path = tmp_path / f"new{round_}.db"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
        with SQLiteStore(path, readonly=True) as db:
            assert db.results() == []


# 8 and 12. read-only files and directories -------------------------------------------------------

def test_read_only_database_or_journal_is_one_line(opencl, tmp_path):
    if not chattr_available(tmp_path):
        pytest.skip("chattr +i is not available here")
    db_path = tmp_path / "t.db"
    tiny = "n=1,c=4,h=6,w=6,k=4,r=3,s=3,pad=1"
    assert cli("tune", tiny, "--trials", "1", "--repeats", "1", "--db", str(db_path)).exit_code == 0
    with immutable(db_path):
        output = one_line_error(cli("tune", tiny, "--trials", "2", "--repeats", "1", "--db", str(db_path)))
        assert str(db_path) in output
        assert cli("db", "list", "--db", str(db_path)).exit_code == 0
    with immutable(journal_path(db_path)):
        output = one_line_error(cli("tune", tiny, "--trials", "2", "--repeats", "1", "--db", str(db_path)))
        assert "journal" in output


def test_a_wal_database_in_a_read_only_directory_is_read(opencl, tmp_path):
    if not chattr_available(tmp_path):
        pytest.skip("chattr +i is not available here")
    folder = tmp_path / "ro"
    folder.mkdir()
    db_path = folder / "t.db"
    store_result(db_path, opencl.device)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    before = sorted(p.name for p in folder.iterdir())
    with immutable(folder):
        assert lookup(L_SPEC, opencl, db_path, shipped=False).source == "tuned"
        listed = cli("db", "list", "--db", str(db_path))
        assert listed.exit_code == 0 and "1x16x14x14" in listed.output
    assert sorted(p.name for p in folder.iterdir()) == before


def test_reading_the_shipped_database_changes_nothing(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "tuning_db" / "pocl-cpu.db"
    copy_dir = tmp_path / "shipped"
    copy_dir.mkdir()
    copy = copy_dir / "pocl-cpu.db"
    shutil.copy(shipped, copy)
    original = copy.read_bytes()
    assert cli("db", "list", "--db", str(copy)).exit_code == 0
    assert cli("db", "show", "resnet50/res2_3x3", "--db", str(copy)).exit_code in (0, 1)
    assert copy.read_bytes() == original and [p.name for p in copy_dir.iterdir()] == ["pocl-cpu.db"]
    assert shipped.read_bytes()[18:20] == b"\x01\x01", "the shipped database must not be in WAL mode"


# 10. user strings are printed literally -----------------------------------------------------------

def test_markup_in_paths_and_stored_names_is_printed_literally(tmp_path):
    output = one_line_error(cli("db", "list", "--db", str(tmp_path / "[/]x.db")))
    assert "[/]x.db" in output
    odd = DeviceInfo("opencl", "P[bold]", "v", "a[/]b", "1[red]", "gpu", 1, 16384, 64, (64, 64, 64))
    db_path = tmp_path / "odd.db"
    store_result(db_path, odd)
    listed = cli("db", "list", "--db", str(db_path))
    assert listed.exit_code == 0 and "a[/]b" in listed.output and "P[bold]" in listed.output
    shown = cli("db", "show", L, "--db", str(db_path))
    assert shown.exit_code == 0 and "a[/]b" in shown.output


def test_install_hints_keep_their_brackets():
    pytest.importorskip("typer")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    output = one_line_error(cli("run", L, "--backend", "cuda"))
    assert "pip install cupy-cuda12x" in output and "[cuda] extra" in output
    assert "[onnx] extra" in cli("tune", "--help").output


# 13. ONNX attributes that do not describe a 2-D conv are skipped with the reason ----------------------

def _onnx_with(path: Path, **attrs) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="bad", **attrs),
             helper.make_node("Conv", ["x", "w"], ["z"], name="good", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph)
    onnx.save(model, str(path))


@pytest.mark.parametrize("attrs, reason", [
    ({"pads": [1, 1]}, "pads must have 4 values"),
    ({"auto_pad": "SAME_UPPER", "strides": [0, 0]}, "strides must be at least 1"),
    ({"dilations": [1]}, "dilations must have 2 values"),
    ({"strides": [1, -2]}, "strides must be at least 1"),
    ({"pads": [0, 0, -1, 0]}, "pads must be at least 0"),
    ({"kernel_shape": [5, 5]}, "kernel_shape"),
])
def test_onnx_nodes_with_bad_attributes_are_skipped_with_the_reason(tmp_path, attrs, reason):
    from autoconv.onnx_layers import onnx_layers

    path = tmp_path / "m.onnx"
    _onnx_with(path, **attrs)
    layers, skipped = onnx_layers(path)
    assert [layer.name for layer in layers] == ["good"]
    assert len(skipped) == 1 and reason in skipped[0]


def test_onnx_path_that_is_a_directory(tmp_path):
    assert "is a directory" in one_line_error(cli("tune", "--onnx", str(tmp_path)))


# 14 and 15. CLI values -------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["nan", "", "inf", "-1m", "0", " "])
def test_a_time_budget_must_be_a_positive_finite_duration(budget, tmp_path):
    output = one_line_error(cli("tune", L, "--time-budget", budget, "--db", str(tmp_path / "t.db")))
    assert "--time-budget" in output
    assert not (tmp_path / "t.db").exists()


@pytest.mark.parametrize("text, message", [
    ("c=3,h=8,w=8,k=4,r=3,s=3,bias=2", "bias must be 0 or 1"),
    ("c=3,h=8,w=8,k=4,r=3,s=3,bias=-1", "bias must be 0 or 1"),
    ("c=3,h=8,w=8,k=4,r=3,s=3,k=5", "given twice"),
    ("c=3,c=3,h=8,w=8,k=4,r=3,s=3", "given twice"),
])
def test_layer_strings_are_strict(text, message):
    with pytest.raises(InvalidSpecError, match=message):
        parse_layer(text)


@pytest.mark.parametrize("command", [["run", L], ["compare", L], ["export", "--all", "--out", "x"],
                                     ["db", "list"], ["db", "show", L]])
def test_an_empty_device_name_is_refused(command, tuned_db):
    result = cli(*command, "--device", "", *(["--db", str(tuned_db)] if command[0] in ("export", "db") else []))
    assert result.exit_code == 2 and "empty string" in result.output


# 16. conv2d arguments ----------------------------------------------------------------------------

def test_conv2d_refuses_a_plan_that_is_not_a_plan():
    x, w = np.ones((1, 4, 6, 6), np.float32), np.ones((4, 4, 3, 3), np.float32)
    with pytest.raises(InvalidSpecError, match="plan: expected an autoconv.Plan"):
        autoconv.conv2d(x, w, plan="foo")


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint16])
def test_numpy_integers_are_integers_everywhere(kind):
    x, w = np.ones((1, 4, 6, 6), np.float32), np.ones((4, 2, 3, 3), np.float32)
    out = autoconv.conv2d(x, w, stride=kind(1), padding=kind(1), dilation=kind(1), groups=kind(2), backend="numpy")
    assert out.shape == (1, 4, 6, 6)
    spec = ConvSpec(kind(1), kind(4), 6, 6, 4, 3, 3, groups=kind(2))
    assert spec == ConvSpec(1, 4, 6, 6, 4, 3, 3, groups=2) and type(spec.n) is int
    with pytest.raises(InvalidSpecError):
        ConvSpec(1, 4, 6, 6, 4, 3, 3, groups=np.bool_(True))


# 17. a baseline measured under load is not stored; a later steady one replaces a stored one --------

def test_a_noisy_baseline_is_not_stored(opencl, monkeypatch):
    from autoconv.backends.base import Timing
    from autoconv.backends.numpy_backend import NumpyConv

    calls = []

    def noisy(self, *args, **kwargs):
        calls.append(1)
        return Timing((0.2, 0.2, 13.9, 0.3, 16.0, 0.2, 9.0))

    monkeypatch.setattr(NumpyConv, "time", noisy)
    spec = ConvSpec(1, 4, 6, 6, 4, 3, 3, padding=1)
    evaluator = DeviceEvaluator(opencl, spec, repeats=1)
    outcome = evaluator(IM2COL_BLAS, get_algorithm(IM2COL_BLAS).space.validate({}))
    assert len(calls) == 3 and not outcome.steady  # re-measured, still too wide


def test_a_noisy_baseline_is_stored_flagged_where_no_steady_one_is(opencl, monkeypatch, tmp_path):
    """Re-measured (with a settle pause), still unsteady, nothing steady stored: it is stored with
    its spread, flagged, and still compared, so the layer is not left to direct loops alone."""
    from autoconv.backends.base import Timing
    from autoconv.backends.numpy_backend import NumpyConv

    monkeypatch.setattr(NumpyConv, "time", lambda self, *a, **k: Timing((0.2, 0.2, 13.9, 0.3, 16.0, 0.2, 9.0)))
    spec = ConvSpec(1, 4, 6, 6, 4, 3, 3, padding=1)
    with SQLiteStore(tmp_path / "t.db") as db, pytest.warns(RuntimeWarning, match="flagged as unsteady"):
        report = tune_layer(spec, opencl.device, DeviceEvaluator(opencl, spec, repeats=1), db, trials=1,
                            algorithms=(IM2COL_BLAS, DIRECT))
        (stored,) = [r for r in db.results() if r.algorithm == IM2COL_BLAS]
        assert stored.unsteady and stored.spread > 1.0 and report.baseline is not None
    assert lookup(spec, opencl.device, tmp_path / "t.db").source == "tuned"  # compared: the layer counts as tuned


def test_a_stored_baseline_is_replaced_by_the_next_steady_measurement(tmp_path):
    def baseline(db):
        return {r.algorithm: r.median_ms for r in db.results()}[IM2COL_BLAS]

    with SQLiteStore(tmp_path / "t.db") as db:
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(baseline_ms=13.9), db, trials=4)
        assert baseline(db) == 13.9
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(baseline_ms=0.215), db, trials=4)
        assert baseline(db) == 0.215
        with pytest.warns(RuntimeWarning, match="not stored"):  # busy now: the steady one stays
            tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(baseline_ms=16.0, baseline_spread=0.8), db, trials=5)
        assert baseline(db) == 0.215


# 18. the export's header is tied to its kernel files ----------------------------------------------

@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/CL/cl.h").exists(),
                    reason="needs gcc and the OpenCL headers (scripts/install_pocl.sh installs them)")
def test_the_c_example_refuses_a_stale_or_tampered_header(opencl, tuned_db, tmp_path):
    out = tmp_path / "o"
    assert cli("export", L, "--db", str(tuned_db), "--out", str(out), "--reference").exit_code == 0
    header = (out / "autoconv_kernels.h").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    scratch = manifest["layers"][0]["buffers"]["scratch"]
    assert f", {scratch},\n" in header and "AUTOCONV_EXPORT_HASH" in header
    (out / "autoconv_kernels.h").write_text(header.replace(f", {scratch},\n", ", 64,\n", 1))
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "does not match the kernel files" in run.stderr
    # A header from an export of other params beside re-exported kernels: refused, not run.
    other_db = tmp_path / "other.db"
    store_result(other_db, opencl.device, MWG=8, WPTM=8)
    other = tmp_path / "other"
    assert cli("export", L, "--db", str(other_db), "--out", str(other), "--reference").exit_code == 0
    shutil.copy(out / "manifest.json", tmp_path / "keep.json")
    (out / "autoconv_kernels.h").write_text(header)
    for kernel in out.glob("*.cl"):
        shutil.copy(other / kernel.name, kernel)
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "does not match the kernel files" in run.stderr


# 19. paths that are not what they should be --------------------------------------------------------

def test_db_list_on_an_empty_file_writes_nothing(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    output = one_line_error(cli("db", "list", "--db", str(empty)))
    assert "empty file" in output and empty.stat().st_size == 0 and sorted(tmp_path.iterdir()) == [empty]


def test_run_with_a_directory_as_db_warns(opencl, tmp_path):
    result = cli("run", L, "--db", str(tmp_path), "--repeats", "1")
    assert result.exit_code == 0 and "is a directory, not a tuning database" in result.output


def test_run_with_a_missing_db_warns(opencl, tmp_path):
    result = cli("run", L, "--db", str(tmp_path / "typo.db"), "--repeats", "1")
    assert result.exit_code == 0 and "does not exist" in result.output


# Property-based fuzzing ------------------------------------------------------------------------------

LAYER_ALPHABET = "nchwkrsbiadlotgup=,0123456789- _+x."


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(alphabet=LAYER_ALPHABET, max_size=60),
    st.lists(st.tuples(st.sampled_from(["n", "c", "h", "w", "k", "r", "s", "stride", "pad", "dilation", "groups",
                                        "bias", "x", ""]),
                       st.one_of(st.integers(-5, 300), st.text(alphabet="0123456789-+ x", max_size=6))),
             max_size=14).map(lambda pairs: ",".join(f"{k}={v}" for k, v in pairs)),
))
def test_the_layer_parser_gives_a_layer_or_a_precise_error(text):
    try:
        layer = parse_layer(text)
    except InvalidSpecError as exc:
        assert str(exc)
        return
    assert isinstance(layer.spec, ConvSpec) and layer.spec.p > 0 and layer.spec.q > 0
    assert parse_layer(text).spec == layer.spec


ANY_VALUE = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=30), st.binary(max_size=10))


@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "f.db"
    store_result(path, FAKE_GPU)
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(results=st.dictionaries(st.sampled_from(["device", "layer", "dtype", "algorithm", "template_hash", "params",
                                                  "median_ms", "gflops", "rel_error", "verified", "spread",
                                                  "repeats", "default_ms", "trials", "autoconv_version",
                                                  "created"]), ANY_VALUE, max_size=4),
       layers=st.dictionaries(st.sampled_from(["n", "c", "h", "w", "k", "r", "s", "stride_h", "stride_w", "pad_h",
                                                 "pad_w", "dilation_h", "dilation_w", "groups", "bias", "dtype",
                                                 "layout"]), ANY_VALUE, max_size=3),
       devices=st.dictionaries(st.sampled_from(["backend", "vendor", "name", "device_type", "compute_units",
                                                  "local_mem_bytes", "max_work_group_size", "max_work_item_sizes"]),
                               ANY_VALUE, max_size=2))
def test_result_rows_with_arbitrary_values_are_served_only_when_valid(fuzz_db, tmp_path_factory, results, layers,
                                                                      devices):
    path = tmp_path_factory.mktemp("case") / "f.db"
    shutil.copy(fuzz_db, path)
    with sqlite3.connect(path) as conn:
        for table, changes in (("results", results), ("layers", layers), ("devices", devices)):
            for column, value in changes.items():
                conn.execute(f"update {table} set {column} = ?", [value])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with SQLiteStore(path, readonly=True) as db:
            served = db.results()
            db.devices()
        plan = lookup(L_SPEC, FAKE_GPU, path, shipped=False)
    for result in served:  # whatever survives validation is well-formed
        assert result.median_ms > 0 and np.isfinite(result.median_ms) and 0 <= result.rel_error < 1e-4
        assert isinstance(result.trials, int) and result.trials >= 0
        assert result.default_ms is None or (result.default_ms > 0 and np.isfinite(result.default_ms))
        assert all(isinstance(v, int) for v in result.params.values())
    assert isinstance(plan, Plan) and plan.params.get("MWG", 8) in (8, 16, 32, 64, 128)


def test_a_layer_whose_time_share_ran_out_gets_every_algorithms_default(tmp_path):
    """The last layer of a time budget that earlier layers used up: every tunable algorithm's
    default is still measured, so the layer never ends with "0 trials, best direct"."""
    from autoconv.tuning.tuner import tunable

    with SQLiteStore(tmp_path / "late.db") as db:
        report = tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=None, deadline=time.monotonic() - 1.0)
        tunables = [name for name in report.bests if tunable(name)]
        assert tunables and report.trials == len(tunables), report
        assert all(report.trials_by_algorithm.get(name) == 1 for name in tunables)
    assert lookup(L_SPEC, FAKE_GPU, tmp_path / "late.db").algorithm != DIRECT


def test_a_cut_short_tuning_with_an_unsteady_baseline_is_not_served_direct_loops(tmp_path):
    """The reported scenario: the budget ran out on the last layer and its BLAS measurement was
    unsteady. The baseline is stored flagged, the defaults are measured, direct is not served."""
    db_path = tmp_path / "sq.db"
    with SQLiteStore(db_path) as db, pytest.warns(RuntimeWarning, match="flagged as unsteady"):
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(baseline_ms=1.2, baseline_spread=0.13), db, trials=None,
                   deadline=time.monotonic() - 1.0)
    plan = lookup(L_SPEC, FAKE_GPU, db_path)
    assert plan.algorithm != DIRECT and plan.source == "tuned", plan


def test_db_list_says_a_tuning_is_incomplete_or_unsteady(tmp_path):
    db_path = tmp_path / "notes.db"
    with SQLiteStore(db_path) as db:
        db.record_device(FAKE_GPU)
        for spec, algorithm, spread in ((L_SPEC, DIRECT, 0.01), (L_SPEC.replace(k=8), IM2COL_BLAS, 0.4)):
            db.save_result(TunedResult(device=FAKE_GPU.fingerprint(), spec=spec, algorithm=algorithm,
                                       template_hash=template_hash(), params=get_algorithm(algorithm).space.validate({}),
                                       median_ms=5.0, gflops=1.0, rel_error=1e-6, default_ms=None, trials=1,
                                       spread=spread, repeats=7))
    listed = json.loads(cli("db", "list", "--db", str(db_path), "--json").output)
    notes = {r["algorithm"]: (r["note"], r["served"]) for r in listed}
    assert notes[DIRECT][0].startswith("tuning incomplete") and not notes[DIRECT][1]
    assert notes[IM2COL_BLAS] == ("unsteady (busy cores?)", True)


def test_explain_says_a_tuning_is_incomplete(opencl, tmp_path):
    db_path = tmp_path / "direct-only.db"
    with SQLiteStore(db_path) as db:
        db.record_device(opencl.device)
        db.save_result(TunedResult(device=opencl.device.fingerprint(), spec=L_SPEC, algorithm=DIRECT,
                                   template_hash=template_hash(), params=get_algorithm(DIRECT).space.validate({}),
                                   median_ms=5.0, gflops=1.0, rel_error=1e-6, default_ms=None, trials=1))
    result = cli("explain", L, "--db", str(db_path), "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "tuning here is incomplete (only direct measured" in result.output.replace("\n", " ")


def test_a_run_killed_after_the_references_is_not_served_direct_loops(tmp_path):
    """Killed (Ctrl-C) before any tunable algorithm was measured, with the baseline unsteady: what
    is stored still beats serving the reference loops by default."""
    class KilledAtTheFirstDefault(FakeEvaluator):
        def __call__(self, algorithm, params, bound_ms=None):
            if algorithm not in (DIRECT, IM2COL_BLAS):
                raise KeyboardInterrupt
            return super().__call__(algorithm, params)

    db_path = tmp_path / "killed.db"
    with SQLiteStore(db_path) as db, pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning):
        tune_layer(L_SPEC, FAKE_GPU, KilledAtTheFirstDefault(baseline_ms=1.2, baseline_spread=0.5), db, trials=10)
    assert lookup(L_SPEC, FAKE_GPU, db_path).algorithm == IM2COL_BLAS


@pytest.mark.parametrize("args", [("tune", L, "--trials", "0"), ("tune", L, "--time-budget", "x"), ("nosuch",),
                                  ("db", "nosuch"), ("run", L, "--repeats", "0"), ("tune", L, "--jobs", "zero")])
def test_usage_errors_are_one_line_without_a_usage_block(args):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Usage:" not in result.output, result.output


def test_db_list_and_db_show_say_the_same_about_one_database(tmp_path):
    """One row per config in db show (re-timed configs included), the served one marked, with the
    stored time db list serves."""
    db_path = tmp_path / "same.db"
    with SQLiteStore(db_path) as db:
        tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), db, trials=12)
    listed = json.loads(cli("db", "list", "--db", str(db_path), "--json").output)
    shown = json.loads(cli("db", "show", L, "--db", str(db_path), "--json", "--top", "50").output)
    for algorithm in {r["algorithm"] for r in listed}:
        rows = [r for r in shown if r["algorithm"] == algorithm]
        configs = [json.dumps(r["params"], sort_keys=True) for r in rows]
        assert len(configs) == len(set(configs)), f"{algorithm}: a config listed twice"
        (served,) = [r for r in rows if r["best"]]
        (stored,) = [r for r in listed if r["algorithm"] == algorithm]
        assert served["ms"] == stored["ms"] and served["params"] == stored["params"]
        assert sum(r["measured"] for r in rows) >= len(rows)


def test_a_time_budget_gives_every_layer_its_defaults_before_any_search(opencl, tmp_path):
    """Three layers, a budget too small for any search: every layer still ends with each tunable
    algorithm's default measured (the defaults pass runs over all layers first), never 0 trials."""
    from autoconv.tuning.tuner import tune_layers

    layers = [(f"l{k}", ConvSpec(1, 4, 6, 6, k, 3, 3, padding=1)) for k in (4, 8, 12)]
    passes = []
    with SQLiteStore(tmp_path / "budget.db") as db:
        reports = tune_layers(layers, opencl, db, trials=None, time_budget_s=0.01, repeats=1, warm_start=False,
                              on_defaults=lambda done, total: passes.append((done, total)))
        for report in reports:
            tunables = {a for a in report.trials_by_algorithm if tunable(a)}
            assert tunables and report.trials >= len(tunables), report
            assert lookup(report.spec, opencl.device, tmp_path / "budget.db").source == "tuned"
    assert passes == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_a_models_time_budget_tunes_the_layers_with_the_largest_stake_first(opencl, tmp_path):
    """With counts (tune --onnx/--model), the layers are tuned in order of count x measured time:
    the small layer that occurs 50 times goes before the larger one that occurs once."""
    from autoconv.tuning.tuner import tune_layers

    large, small = ConvSpec(1, 16, 12, 12, 16, 3, 3, padding=1), ConvSpec(1, 4, 6, 6, 4, 1, 1)
    estimates: list[float] = []
    with SQLiteStore(tmp_path / "model.db") as db:
        reports = tune_layers([("large", large), ("small", small)], opencl, db, trials=None, time_budget_s=0.01,
                              repeats=1, warm_start=False, counts=[1, 50], on_estimate=estimates.append)
    assert [r.label for r in reports] == ["small", "large"]
    # The model's estimate after the defaults, then after each layer: count x best time, summed.
    assert len(estimates) == 3 and all(ms > 0 for ms in estimates)
    best = {r.label: r.best.median_ms for r in reports}
    assert estimates[-1] == pytest.approx(1 * best["large"] + 50 * best["small"])
    with SQLiteStore(tmp_path / "even.db") as db, pytest.raises(ValueError, match="counts: expected one per layer"):
        tune_layers([("large", large), ("small", small)], opencl, db, trials=None, time_budget_s=0.01, repeats=1,
                    warm_start=False, counts=[1])
