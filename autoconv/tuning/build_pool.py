"""The tuner's build pool, AutoTVM's builder/runner split: candidates are rendered, compiled and
verified ahead on `jobs` threads while one at a time is timed on the main thread. Where the device
runs on the host's own cores (a CPU device, the host BLAS), builders pause while a measurement
runs: a measurement waits for the builds under way to end, and no build starts until it is done,
so timings stay as clean as without the pool."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

# Builder threads by default: measured in benchmarks/tuning-pocl.md.
DEFAULT_JOBS = 2


class BuildGate:
    """Builds run together; a measurement runs alone when `pause_builds`."""

    def __init__(self, pause_builds: bool) -> None:
        self.pause_builds = pause_builds
        self._changed = threading.Condition()
        self._builds = 0
        self._measuring = False

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not (self.pause_builds and self._measuring))
            self._builds += 1
        try:
            yield
        finally:
            with self._changed:
                self._builds -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        with self._changed:
            self._measuring = True
            self._changed.wait_for(lambda: not (self.pause_builds and self._builds))
        try:
            yield
        finally:
            with self._changed:
                self._measuring = False
                self._changed.notify_all()


class _BuildLater:
    """A build done when its result is first asked for (no pool: one thing at a time)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build

    def result(self) -> Any:
        return self._build()

    def cancel(self) -> bool:
        return True


class BuildPool:
    """`build(algorithm, params)` on `jobs` threads (none when jobs is 1: builds then happen when
    measured, as before there was a pool); `time(built)` on the caller's thread, alone on the
    device's cores when `pause_builds`."""

    def __init__(self, build: Callable[[str, Any], Any], time: Callable[[Any], Any], *, jobs: int = 1,
                 pause_builds: bool = True) -> None:
        self.jobs = max(1, jobs)
        self.gate = BuildGate(pause_builds)
        self._build, self._time = build, time
        self._executor = ThreadPoolExecutor(self.jobs, thread_name_prefix="autoconv-build") if self.jobs > 1 else None

    @property
    def depth(self) -> int:
        """How many candidates to have in flight: every builder busy while one is measured."""
        return 1 if self._executor is None else self.jobs + 1

    def submit(self, algorithm: str, params: Any) -> "Future[Any] | _BuildLater":
        if self._executor is None:
            return _BuildLater(lambda: self._build(algorithm, params))
        return self._executor.submit(self._gated_build, algorithm, params)

    def _gated_build(self, algorithm: str, params: Any) -> Any:
        with self.gate.building():
            return self._build(algorithm, params)

    def measure(self, pending: "Future[Any] | _BuildLater") -> Any:
        built = pending.result()
        with self.gate.measuring():
            return self._time(built)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
