"""The build pool: candidates built ahead on several threads and measured one at a time in the
order proposed, builders paused while a CPU device is timed; the shared capture of fd 2 that lets
builds run in parallel; parallel builds on the OpenCL backend."""

import os
import threading
import time

import pytest

from autoconv.backends.compiler_output import captured_stderr
from autoconv.store import SQLiteStore
from autoconv.tuning.build_pool import BuildGate, BuildPool
from autoconv.tuning.tuner import Built, tune_layer

from test_tuner import SMALL_GPU, SPEC, FakeEvaluator

CPU_DEVICE = SMALL_GPU.__class__(**{**SMALL_GPU.__dict__, "device_type": "cpu", "name": "Fake CPU"})


class StagedFake(FakeEvaluator):
    """A fake with the build/time split: builds take a while on builder threads, and every event
    is logged with its thread and interval."""

    def __init__(self, device, build_s=0.02, time_s=0.01):
        super().__init__(device=device)
        self.build_s, self.time_s = build_s, time_s
        self.events = []  # (kind, algorithm, params, thread, start, end)
        self.lock = threading.Lock()

    def build(self, algorithm, params):
        start = time.monotonic()
        time.sleep(self.build_s)
        with self.lock:
            self.events.append(("build", algorithm, params, threading.current_thread().name, start, time.monotonic()))
        return Built(algorithm, params, conv="built")

    def time(self, built):
        assert built.conv == "built", "a config was timed before it was built"
        start = time.monotonic()
        time.sleep(self.time_s)
        with self.lock:
            self.events.append(("time", built.algorithm, built.params, threading.current_thread().name, start,
                                time.monotonic()))
        self.measured.append((built.algorithm, built.params))
        return self.outcome(built.algorithm, built.params)


@pytest.fixture
def db(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as database:
        yield database


def _overlaps(a, b):
    return a[4] < b[5] and b[4] < a[5]


@pytest.mark.parametrize("device", [CPU_DEVICE, SMALL_GPU], ids=["cpu", "gpu"])
def test_builds_run_ahead_on_threads_and_are_measured_in_order(db, device):
    fake = StagedFake(device)
    report = tune_layer(SPEC, device, fake, db, trials=24, early_stop=None, retime=False, jobs=3)
    assert report.trials == 24
    builds = [e for e in fake.events if e[0] == "build"]
    timings = [e for e in fake.events if e[0] == "time"]
    # Every tunable config measured was built first, on a builder thread, never on the main one.
    built_at = {(e[1], e[2]): e for e in builds}
    for timing in timings:
        if timing[1] in ("im2col_gemm", "implicit_gemm"):
            assert built_at[(timing[1], timing[2])][5] <= timing[4]
            assert built_at[(timing[1], timing[2])][3].startswith("autoconv-build")
        assert timing[3] == threading.current_thread().name
    assert len(set(fake.measured)) == len(fake.measured), "a config was measured twice"
    # Builds overlapped each other: the pool ran them in parallel.
    assert any(_overlaps(a, b) for i, a in enumerate(builds) for b in builds[i + 1:])
    if device.device_type == "cpu":
        assert not any(_overlaps(b, t) for b in builds for t in timings), "a build ran while a CPU device was timed"
    # Measured in the order the study proposed them: trial numbers rise with measurement order.
    import optuna
    from autoconv.tuning.study import journal_storage
    storage = journal_storage(db.path)
    order = []
    for summary in optuna.study.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            if trial.user_attrs.get("measured"):
                order.append((summary.study_name, trial.number, trial.datetime_complete))
    for name in {o[0] for o in order}:
        numbers = [n for s, n, _ in sorted(order, key=lambda o: o[2]) if s == name]
        assert numbers == sorted(numbers)


def test_the_pool_gives_the_same_bests_as_one_at_a_time(tmp_path):
    reports = []
    for jobs in (1, 3):
        with SQLiteStore(tmp_path / f"{jobs}.db") as database:
            report = tune_layer(SPEC, CPU_DEVICE, StagedFake(CPU_DEVICE, 0.0, 0.0), database, trials=40,
                                early_stop=None, retime=False, jobs=jobs)
            reports.append(report)
    assert reports[0].trials == reports[1].trials == 40
    # TPE asked ahead proposes other configs, so only how good the best is can be compared.
    for algorithm in ("im2col_gemm", "implicit_gemm"):
        assert reports[1].bests[algorithm].median_ms <= 1.15 * reports[0].bests[algorithm].median_ms


def test_a_deadline_abandons_the_configs_still_waiting(db):
    import optuna
    from optuna.trial import TrialState

    from autoconv.tuning.study import journal_storage

    fake = StagedFake(CPU_DEVICE, build_s=0.05, time_s=0.05)
    report = tune_layer(SPEC, CPU_DEVICE, fake, db, trials=None, deadline=time.monotonic() + 1.0, early_stop=None,
                        retime=False, jobs=3)
    storage = journal_storage(db.path)
    states = [t.state for s in optuna.study.get_all_study_summaries(storage)
              for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states, "a trial in flight at the deadline was left running"
    assert report.trials == sum(1 for s in states if s == TrialState.COMPLETE) > 0


def test_the_gate_holds_builds_while_measuring_only_when_asked():
    for pause in (True, False):
        gate = BuildGate(pause_builds=pause)
        started = threading.Event()
        with gate.measuring():
            def build():
                with gate.building():
                    started.set()
            thread = threading.Thread(target=build)
            thread.start()
            assert started.wait(0.3) is (not pause)
        thread.join(2)
        assert started.is_set()


def test_a_build_that_raises_reaches_the_measuring_thread():
    def build(algorithm, params):
        raise RuntimeError("builder broke")
    pool = BuildPool(build, lambda built: built, jobs=2)
    pending = pool.submit("a", None)
    with pytest.raises(RuntimeError, match="builder broke"):
        pool.measure(pending)
    pool.close()


def test_concurrent_captures_each_keep_their_own_text_and_restore_fd2(capfd):
    barrier = threading.Barrier(2)
    said = {}

    def build(tag):
        with captured_stderr() as text:
            barrier.wait()
            os.write(2, f"chatter from {tag}\n".encode())
            barrier.wait()
        said[tag] = text[0]

    threads = [threading.Thread(target=build, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for tag in ("a", "b"):
        assert f"chatter from {tag}" in said[tag]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n", "fd 2 was not restored, or a capture leaked"


def test_opencl_builds_distinct_sources_in_parallel_and_each_source_once():
    from autoconv.backends import create_backend
    from autoconv.render import KernelSource

    pytest.importorskip("pyopencl")
    backend = create_backend("opencl")
    sources = [KernelSource(f"__kernel void k{i}(__global float* a) {{ a[get_global_id(0)] += {i}.0f; }}",
                            f"k{i}", "opencl", (4, 1, 1), None) for i in range(4)]
    kernels, errors = [], []

    def build(source):
        try:
            kernels.append((source.entry, backend.kernel(source)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(source,)) for source in [*sources, *sources]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(entry for entry, _ in kernels) == sorted(s.entry for s in [*sources, *sources])
    programs = {entry: set() for entry, _ in kernels}
    for entry, kernel in kernels:
        programs[entry].add(kernel.program.int_ptr)
    assert all(len(p) == 1 for p in programs.values()), "a source was built twice"
