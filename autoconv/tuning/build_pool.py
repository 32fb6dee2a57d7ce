"""The tuner's build pool, AutoTVM's builder/runner split: candidates are compiled ahead by `jobs`
builder processes while the tuner measures one at a time.

A builder compiles a candidate and runs it once (PoCL finishes compiling a kernel for its
work-group size at the first launch), which leaves the binaries in the driver's on-disk kernel
cache (PoCL's kcache; CuPy's kernel cache on CUDA). The tuner's own build of the candidate is then
a cache hit, and it verifies and times the candidate as before, so nothing a builder does is
trusted for correctness. Processes, not threads: PoCL compiles one program at a time per process.

On a device that computes on the host's cores (a CPU device such as PoCL) builds and measurements
never overlap: candidates go in batches of BATCH_PER_JOB per builder, built together, then measured one by one with
no builder running, so timings stay as clean as without the pool. On a GPU, builds run on while a
candidate is measured."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import warnings
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, wait
from typing import Any, Callable

from autoconv.algorithms import Params, get_algorithm
from autoconv.spec import ConvSpec

# Builder processes by default: measured in benchmarks/tuning-pocl.md.
DEFAULT_JOBS = 2

# On a CPU device a batch holds this many candidates per builder, so that one slow build (a
# Winograd config beside a GEMM one) leaves the other builders work.
BATCH_PER_JOB = 2

Warm = Callable[[str, Params], Any]


# The resource tracker of a SIGKILLed tuner cleans up its queues' semaphores and would say so on
# the user's terminal; that is not news to the user who killed it.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def _start_builder(parent: int) -> None:
    """A builder's first act. `parent` is the tuner's PID, given by the tuner itself: a tuner killed
    before the builder got this far is noticed here, however early the kill landed."""
    # Ctrl-C goes to the whole process group: the tuner stops the builders itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A tuner killed outright (SIGKILL) cannot stop its builders: they stop when it is gone.
    # (Not prctl's PR_SET_PDEATHSIG: it fires when the *thread* that spawned the builder ends.)
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="autoconv-builder-watch", daemon=True).start()


def warm_kernel_cache(backend_name: str, device: int | None, spec: ConvSpec, algorithm: str,
                      params: dict[str, int]) -> str:
    """In a builder process: compile one candidate (its params as a plain dict, which pickles) and
    run it once on random data. Returns '' or why it failed (the tuner's own build meets the same
    failure and records it)."""
    from autoconv.plan import Plan
    from autoconv.serve.session import default_session
    from autoconv.tuning.verify import random_operands

    try:
        backend = default_session().backend(backend_name, device)
        conv = backend.prepare(spec, Plan(algorithm, get_algorithm(algorithm).space.validate(params), "tuning"))
        conv.run(*random_operands(spec, 0))
        return ""
    except Exception as exc:  # noqa: BLE001 - reported by the tuner's own build, never here
        return f"{type(exc).__name__}: {exc}"


def builder_processes(jobs: int) -> Executor | None:
    """`jobs` builder processes (none for 1: everything then happens in the tuner's process)."""
    if jobs <= 1:
        return None
    warnings_before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (warnings_before, QUIET_TRACKER)))
    try:  # the resource tracker and the builders start with the environment of this moment
        return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_builder,
                                   initargs=(os.getpid(),))
    finally:
        if warnings_before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = warnings_before


class BuildPool:
    """Hands candidates to the builders and says when one may be measured."""

    def __init__(self, warm: Warm | None, *, jobs: int = 1, pause_builds: bool = True) -> None:
        self.jobs = max(1, jobs) if warm is not None else 1
        self.pause_builds = pause_builds
        self._warm = warm
        self._submitted: list[Future[Any]] = []

    @property
    def batched(self) -> bool:
        """Builds and measurements take turns (a CPU device): a new batch only when the last is measured."""
        return self.jobs > 1 and self.pause_builds

    @property
    def depth(self) -> int:
        """How many candidates to have in flight: a batch on a CPU device, else every builder busy
        while one is measured."""
        return BATCH_PER_JOB * self.jobs if self.batched else (self.jobs + 1 if self.jobs > 1 else 1)

    def submit(self, algorithm: str, params: Params) -> Future[Any] | None:
        if self._warm is None or self.jobs == 1 or not get_algorithm(algorithm).device_kernels:
            return None
        try:
            future = self._warm(algorithm, params)
        except (BrokenExecutor, RuntimeError) as exc:
            # A builder died (killed, out of memory): tuning goes on, building in this process.
            warnings.warn(f"autoconv: the build pool stopped ({type(exc).__name__}: {exc}); candidates are built "
                          "one at a time from now on", RuntimeWarning, stacklevel=2)
            self._warm = None
            return None
        self._submitted.append(future)
        return future

    def _in_flight(self) -> list[Future[Any]]:
        self._submitted = [future for future in self._submitted if not future.done()]
        return self._submitted

    def ready(self, build: Future[Any] | None) -> None:
        """Wait until a candidate may be measured: its build done, and on a CPU device every build."""
        waiting = self._in_flight() if self.pause_builds else ([build] if build is not None else [])
        if waiting:
            wait(waiting)

    def close(self) -> None:
        for future in self._in_flight():
            future.cancel()
        wait(self._in_flight())


def process_warm(builders: Executor, backend_name: str, device: int | None, spec: ConvSpec) -> Warm:
    """The warm function of a layer on the builder processes."""
    return lambda algorithm, params: builders.submit(warm_kernel_cache, backend_name, device, spec, algorithm,
                                                     dict(params))
