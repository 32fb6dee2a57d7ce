"""The tuner loop without timing noise (a fake evaluator), end to end on PoCL with a tiny budget,
and resuming after a real killed run."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autoconv import ConvSpec
from autoconv.backends.base import DeviceInfo
from autoconv.lookup import lookup
from autoconv.plan import heuristic_gemm_params
from autoconv.render import template_hash
from autoconv.tuner import DeviceEvaluator, Outcome, canonical, journal_path, study_name, tune_layer
from autoconv.tuning_db import TuningDB

# A small GPU-like device: many sampled configs break its limits and must never reach the evaluator.
SMALL_GPU = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU", "1.0", "gpu", 8, 16384, 64, (64, 64, 64))
SPEC = ConvSpec(1, 64, 28, 28, 64, 3, 3, padding=1)


class FakeEvaluator:
    """Deterministic 'times' with a known optimum; some configs fail the way real ones do."""

    def __init__(self, device=SMALL_GPU):
        self.device = device
        self.measured = []

    def __call__(self, params):
        assert not params.violations(self.device.limits()), "an invalid config reached the evaluator"
        self.measured.append(params)
        return self.outcome(params)

    @staticmethod
    def outcome(params):
        if params.KWG == 32 and params.UNROLL == 8:
            return Outcome("compile_failed", float("inf"), float("inf"), "error: too much unrolling")
        if params.B_TRANSPOSED and params.VWN == 4:
            return Outcome("wrong_result", float("inf"), 0.5, "relative error 5e-01")
        ms = 1.0 + abs(params.MWG - 32) / 32 + abs(params.NWG - 64) / 64 + 0.3 * (params.KWG != 16) + 0.2 * params.PADA
        return Outcome("ok", ms, 1e-6)

    def baseline(self):
        return "fake BLAS", 1.5


@pytest.fixture
def db(tmp_path):
    with TuningDB(tmp_path / "t.db") as database:
        yield database


def test_default_first_invalid_never_measured_failures_recorded_best_saved(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=30)
    assert report.trials == 30 and report.skipped_invalid > 0
    assert fake.measured[0] == canonical(heuristic_gemm_params(SPEC, "gpu", SMALL_GPU.limits()))
    assert len(set(fake.measured)) == len(fake.measured), "a config was measured twice"
    rows = list(db.measurements(SMALL_GPU.fingerprint(), SPEC))
    assert len(rows) == len(fake.measured) == report.measured_now
    statuses = {row["status"] for row in rows}
    assert "ok" in statuses
    assert sum(report.failures.values()) == sum(1 for row in rows if row["status"] != "ok")
    best_ok = min(fake.outcome(p).median_ms for p in fake.measured if fake.outcome(p).ok)
    assert report.best.median_ms == best_ok and report.best.baseline_ms == 1.5
    assert report.best.default_ms == fake.outcome(fake.measured[0]).median_ms
    assert lookup(SPEC, SMALL_GPU, db.path).gemm == report.best.params


def test_a_second_run_resumes_the_study_instead_of_restarting(db):
    first = FakeEvaluator()
    tune_layer(SPEC, SMALL_GPU, first, db, trials=12)
    second = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, second, db, trials=20)
    assert report.resumed and report.trials == 20
    assert len(second.measured) <= 8 and not set(second.measured) & set(first.measured)
    again = FakeEvaluator()
    assert tune_layer(SPEC, SMALL_GPU, again, db, trials=20).trials == 20 and again.measured == []


def test_a_trial_left_running_by_a_killed_run_is_failed_not_retried(db):
    from autoconv.tuner import _storage

    tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=3)
    storage = _storage(db.path)
    study = optuna.load_study(study_name=study_name(SMALL_GPU, SPEC, "im2col_gemm", template_hash()), storage=storage)
    study.ask()  # what a process killed mid-measurement leaves behind
    report = tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=5, storage=storage)
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states and report.trials == 5


def test_a_time_budget_already_spent_measures_nothing(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=None, deadline=time.monotonic() - 1)
    assert report.trials == 0 and fake.measured == []


def test_end_to_end_on_pocl(opencl, tmp_path):
    spec = ConvSpec(1, 8, 12, 12, 16, 3, 3, padding=1)
    with TuningDB(tmp_path / "e2e.db") as database:
        report = tune_layer(spec, opencl.device, DeviceEvaluator(opencl, spec, repeats=2), database, trials=4)
    assert report.trials == 4 and report.best is not None and report.best.verified
    assert report.best.rel_error < 1e-4 and report.best.baseline == "numpy BLAS" and report.best.baseline_ms > 0
    plan = lookup(spec, opencl, tmp_path / "e2e.db", allow_baseline=False)
    assert plan.source == "tuned" and plan.gemm == report.best.params


def _count(db_path):
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            return conn.execute("select count(*) from measurements").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_tuning_run_resumes_and_loses_nothing(opencl, tmp_path):
    db_path = tmp_path / "kill.db"
    layer = "n=1,c=8,h=10,w=10,k=8,r=3,s=3,pad=1"
    command = [sys.executable, "-m", "autoconv.cli", "tune", "--layer", layer, "--trials", "12",
               "--repeats", "2", "--db", str(db_path)]
    env = {**os.environ, "AUTOCONV_SHIPPED_DB_DIR": ""}
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count(db_path) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    measured_before = _count(db_path)
    assert 3 <= measured_before < 12, "the run was not killed mid-way"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal_path(db_path))))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    measured_after = _count(db_path)
    # Nothing measured before the kill was lost, and the second run did only what was left.
    assert measured_before <= measured_after <= 12 + 1
    with TuningDB(db_path, readonly=True) as database:
        (best,) = database.results()
    assert best.trials == 12 and best.verified
