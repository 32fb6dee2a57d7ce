"""The tuner loop without timing noise (a fake evaluator): defaults first, the budget to the
algorithms within 2x of the best, invalid configs never measured; end to end on PoCL with a tiny
budget, and resuming after a real killed run."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autoconv import ConvSpec, get_algorithm, list_algorithms, lookup
from autoconv.algorithms import DEPTHWISE_DIRECT, DIRECT, IM2COL_BLAS, IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD
from autoconv.device import DeviceInfo
from autoconv.render import template_hash
from autoconv.store import SQLiteStore
from autoconv.tuning.study import journal_path, journal_storage, study_name
from autoconv.store import TunedResult
from autoconv.tuning.tuner import (
    EARLY_STOP_GAIN,
    EARLY_STOP_TRIALS,
    RETIME_ROUNDS,
    RETIME_TOP,
    DeviceEvaluator,
    Outcome,
    tunable,
    tune_layer,
)
from autoconv.serve.lookup import DatabaseContents
from autoconv.serve.session import read_contents

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

    def __call__(self, algorithm, params, bound_ms=None):
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
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=30, early_stop=None, retime=False)
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
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=20, early_stop=None, retime=False)
    assert report.trials_by_algorithm[IMPLICIT_GEMM] == 1  # its default only: 10x slower than the baseline
    assert report.trials_by_algorithm[IM2COL_GEMM] == 19
    assert report.best.algorithm == IM2COL_BLAS


def test_the_budget_is_shared_in_turn_between_close_algorithms(db):
    fake = FakeEvaluator(scale={IM2COL_GEMM: 1.0, IMPLICIT_GEMM: 1.05, DIRECT: 50.0, IM2COL_BLAS: 3.0})
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=20, early_stop=None)
    assert abs(report.trials_by_algorithm[IM2COL_GEMM] - report.trials_by_algorithm[IMPLICIT_GEMM]) <= 1


def test_a_second_run_resumes_the_studies_instead_of_restarting(db):
    first = FakeEvaluator()
    tune_layer(SPEC, SMALL_GPU, first, db, trials=12, retime=False)
    second = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, second, db, trials=20, early_stop=None, retime=False)
    assert report.resumed and report.trials == 20
    tuned_again = [m for m in second.measured if get_algorithm(m[0]).space.params]
    assert len(tuned_again) <= 8 and not set(tuned_again) & set(first.measured)
    again = FakeEvaluator()
    assert tune_layer(SPEC, SMALL_GPU, again, db, trials=20, early_stop=None, retime=False).trials == 20
    assert [a for a, _ in again.measured] == [DIRECT, IM2COL_BLAS]  # re-measured afresh each run, nothing else


def test_a_trial_left_running_by_a_killed_run_is_failed_not_retried(db, monkeypatch):
    # Without an owner a trial may be another worker's being asked: dead only after a grace period.
    monkeypatch.setattr("autoconv.tuning.study.OWNERLESS_GRACE_S", 0.0)
    tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=3)
    storage = journal_storage(db.path)
    study = optuna.load_study(study_name=study_name(SMALL_GPU, SPEC, IM2COL_GEMM, template_hash()), storage=storage)
    study.ask()  # what a process killed mid-measurement leaves behind (no owner recorded)
    report = tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=5, storage=storage)
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states and report.trials == 5


def test_a_time_budget_already_spent_measures_the_references_and_every_default(db):
    """Never "0 trials, best direct": each tunable algorithm's default is measured past the deadline."""
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=None, deadline=time.monotonic() - 1, retime=False)
    measured = [a for a, _ in fake.measured]
    assert measured[:2] == [DIRECT, IM2COL_BLAS] and len(measured) == 2 + report.trials
    assert report.trials == len(set(measured[2:])) >= 2  # one default each, nothing searched


def test_only_the_chosen_algorithms_are_tuned(db):
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=6, algorithms=(IMPLICIT_GEMM,), retime=False)
    assert {a for a, _ in fake.measured} == {IMPLICIT_GEMM} and set(report.bests) == {IMPLICIT_GEMM}


def test_end_to_end_on_pocl(opencl, tmp_path):
    spec = ConvSpec(1, 8, 12, 12, 16, 3, 3, padding=1)
    with SQLiteStore(tmp_path / "e2e.db") as database:
        report = tune_layer(spec, opencl.device, DeviceEvaluator(opencl, spec, repeats=2), database, trials=4)
    # The untuned references are stored only when their timing was steady (a busy machine may not be).
    # Every registered algorithm that supports a 3x3 stride-1 layer is tuned: Winograd included.
    # Each tunable algorithm's default is measured; the 4th trial is given only when one of them
    # is within 2x of the fastest method (on a tiny layer the host BLAS may be far ahead).
    assert report.trials in (3, 4) and {IM2COL_GEMM, IMPLICIT_GEMM, WINOGRAD} <= set(report.bests) <= set(list_algorithms())
    assert set(report.unsupported) == {DEPTHWISE_DIRECT}  # a dense layer: the depthwise one says why
    assert "depthwise layers only" in report.unsupported[DEPTHWISE_DIRECT]
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
    # Tunable algorithms only: with a much faster baseline beside them the budget could end early
    # (no algorithm within 2x), and the count below would depend on the machine's timings.
    command = [sys.executable, "-m", "autoconv.cli", "tune", "--layer", layer, "--trials", "12",
               "--repeats", "2", "--algorithm", "im2col_gemm", "--algorithm", "implicit_gemm", "--db", str(db_path)]
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
    # the untuned references, measured afresh by every run, the trial the kill interrupted, and
    # the re-timing of each tunable algorithm's top configs at the end).
    retimed = len([a for a in list_algorithms() if get_algorithm(a).space.params]) * RETIME_ROUNDS * (RETIME_TOP + 1)
    assert measured_before <= measured_after <= 12 + 2 * 2 + 1 + retimed
    with SQLiteStore(db_path, readonly=True) as database:
        results = database.results()
    assert sum(r.trials for r in results if get_algorithm(r.algorithm).space.params) == 12
    assert all(r.verified for r in results)


class FlatEvaluator(FakeEvaluator):
    """Every config of a tunable algorithm takes the same time: nothing left to gain."""

    def outcome(self, algorithm, params):
        return Outcome("ok", self.scale[algorithm], 1e-6, spread=0.01, repeats=7)


def test_a_stalled_layer_stops_early_and_gives_back_its_budget(db):
    budget = 3 * (EARLY_STOP_TRIALS + 1)
    report = tune_layer(SPEC, SMALL_GPU, FlatEvaluator(), db, trials=budget,
                        early_stop=(EARLY_STOP_TRIALS, EARLY_STOP_GAIN))
    # Each tunable algorithm: its default, then EARLY_STOP_TRIALS trials without the minimum gain.
    assert report.trials_by_algorithm == {IM2COL_GEMM: EARLY_STOP_TRIALS + 1, IMPLICIT_GEMM: EARLY_STOP_TRIALS + 1}
    assert report.trials == 2 * (EARLY_STOP_TRIALS + 1) < budget


def test_an_improving_study_is_not_stopped(db):
    # FakeEvaluator's times depend on the tiles: TPE keeps finding better ones early on.
    report = tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=12, early_stop=(EARLY_STOP_TRIALS, EARLY_STOP_GAIN))
    assert report.trials == 12


def test_warm_start_seeds_a_new_study_with_the_winners_of_similar_layers(tmp_path):
    neighbour = ConvSpec(1, 64, 56, 56, 64, 3, 3, padding=1)  # same family as SPEC, another size
    peer = DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 2", "1.0", "gpu", 8, 16384, 64, (64, 64, 64))
    with SQLiteStore(tmp_path / "w.db") as database:
        tune_layer(neighbour, SMALL_GPU, FakeEvaluator(), database, trials=10, early_stop=None)
        won_nearby = database.results(device=SMALL_GPU.fingerprint())
        peer_params = get_algorithm(IM2COL_GEMM).space.validate(dict(MWG=16, NWG=32, WPTM=4, WPTN=4, KWG=8))
        database.record_device(peer)
        database.record_layer(SPEC)
        database.save_result(TunedResult(device=peer.fingerprint(), spec=SPEC, algorithm=IM2COL_GEMM,
                                         template_hash=template_hash(), params=peer_params, median_ms=0.5, gflops=1.0,
                                         rel_error=1e-6, default_ms=None, trials=5))
        records = [read_contents(database.path)]
        fake = FakeEvaluator()
        report = tune_layer(SPEC, SMALL_GPU, fake, database, trials=8, records=records, early_stop=None, retime=False)
    nearby = {(r.algorithm, r.params) for r in won_nearby
              if get_algorithm(r.algorithm).space.params and r.params != default_of(r.algorithm)}
    first_trials = fake.measured[2:2 + 2 + len(nearby) + 1]  # after the untunables and the two defaults
    assert nearby <= set(first_trials) and (IM2COL_GEMM, peer_params) in first_trials
    assert report.seeded == len(nearby) + 1


def test_warm_start_skips_configs_invalid_here():
    from autoconv.tuning.warm_start import warm_start_configs

    big_gpu = DeviceInfo("opencl", "Fake CL", "fakevendor", "Big GPU", "1.0", "gpu", 80, 65536, 1024, (1024, 1024, 64))
    huge = get_algorithm(IM2COL_GEMM).space.validate(dict(MWG=64, NWG=64, WPTM=4, WPTN=4))  # 256 work-items
    neighbour = ConvSpec(1, 64, 14, 14, 64, 3, 3, padding=1)
    records = [DatabaseContents((TunedResult(device=SMALL_GPU.fingerprint(), spec=neighbour, algorithm=IM2COL_GEMM,
                                         template_hash="t", params=huge, median_ms=0.5, gflops=1.0, rel_error=1e-6,
                                         default_ms=None, trials=5),), {})]
    assert huge.violations(SMALL_GPU.limits()) and not huge.violations(big_gpu.limits())
    assert warm_start_configs(records, SMALL_GPU, SPEC, IM2COL_GEMM, default_of(IM2COL_GEMM)) == []


def test_blas_threads_are_held_while_each_kind_of_method_is_timed(opencl, monkeypatch):
    """One BLAS thread while a device kernel is timed, every core while the host BLAS is."""
    from threadpoolctl import threadpool_info

    from autoconv.backends.launch import LaunchedConv
    from autoconv.backends.numpy_backend import NumpyConv

    seen = {}

    def spy(kind, original):
        def timed(self, *args, **kwargs):
            seen[kind] = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
            return original(self, *args, **kwargs)
        return timed

    monkeypatch.setattr(LaunchedConv, "time", spy("device", LaunchedConv.time))
    monkeypatch.setattr(NumpyConv, "time", spy("host", NumpyConv.time))
    spec = ConvSpec(1, 4, 8, 8, 4, 3, 3, padding=1)
    evaluate = DeviceEvaluator(opencl, spec, repeats=2)
    assert evaluate(IM2COL_GEMM, default_of(IM2COL_GEMM, opencl.device, spec)).ok
    assert evaluate(IM2COL_BLAS, get_algorithm(IM2COL_BLAS).space.validate({})).ok
    if not seen.get("host"):
        pytest.skip("numpy's BLAS exposes no thread pool here")
    assert set(seen["device"]) == {1} and set(seen["host"]) == {os.cpu_count()}


class NoisyEvaluator(FakeEvaluator):
    """FakeEvaluator's times with seeded noise of about +-15%: the default and the best candidates
    are then within noise of each other unless one is much faster."""

    def __init__(self, faster: float, **kwargs):
        super().__init__(**kwargs)
        self.faster = faster  # how much faster than the default the optimum is
        self.rng = __import__("random").Random(7)

    def outcome(self, algorithm, params):
        base = super().outcome(algorithm, params)
        if not base.ok or not params:
            return base
        default = super().outcome(algorithm, default_of(algorithm)).median_ms
        ms = default if params == default_of(algorithm) else default / self.faster
        return Outcome("ok", ms * self.rng.uniform(0.85, 1.15), 1e-6, spread=0.1, repeats=7)


def test_winner_rule_keeps_the_default_within_noise_and_takes_a_clear_win():
    from autoconv.tuning.tuner import winner_beyond_noise

    default, close, clear = (default_of(IM2COL_GEMM).replace(MWG=m) for m in (16, 32, 64))
    within_noise = {default: [1.00, 1.10, 0.92], close: [0.95, 1.04, 0.97]}
    assert winner_beyond_noise(within_noise, default) == default
    clear_win = {default: [1.00, 1.10, 0.92], close: [0.95, 1.04, 0.97], clear: [0.50, 0.55, 0.52]}
    assert winner_beyond_noise(clear_win, default) == clear
    assert winner_beyond_noise({default: [], clear: [0.5]}, default) == default


@pytest.mark.parametrize(("faster", "default_kept"), [(1.02, True), (2.0, False)])
def test_retiming_at_the_end_of_a_layer_decides_beyond_the_noise(db, faster, default_kept):
    fake = NoisyEvaluator(faster, scale={IM2COL_GEMM: 1.0, IMPLICIT_GEMM: 5.0, DIRECT: 50.0, IM2COL_BLAS: 9.0})
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=10, early_stop=None)
    kept, configs = report.retimed[IM2COL_GEMM]
    assert kept is default_kept and configs >= 2
    stored = report.bests[IM2COL_GEMM]
    assert (stored.params == default_of(IM2COL_GEMM)) is default_kept
    assert IMPLICIT_GEMM not in report.retimed  # 5x slower: not a contender for serving


# A time budget that follows the model (issue 25, item 3) -----------------------------------------

def test_the_budget_goes_to_the_layers_where_the_models_time_is():
    from autoconv.tuning.tuner import ModelBudget

    # Three layers: 1 ms once, 0.5 ms four times, 3 ms once: stakes 1, 2 and 3.
    budget = ModelBudget([1, 4, 1], [1.0, 0.5, 3.0])
    assert budget.order == [2, 1, 0]  # the largest stake first
    assert budget.share_s(0, 60.0) == pytest.approx(30.0)  # 3 of 6
    # The first layer stopped after 10 s (its search stalled): the 50 s left go 2:1.
    assert budget.share_s(1, 50.0) == pytest.approx(50.0 * 2 / 3)
    assert budget.share_s(2, 5.0) == pytest.approx(5.0)  # the last one takes what is left
    # A layer not measured yet counts the median of the others' times.
    unknown = ModelBudget([2, 1, 1], [None, 1.0, 3.0])
    assert unknown.stakes == [6.0, 1.0, 3.0] and unknown.order == [0, 2, 1]
    with pytest.raises(ValueError, match="one of each per layer"):
        ModelBudget([1], [1.0, 2.0])


def test_the_models_estimate_is_count_times_best_time_over_its_measured_layers():
    from autoconv.tuning.tuner import model_estimate_ms

    assert model_estimate_ms([1, 4, 2], [1.0, 0.5, 3.0]) == pytest.approx(9.0)
    assert model_estimate_ms([1, 4], [None, 0.5]) == pytest.approx(2.0)  # not measured yet: nothing


def test_tune_onnx_defaults_to_a_time_budget_that_counts_each_layer(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from typer.testing import CliRunner

    from autoconv.cli import app
    from autoconv.cli.main import FINISH_RESERVE_S
    from autoconv.tuning import tuner

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("w1", (8, 8, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (16, 8, 1, 1)))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1, 1, 1, 1]),  # the same layer again
             helper.make_node("Conv", ["b", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    path = tmp_path / "three.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    asked = {}

    def fake_tune_layers(layers, backend, db, **options):
        asked.update(options, layers=layers)
        return []

    monkeypatch.setattr(tuner, "tune_layers", fake_tune_layers)
    result = CliRunner().invoke(app, ["tune", "--onnx", str(path), "--db", str(tmp_path / "t.db"), "--layouts", "NCHW"])
    assert result.exit_code == 0, result.output
    # The budget is the command's wall time: what start-up took, and a reserve for the end, come off it.
    assert asked["trials"] is None and 280.0 < asked["time_budget_s"] <= 300.0 - FINISH_RESERVE_S
    counts = {spec.r: count for (_, spec), count in zip(asked["layers"], asked["counts"])}
    assert counts == {3: 2, 1: 1}
    # The cost model and racing are on by default; TPE samples.
    assert (asked["cost_model"], asked["racing"], asked["sampler"]) == (True, True, "tpe")
    # A list of layers keeps 60 trials each and no counts.
    result = CliRunner().invoke(app, ["tune", "n=1,c=8,h=6,w=6,k=8,r=3,s=3,pad=1", "--db", str(tmp_path / "t.db"),
                                      "--no-cost-model", "--no-racing", "--sampler", "random"])
    assert result.exit_code == 0, result.output
    assert asked["trials"] == 60 and asked["time_budget_s"] is None and asked["counts"] is None
    assert (asked["cost_model"], asked["racing"], asked["sampler"]) == (False, False, "random")
    result = CliRunner().invoke(app, ["tune", "n=1,c=8,h=6,w=6,k=8,r=3,s=3,pad=1", "--sampler", "grid"])
    assert result.exit_code == 2 and "expected tpe or random, got 'grid'" in result.output


# Racing, the cost model's picks, one search per convolution -------------------------------------


def test_raced_out_only_when_even_the_fastest_sample_less_the_noise_is_slower_than_the_best():
    from autoconv.tuning.tuner import RACE_NOISE, raced_out

    assert raced_out([1.3, 1.2, 1.25], 0.02, best_ms=1.0)  # 1.2 x (1 - 0.10) = 1.08 > 1.0
    assert not raced_out([1.05, 1.3, 1.4], 0.02, best_ms=1.0)  # 1.05 x 0.9 < 1.0: could still win
    assert not raced_out([1.3, 1.5, 1.4], 0.30, best_ms=1.0)  # a noisy sample: 1.3 x 0.7 < 1.0
    assert raced_out([1.0 / (1 - RACE_NOISE) + 0.01], 0.0, best_ms=1.0)
    assert not raced_out([5.0], 0.0, best_ms=None) and not raced_out([], 0.0, best_ms=1.0)


class RacingFake(FakeEvaluator):
    """Its short sample is the config's true time: raced out by the tuner's rule when asked to race."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bounds = []

    def __call__(self, algorithm, params, bound_ms=None):
        from autoconv.tuning.tuner import raced_out

        self.bounds.append(bound_ms)
        outcome = super().__call__(algorithm, params)
        if outcome.ok and raced_out([outcome.median_ms], 0.0, bound_ms):
            return Outcome("ok", outcome.median_ms, outcome.rel_error, spread=0.0, repeats=3, raced=True)
        return outcome


def test_search_candidates_race_against_the_layers_best_and_the_defaults_never_do(db):
    fake = RacingFake()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=30, early_stop=None, retime=False)
    untunable_and_defaults = 4  # direct, the baseline, then each tunable algorithm's default
    assert fake.bounds[:untunable_and_defaults] == [None] * untunable_and_defaults
    best = float("inf")
    for (algorithm, params), bound in zip(fake.measured, fake.bounds):
        if bound is not None:
            assert bound == best  # the best so far over every algorithm, the baseline included
        outcome = fake.outcome(algorithm, params)
        if outcome.ok:
            best = min(best, outcome.median_ms)
    assert report.raced == sum(1 for (a, p), bound in zip(fake.measured, fake.bounds)
                               if bound is not None and fake.outcome(a, p).ok and fake.outcome(a, p).median_ms * 0.9 > bound)
    assert report.raced > 0
    # Racing changes what is timed fully, never what wins.
    plain = FakeEvaluator()
    with SQLiteStore(db.path.parent / "plain.db") as other:
        unraced = tune_layer(SPEC, SMALL_GPU, plain, other, trials=30, early_stop=None, retime=False, racing=False)
    assert unraced.raced == 0 and unraced.best.median_ms == report.best.median_ms


def test_the_device_evaluator_times_a_raced_out_config_by_its_short_sample_only(opencl):
    from autoconv.tuning.tuner import RACE_REPEATS

    spec = ConvSpec(1, 4, 6, 6, 4, 3, 3, padding=1)
    evaluate = DeviceEvaluator(opencl, spec, repeats=7)
    params = default_of(IM2COL_GEMM, opencl.device, spec)
    raced = evaluate(IM2COL_GEMM, params, bound_ms=1e-9)
    assert raced.ok and raced.raced and raced.repeats == RACE_REPEATS and raced.rel_error < 1e-4
    full = evaluate(IM2COL_GEMM, params, bound_ms=1e9)
    assert full.ok and not full.raced and full.repeats >= 7


class FixedCostModel:
    """Proposes what it is given, in order (what the tuner does with a model's ranking)."""

    def __init__(self, picks):
        self.picks = picks

    def propose(self, spec, device, algorithm, count, *, exclude=(), seed=0):
        return [p for p in self.picks.get(algorithm, []) if p not in exclude][:count]


def test_the_cost_models_picks_are_measured_right_after_each_default(db):
    from autoconv.tuning.cost_model import candidate_pool

    picks = candidate_pool(SPEC, SMALL_GPU, IM2COL_GEMM, exclude=[default_of(IM2COL_GEMM)], size=3, seed=1)
    assert len(picks) == 3
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=12, early_stop=None, retime=False,
                        cost_model=FixedCostModel({IM2COL_GEMM: picks}))
    assert report.ranked == len(picks)
    searched = [p for a, p in fake.measured if a == IM2COL_GEMM]
    assert searched[0] == default_of(IM2COL_GEMM) and searched[1:1 + len(picks)] == picks


def test_one_convolution_with_several_epilogues_is_searched_once():
    from autoconv.tuning.tuner import epilogue_groups

    plain = ConvSpec(1, 8, 6, 6, 8, 1, 1, bias=True)
    specs = [plain, plain.replace(activation="relu", residual=True), ConvSpec(1, 8, 6, 6, 8, 3, 3, padding=1),
             plain.replace(activation="relu")]
    # The residual+relu one counts 3 times: it is searched; the others take its winners.
    searched, variants = epilogue_groups(specs, [1, 3, 1, 1], [1.0, 1.0, 2.0, 1.0])
    assert searched == [1, 2] and variants == {1: [0, 3], 2: []}
    # Without counts (a list of layers, not a model) every layer is searched.
    assert epilogue_groups(specs, None, [None] * 4) == ([0, 1, 2, 3], {0: [], 1: [], 2: [], 3: []})


def test_a_models_epilogue_variant_measures_only_its_defaults_and_the_searched_layers_winners(opencl, tmp_path):
    from autoconv.tuning.tuner import tune_layers

    spec = ConvSpec(1, 8, 6, 6, 8, 3, 3, padding=1, bias=True)
    layers = [("plain", spec), ("relu", spec.replace(activation="relu"))]
    with SQLiteStore(tmp_path / "v.db") as db:
        reports = tune_layers(layers, opencl, db, trials=8, repeats=1, warm_start=False, counts=[1, 2],
                              cost_model=False)
        searched, variant = reports
        assert (searched.label, variant.label, variant.carried_from) == ("relu", "plain", "relu")
        winners = {(name, result.params) for name, result in searched.bests.items() if tunable(name)}
        measured = {(row["algorithm"], get_algorithm(row["algorithm"]).space.validate(json.loads(row["params"])))
                    for row in db.measurements(opencl.device.fingerprint(), spec)}
        defaults = {(name, default_of(name, opencl.device, spec)) for name in variant.trials_by_algorithm}
        assert measured - {(n, p) for n, p in measured if not tunable(n)} <= winners | defaults
        assert variant.trials <= len(winners | defaults)


def test_a_study_made_by_the_defaults_pass_still_measures_the_picks_first(db):
    """With a time budget every layer's defaults are measured first (the studies exist when the
    search starts): the cost model's picks and the warm-start seeds are queued at the search's start."""
    from autoconv.tuning.cost_model import candidate_pool

    tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=None, deadline=0.0, defaults_only=True, early_stop=None)
    picks = candidate_pool(SPEC, SMALL_GPU, IM2COL_GEMM, exclude=[default_of(IM2COL_GEMM)], size=2, seed=3)
    fake = FakeEvaluator()
    report = tune_layer(SPEC, SMALL_GPU, fake, db, trials=10, early_stop=None, retime=False,
                        cost_model=FixedCostModel({IM2COL_GEMM: picks}))
    assert report.resumed and report.ranked == 2
    assert [p for a, p in fake.measured if a == IM2COL_GEMM][:2] == picks
    # A third run queues nothing it measured already.
    again = tune_layer(SPEC, SMALL_GPU, FakeEvaluator(), db, trials=12, early_stop=None, retime=False,
                       cost_model=FixedCostModel({IM2COL_GEMM: picks}))
    assert again.ranked == 0
