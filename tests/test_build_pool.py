"""The build pool: candidates built ahead by builders (here a logging fake on threads; on a real
device, processes warming the driver's kernel cache) and measured one at a time in the order
proposed, builds and measurements never overlapping on a CPU device; builder processes on PoCL;
the shared capture of fd 2 and parallel builds on the OpenCL backend."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from autoconv.backends.compiler_output import captured_stderr
from autoconv.store import SQLiteStore
from autoconv.tuning.tuner import tune_layer

from test_tuner import SMALL_GPU, SPEC, FakeEvaluator

CPU_DEVICE = SMALL_GPU.__class__(**{**SMALL_GPU.__dict__, "device_type": "cpu", "name": "Fake CPU"})


class LoggedBuilds:
    """Fake builders on threads and a fake evaluator, every build and measurement logged with its
    interval: (kind, algorithm, params, start, end)."""

    def __init__(self, device, build_s=0.03, time_s=0.01):
        self.fake = FakeEvaluator(device=device)
        self.build_s, self.time_s = build_s, time_s
        self.events = []
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(8)
        self.algorithms = self.fake.algorithms

    def _log(self, kind, algorithm, params, start):
        with self.lock:
            self.events.append((kind, algorithm, params, start, time.monotonic()))

    def warm(self, algorithm, params):
        def build():
            start = time.monotonic()
            time.sleep(self.build_s)
            self._log("build", algorithm, params, start)
        return self.executor.submit(build)

    def __call__(self, algorithm, params, bound_ms=None):
        start = time.monotonic()
        time.sleep(self.time_s)
        self._log("time", algorithm, params, start)
        return self.fake(algorithm, params)


@pytest.fixture
def db(tmp_path):
    with SQLiteStore(tmp_path / "t.db") as database:
        yield database


def _overlaps(a, b):
    return a[3] < b[4] and b[3] < a[4]


@pytest.mark.parametrize("device", [CPU_DEVICE, SMALL_GPU], ids=["cpu", "gpu"])
def test_builds_run_ahead_and_are_measured_in_order(db, device):
    logged = LoggedBuilds(device)
    report = tune_layer(SPEC, device, logged, db, trials=24, early_stop=None, retime=False, jobs=3, warm=logged.warm)
    assert report.trials == 24
    builds = [e for e in logged.events if e[0] == "build"]
    timings = [e for e in logged.events if e[0] == "time"]
    built_at = {(e[1], e[2]): e for e in builds}
    for timing in timings:
        if timing[1] in ("im2col_gemm", "implicit_gemm"):  # what has device kernels is built first
            assert built_at[(timing[1], timing[2])][4] <= timing[3]
    assert len(set(logged.fake.measured)) == len(logged.fake.measured), "a config was measured twice"
    assert any(_overlaps(a, b) for i, a in enumerate(builds) for b in builds[i + 1:]), "builds never ran together"
    if device.device_type == "cpu":
        assert not any(_overlaps(b, t) for b in builds for t in timings), "a build ran while a CPU device was timed"
    else:
        assert any(_overlaps(b, t) for b in builds for t in timings), "a GPU waited for builds it did not need"
    # Measured in the order the study proposed them: trial numbers rise with measurement order.
    import optuna
    from autoconv.tuning.study import journal_storage
    storage = journal_storage(db.path)
    for summary in optuna.study.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        measured = sorted((t.datetime_complete, t.number) for t in study.get_trials(deepcopy=False)
                          if t.user_attrs.get("measured"))
        assert [n for _, n in measured] == sorted(n for _, n in measured)


def test_the_pool_finds_bests_as_good_as_one_at_a_time(tmp_path):
    reports = []
    for jobs in (1, 3):
        with SQLiteStore(tmp_path / f"{jobs}.db") as database:
            logged = LoggedBuilds(CPU_DEVICE, 0.0, 0.0)
            reports.append(tune_layer(SPEC, CPU_DEVICE, logged, database, trials=40, early_stop=None, retime=False,
                                      jobs=jobs, warm=logged.warm))
    assert reports[0].trials == reports[1].trials == 40
    # TPE asked ahead proposes other configs, so only how good the best is can be compared.
    for algorithm in ("im2col_gemm", "implicit_gemm"):
        assert reports[1].bests[algorithm].median_ms <= 1.15 * reports[0].bests[algorithm].median_ms


def test_a_deadline_abandons_the_configs_still_waiting(db):
    import optuna
    from optuna.trial import TrialState

    from autoconv.tuning.study import journal_storage

    logged = LoggedBuilds(SMALL_GPU, build_s=0.05, time_s=0.05)
    report = tune_layer(SPEC, SMALL_GPU, logged, db, trials=None, deadline=time.monotonic() + 1.0, early_stop=None,
                        retime=False, jobs=3, warm=logged.warm)
    storage = journal_storage(db.path)
    states = [t.state for s in optuna.study.get_all_study_summaries(storage)
              for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states, "a trial in flight at the deadline was left running"
    assert report.trials == sum(1 for s in states if s == TrialState.COMPLETE) > 0


def test_builder_processes_warm_the_kernel_cache_on_pocl(tmp_path):
    pytest.importorskip("pyopencl")
    from autoconv import ConvSpec, get_algorithm
    from autoconv.backends import create_backend
    from autoconv.tuning.build_pool import builder_processes, warm_kernel_cache
    from autoconv.tuning.tuner import tune_layers

    backend = create_backend("opencl")
    spec = ConvSpec(1, 8, 10, 10, 8, 3, 3, padding=1)
    good = get_algorithm("implicit_gemm").heuristic(spec, backend.device)
    assert warm_kernel_cache("opencl", backend.index, spec, "implicit_gemm", dict(good)) == ""
    strided = ConvSpec(1, 8, 10, 10, 8, 3, 3, stride=2, padding=1)  # Winograd refuses it
    assert "does not support" in warm_kernel_cache("opencl", backend.index, strided, "winograd",
                                                   dict(get_algorithm("winograd").heuristic(spec, backend.device)))
    with SQLiteStore(tmp_path / "t.db") as database:
        (report,) = tune_layers([("tiny", spec)], backend, database, trials=6, jobs=2, warm_start=False,
                                algorithms=("implicit_gemm",))
    assert report.trials == 6 and report.bests["implicit_gemm"].verified
    assert builder_processes(1) is None


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


def test_a_dead_build_pool_leaves_tuning_to_go_on_in_process(db):
    from concurrent.futures import BrokenExecutor

    logged = LoggedBuilds(CPU_DEVICE, 0.0, 0.0)

    def broken(algorithm, params):
        raise BrokenExecutor("a child process terminated abruptly")

    with pytest.warns(RuntimeWarning, match="build pool stopped"):
        report = tune_layer(SPEC, CPU_DEVICE, logged, db, trials=10, early_stop=None, retime=False, jobs=2,
                            warm=broken)
    assert report.trials == 10


def test_builders_of_a_killed_tuner_stop(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "tuner.py"
    script.write_text(
        "import os, sys, time\n"
        "from autoconv.tuning.build_pool import builder_processes\n"
        "if __name__ == '__main__':\n"
        "    pool = builder_processes(2)\n"
        "    pids = [pool.submit(os.getpid).result() for _ in range(4)]\n"
        "    print(' '.join(map(str, set(pids))), flush=True)\n"
        "    time.sleep(60)\n")
    tuner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    builders = [int(pid) for pid in tuner.stdout.readline().split()]
    assert builders
    tuner.send_signal(signal.SIGKILL)
    tuner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in builders):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
                   for pid in builders), "a builder outlived its tuner"


def test_pocl_threads_are_pinned_unless_the_user_says_otherwise(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("pyopencl")
    probe = ("import os\nfrom autoconv.backends import create_backend\ncreate_backend('opencl')\n"
             "print(os.environ['POCL_AFFINITY'])\n")
    env = {k: v for k, v in os.environ.items() if k != "POCL_AFFINITY"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "1"
    assert subprocess.run([sys.executable, "-c", probe], env={**env, "POCL_AFFINITY": "0"}, capture_output=True,
                          text=True).stdout.strip() == "0"


@pytest.mark.parametrize("offset_s", [0.0, 0.05, 0.15, 0.3, 0.6, 1.0])
def test_builders_die_with_a_tuner_killed_however_early(tmp_path, offset_s):
    """SIGKILL lands 0 to 1 s after the builders' spawn, before or after they read who their
    parent is: every builder and the resource tracker go, the caller's communicate() returns, and
    nothing is said about leaked semaphores."""
    import signal
    import subprocess
    import sys
    import uuid

    marker = f"autoconv-test-{uuid.uuid4().hex}"
    script = tmp_path / "tuner.py"
    script.write_text(
        "import os, time\n"
        "from autoconv.tuning.build_pool import builder_processes\n"
        "if __name__ == '__main__':\n"
        "    pool = builder_processes(2)\n"
        "    futures = [pool.submit(time.sleep, 30) for _ in range(2)]\n"
        "    print('spawned', flush=True)\n"
        "    time.sleep(60)\n")
    tuner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "AUTOCONV_TEST_MARK": marker})
    assert tuner.stdout.readline().strip() == "spawned"
    time.sleep(offset_s)
    tuner.send_signal(signal.SIGKILL)
    _, stderr = tuner.communicate(timeout=30)  # hangs while a child holds the pipes

    def marked() -> list[int]:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if marker.encode() in open(f"/proc/{entry}/environ", "rb").read() and \
                        "Z" not in open(f"/proc/{entry}/stat").read().split()[2]:
                    alive.append(int(entry))
            except OSError:
                continue
        return alive

    deadline = time.monotonic() + 15
    while marked() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marked(), "a builder or the resource tracker outlived its tuner"
    assert "leaked semaphore" not in stderr, stderr
