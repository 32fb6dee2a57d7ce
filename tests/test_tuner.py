"""The tuner loop without timing noise (a fake evaluator): defaults first, the budget to the
algorithms within 2x of the best, invalid configs never measured; end to end on PoCL with a tiny
budget, and resuming after a real killed run."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autoconv import ConvSpec, get_algorithm, list_algorithms, lookup
from autoconv.algorithms import DIRECT, IM2COL_BLAS, IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD
from autoconv.device import DeviceInfo
from autoconv.render import template_hash
from autoconv.store import SQLiteStore
from autoconv.tuning.study import journal_path, journal_storage, study_name
from autoconv.tuning.tuner import DeviceEvaluator, Outcome, tune_layer

# A small GPU-like device: many sampled configs break its limits and must never reach the evaluator.
SMALL_GPU = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU", "1.0", "gpu", 8, 16384, 64, (64, 64, 64))
SPEC = ConvSpec(1, 64, 28, 28, 64, 3, 3, padding=1)
ALL = (IM2COL_GEMM, IMPLICIT_GEMM, DIRECT, IM2COL_BLAS)


def default_of(algorithm, device=SMALL_GPU, spec=SPEC):
    algo = get_algorithm(algorithm)
    return algo.space.canonical(algo.heuristic(spec, device))


class FakeEvaluator:
    """Deterministic 'times' with a known optimum per algorithm; some configs fail as real ones do."""

    def __init__(self, device=SMALL_GPU, algorithms=ALL, scale=None):
        self.device = device
        self.algorithms = algorithms
        self.scale = scale or {IM2COL_GEMM: 1.0, IMPLICIT_GEMM: 0.9, DIRECT: 20.0, IM2COL_BLAS: 1.5}
        self.measured = []

    def __call__(self, algorithm, params):
        assert not params.violations(self.device.limits()), "an invalid config reached the evaluator"
        self.measured.append((algorithm, params))
        return self.outcome(algorithm, params)

    def outcome(self, algorithm, params):
        if not params:
            return Outcome("ok", self.scale[algorithm], 1e-6, spread=0.01, repeats=7)
        if params.KWG == 32 and params.UNROLL == 8:
            return Outcome("compile_failed", float("inf"), float("inf"), "error: too much unrolling")
        if params.VWN == 4 and params.MWG == 8:
            return Outcome("wrong_result", float("inf"), 0.5, "relative error 5e-01")
        ms = 1.0 + abs(params.MWG - 32) / 32 + abs(params.NWG - 64) / 64 + 0.3 * (params.KWG != 16) + 0.2 * params.PADA
        return Outcome("ok", ms * self.scale[algorithm], 1e-6, spread=0.02, repeats=7)


@pytest.fixture
def db(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as database:
        yield database


def test_defaults_first_invalid_never_measured_failures_recorded_bests_saved(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=30)
    assert report.trials == 30 and report.skipped_invalid > 0
    # Untunable algorithms once, then each tunable algorithm's default before anything else.
    assert [a for a, _ in fake.measured[:2]] == [DIRECT, IM2COL_BLAS]
    assert fake.measured[2] == (IM2COL_GEMM, default_of(IM2COL_GEMM))
    assert fake.measured[3] == (IMPLICIT_GEMM, default_of(IMPLICIT_GEMM))
    assert len(set(fake.measured)) == len(fake.measured), "a config was measured twice"
    rows = list(db.measurements(SMALL_GPU.fingerprint(), SPEC))
    assert len(rows) == len(fake.measured) == report.measured_now
    assert sum(report.failures.values()) == sum(1 for row in rows if row["status"] != "ok")
    for algorithm in ALL:
        best_ok = min(fake.outcome(a, p).median_ms for a, p in fake.measured if a == algorithm and fake.outcome(a, p).ok)
        assert report.bests[algorithm].median_ms == best_ok
    # Direct loops are 20x slower than the best: no trial goes to them, and they have none to take.
    assert set(report.trials_by_algorithm) == {IM2COL_GEMM, IMPLICIT_GEMM}
    assert report.best.algorithm == IMPLICIT_GEMM and report.baseline.median_ms == 1.5
    assert report.bests[IM2COL_GEMM].default_ms == fake.outcome(IM2COL_GEMM, default_of(IM2COL_GEMM)).median_ms
    plan = lookup(SPEC, SMALL_GPU, db.path)
    assert plan.algorithm == IMPLICIT_GEMM and plan.params == report.best.params


def test_the_budget_goes_only_to_algorithms_within_2x_of_the_best(db):
    fake = FakeEvaluator(scale={IM2COL_GEMM: 1.0, IMPLICIT_GEMM: 10.0, DIRECT: 50.0, IM2COL_BLAS: 1.5})
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=20)
    assert report.trials_by_algorithm[IMPLICIT_GEMM] == 1  # its default only: 10x slower than the baseline
    assert report.trials_by_algorithm[IM2COL_GEMM] == 19
    assert report.best.algorithm == IM2COL_BLAS


def test_the_budget_is_shared_in_turn_between_close_algorithms(db):
    fake = FakeEvaluator(scale={IM2COL_GEMM: 1.0, IMPLICIT_GEMM: 1.05, DIRECT: 50.0, IM2COL_BLAS: 3.0})
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=20)
    assert abs(report.trials_by_algorithm[IM2COL_GEMM] - report.trials_by_algorithm[IMPLICIT_GEMM]) <= 1


def test_a_second_run_resumes_the_studies_instead_of_restarting(db):
    first = FakeEvaluator()
    tune_layer(SPEC, SMALL_GPU, first, db, trials=12)
    second = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, second, db, trials=20)
    assert report.resumed and report.trials == 20
    tuned_again = [m for m in second.measured if get_algorithm(m[0]).space.params]
    assert len(tuned_again) <= 8 and not set(tuned_again) & set(first.measured)
    again = FakeEvaluator()
    assert tune_layer(SPEC, SMALL_GPU, again, db, trials=20).trials == 20
    assert [a for a, _ in again.measured] == [DIRECT, IM2COL_BLAS]  # re-measured afresh each run, nothing else


def test_a_trial_left_running_by_a_killed_run_is_failed_not_retried(db):
    tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=3)
    storage = journal_storage(db.path)
    study = optuna.load_study(study_name=study_name(SMALL_GPU, SPEC, IM2COL_GEMM, template_hash()), storage=storage)
    study.ask()  # what a process killed mid-measurement leaves behind (no owner recorded)
    report = tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=5, storage=storage)
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states and report.trials == 5


def test_a_time_budget_already_spent_measures_only_the_untuned_references(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=None, deadline=time.monotonic() - 1)
    assert report.trials == 0 and [a for a, _ in fake.measured] == [DIRECT, IM2COL_BLAS]


def test_only_the_chosen_algorithms_are_tuned(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=6, algorithms=(IMPLICIT_GEMM,))
    assert {a for a, _ in fake.measured} == {IMPLICIT_GEMM} and set(report.bests) == {IMPLICIT_GEMM}


def test_end_to_end_on_pocl(opencl, tmp_path):
    spec = ConvSpec(1, 8, 12, 12, 16, 3, 3, padding=1)
    with SQLiteStore(tmp_path / "e2e.db") as database:
        report = tune_layer(spec, opencl.device, DeviceEvaluator(opencl, spec, repeats=2), database, trials=4)
    # The untuned references are stored only when their timing was steady (a busy machine may not be).
    # Every registered algorithm that supports a 3x3 stride-1 layer is tuned: Winograd included.
    assert report.trials == 4 and {IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD} <= set(report.bests) <= set(list_algorithms())
    assert report.unsupported == {}
    for result in report.bests.values():
        assert result.verified and result.rel_error < 1e-4 and result.median_ms > 0
    plan = lookup(spec, opencl, tmp_path / "e2e.db", generated_only=True)
    assert plan.source == "tuned" and plan.params == report.best_generated.params


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
    complete = [t for summary in optuna.get_all_study_summaries(storage)
                for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
                if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    measured_after = _count(db_path)
    # Nothing measured before the kill was lost, and the second run did only what was left (plus
    # the untuned references, measured afresh by every run, and the trial the kill interrupted).
    assert measured_before <= measured_after <= 12 + 2 * 2 + 1
    with SQLiteStore(db_path, readonly=True) as database:
        results = database.results()
    assert sum(r.trials for r in results if get_algorithm(r.algorithm).space.params) == 12
    assert all(r.verified for r in results)
