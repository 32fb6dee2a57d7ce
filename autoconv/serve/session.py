"""The process's state in one object: settings (database paths), backends, the tuning databases'
contents and the plans looked up in them, and prepared convolutions ready to serve. A default
Session serves autoconv.conv2d, autoconv.Conv2d, autoconv.lookup and autoconv.get_backend; a
caller may make its own."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TypeVar

from autoconv.algorithms import BASELINE, get_algorithm
from autoconv.backends import create_backend
from autoconv.backends.base import Backend
from autoconv.backends.runtime import DeviceBackend, is_device_backend
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidSpecError
from autoconv.plan import Plan
from autoconv.render import template_hash
from autoconv.serve.lookup import DatabaseContents, epilogue_variants, is_peer, resolve, tuned_plan
from autoconv.serve.runner import Runner
from autoconv.settings import Settings, read_settings
from autoconv.spec import ConvSpec
from autoconv.store import SQLiteStore, TunedResult

DeviceArg = DeviceInfo | Backend | int | str | None

T = TypeVar("T")

MAX_PLANS = 4096
MAX_PREPARED = 64  # each holds device buffers; keep the most recent few


def file_state(path: Path) -> tuple[int, int, int, int] | None:
    """Changes whenever the database does (WAL writes touch the -wal file, not the main one)."""
    try:
        main = path.stat()
    except OSError:
        return None
    try:
        wal = Path(f"{path}-wal").stat()
        wal_state = (wal.st_mtime_ns, wal.st_size)
    except OSError:
        wal_state = (0, 0)
    return (main.st_mtime_ns, main.st_size, *wal_state)


def _read(path: Path, read: Callable[[SQLiteStore], T], empty: T) -> T:
    """What `read` gets from a database opened read-only; a missing, damaged or foreign database
    gives `empty` (with a warning), never a crash."""
    if not path.is_file():
        return empty
    store = SQLiteStore.open_for_lookup(path)
    if store is None:
        return empty
    try:
        return read(store)
    except Exception as exc:  # noqa: BLE001 - a damaged DB is a miss, never a crash
        warnings.warn(f"autoconv: ignoring tuning database {path}: {exc}", RuntimeWarning, stacklevel=3)
        return empty
    finally:
        store.close()


def read_contents(path: Path, device: DeviceInfo | None = None) -> DatabaseContents:
    """Every current-template verified result of a database and its device rows; with `device`,
    only the results of that device and of its peers (what the lookup's fallbacks read), each read
    through the results index."""
    def read(store: SQLiteStore) -> DatabaseContents:
        devices = {row["fingerprint"]: row for row in store.devices()}
        if device is None:
            return DatabaseContents(tuple(store.results(template_hash=template_hash())), devices)
        wanted = [fp for fp, row in devices.items() if fp == device.fingerprint() or is_peer(row, device)]
        return DatabaseContents(tuple(r for fp in wanted for r in store.results(device=fp, template_hash=template_hash())),
                                devices)
    return _read(path, read, DatabaseContents())


def read_layer_results(path: Path, device: str, layers: tuple[str, ...]) -> tuple[TunedResult, ...]:
    """The current-template verified results of some layers on one device, through the results
    index (not the whole table)."""
    return _read(path, lambda store: tuple(store.results(device=device, template_hash=template_hash(), layers=layers)),
                 ())


class Session:
    """Backends, database contents, plans and prepared convs of one process (thread-safe)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._lock = threading.RLock()
        self._backends: dict[tuple[object, ...], Backend] = {}
        self._settings = settings or read_settings()
        self._contents: dict[str, tuple[tuple[int, ...] | None, DatabaseContents]] = {}
        self._layer_results: dict[tuple, tuple[TunedResult, ...]] = {}
        self._read_locks: dict[str, threading.Lock] = {}  # one reader per database; the others wait for it
        self._plans: dict[tuple, Plan] = {}
        self._runners: OrderedDict[tuple, Runner] = OrderedDict()
        self._paths: dict[str | None, list[Path]] = {}
        self._specs: dict[tuple, ConvSpec] = {}
        self._shipped_states: dict[str, tuple[str, tuple[int, int, int, int] | None]] = {}

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, settings: Settings | None = None) -> None:
        """New settings (read from the environment when None); cached answers are dropped, the
        backends and their compiled kernels kept."""
        with self._lock:
            self._settings = settings or read_settings()
            self.clear_cache()

    def clear_cache(self) -> None:
        with self._lock:
            self._contents.clear()
            self._layer_results.clear()
            self._plans.clear()
            self._runners.clear()
            self._paths.clear()
            self._specs.clear()
            self._shipped_states.clear()

    def drop_backends(self, name: str) -> None:
        """Forget the backends of that name (the next ask makes a new one): for a runtime swapped
        under them, as the tests' simulated CUDA is."""
        with self._lock:
            for key in [key for key in self._backends if key[0] == name]:
                del self._backends[key]
            self.clear_cache()

    def backend(self, name: str = "opencl", device: int | str | None = None) -> Backend:
        """The backend of that name on a device, shared so compiled kernels are reused: every
        selector of one device (None, its index, its name) gives the same backend, so device
        arrays made through one are read by layers made through another."""
        key = (name, device)
        backend = self._backends.get(key)
        if backend is not None:
            return backend
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                made = create_backend(name, device)
                backend = self._backends.setdefault((name, "index", getattr(made, "index", None)), made)
                self._backends[key] = backend
            return backend

    def device_info(self, device: DeviceArg) -> DeviceInfo:
        if isinstance(device, DeviceInfo):
            return device
        if device is not None and not isinstance(device, (int, str)):
            return device.device
        return self.backend("opencl", device).device

    def database_paths(self, db: str | Path | None = None, shipped: bool = True) -> list[Path]:
        """The databases a lookup reads, in order: the given (or user's) DB, then the shipped ones
        (listed once per session: the installed databases do not change under it)."""
        first = Path(db) if db is not None else self._settings.db_path
        if not shipped:
            return [first]
        cache_key = None if db is None else str(db)
        paths = self._paths.get(cache_key)
        if paths is None:
            paths = [first, *(p for p in self._settings.shipped_dbs if p.resolve() != first.resolve())]
            with self._lock:
                self._paths[cache_key] = paths
        return list(paths)

    def _read_lock(self, path: Path) -> threading.Lock:
        with self._lock:
            return self._read_locks.setdefault(str(path), threading.Lock())

    def contents(self, path: Path, device: DeviceInfo | None = None) -> DatabaseContents:
        """A database's contents (with `device`: only its and its peers' results), read again only
        when the file changed, by one thread: the others asking meanwhile wait for that read and
        share it."""
        key = str(path) if device is None else f"{path}\0{device.fingerprint()}"
        state = file_state(path)
        cached = self._contents.get(key)
        if cached is not None and cached[0] == state:
            return cached[1]
        with self._read_lock(path):
            state = file_state(path)
            cached = self._contents.get(key)
            if cached is not None and cached[0] == state:
                return cached[1]
            contents = read_contents(path, device) if state is not None else DatabaseContents()
            with self._lock:
                self._contents[key] = (state, contents)
        return contents

    def layer_results(self, path: Path, device: str, layers: tuple[str, ...]) -> tuple[TunedResult, ...]:
        """Some layers' results on one device (an indexed read), cached until the file changes."""
        key = (str(path), file_state(path), device, layers)
        found = self._layer_results.get(key)
        if found is None:
            with self._read_lock(path):
                found = self._layer_results.get(key)
                if found is None:
                    found = read_layer_results(path, device, layers) if key[1] is not None else ()
                    with self._lock:
                        if len(self._layer_results) >= MAX_PLANS:
                            self._layer_results.clear()
                        self._layer_results[key] = found
        return found

    def lookup(self, spec: ConvSpec, device: DeviceArg = None, db: str | Path | None = None, *,
               generated_only: bool = False, algorithm: str | None = None, shipped: bool = True) -> Plan:
        """The plan for a spec on a device (a DeviceInfo, a Backend, or an OpenCL device selector)."""
        info = self.device_info(device)
        if db is not None:
            _warn_if_unusable(Path(db))
        paths = self.database_paths(db, shipped)
        # The given (or user's) database is checked for changes on every call; the shipped ones,
        # installed with autoconv, once per session.
        states = ((str(paths[0]), file_state(paths[0])), *(self._shipped_state(p) for p in paths[1:]))
        key = (info.fingerprint(), spec, states, generated_only, algorithm)
        with self._lock:
            plan = self._plans.get(key)
        if plan is not None:
            return plan
        # The layer's own rows first, through the index; the whole databases only for a fallback.
        keys = epilogue_variants(spec)
        plan = tuned_plan(spec, info, (r for p in paths for r in self.layer_results(p, info.fingerprint(), keys)),
                          generated_only=generated_only, algorithm=algorithm)
        if plan is None:
            plan = resolve(spec, info, [self.contents(p, info) for p in paths], generated_only=generated_only,
                           algorithm=algorithm)
        with self._lock:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _shipped_state(self, path: Path) -> tuple[str, tuple[int, int, int, int] | None]:
        key = str(path)
        state = self._shipped_states.get(key)
        if state is None:
            state = self._shipped_states[key] = (key, file_state(path))
        return state

    def memoised_spec(self, key: tuple, build: Callable[[], ConvSpec]) -> ConvSpec:
        """The spec `build` makes, kept under `key` (hashable call arguments) for the next call."""
        spec = self._specs.get(key)
        if spec is None:
            spec = build()
            with self._lock:
                if len(self._specs) >= MAX_PLANS:
                    self._specs.clear()
                self._specs[key] = spec
        return spec

    def choose_plan(self, spec: ConvSpec, backend: Backend, db: str | Path | None = None, *,
                    algorithm: str | None = None) -> Plan:
        """The plan a backend runs a spec with when the caller does not pass one: the tuning DBs'
        answer, or on the host backend the library baseline (unless an algorithm is forced)."""
        if backend.name == "numpy":
            chosen = algorithm or BASELINE
            if chosen not in backend.algorithms:
                raise InvalidSpecError(f"algorithm: the numpy backend runs {backend.algorithms}, not {chosen!r}")
            return Plan(chosen, None, "host")
        return self.lookup(spec, backend, db, algorithm=algorithm)

    def backend_for(self, plan: Plan, backend: Backend) -> Backend:
        """Where a plan runs: the device backend, or the host when the algorithm has host code the
        device backend does not run (the library baseline on OpenCL: numpy's BLAS)."""
        if plan.algorithm in backend.algorithms:
            return backend
        if get_algorithm(plan.algorithm).host_code:
            return self.backend("numpy")
        raise InvalidSpecError(f"plan: the {backend.name} backend cannot run {plan.algorithm!r} "
                               f"(runs {backend.algorithms})")

    def runner(self, spec: ConvSpec, backend: Backend, plan: Plan) -> Runner:
        """A Runner for conv2d: one per spec, backend and plan, reused across calls (its prepared
        conv is shared by every caller of the same layer, so weights are passed on each call)."""
        key = (id(backend), spec, plan)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                self._runners.move_to_end(key)
                return runner
        target = self.backend_for(plan, backend)
        runner = Runner(spec, plan, target.prepare(spec, plan), device_runtime(backend), on_device=target is backend)
        with self._lock:
            runner = self._runners.setdefault(key, runner)
            while len(self._runners) > MAX_PREPARED:
                self._runners.popitem(last=False)
        return runner


def device_runtime(backend: Backend) -> DeviceBackend | None:
    """The backend when it is a device runtime whose device arrays layers accept (None: the host)."""
    return backend if is_device_backend(backend) else None


def _warn_if_unusable(path: Path) -> None:
    """A `db` the caller named that cannot be a database is said, not silently ignored."""
    if path.is_dir():
        warnings.warn(f"autoconv: db: {path} is a directory, not a tuning database; it is ignored",
                      RuntimeWarning, stacklevel=4)
    elif not path.exists():
        warnings.warn(f"autoconv: db: {path} does not exist; plans come from the shipped databases and defaults",
                      RuntimeWarning, stacklevel=4)


_default: Session | None = None
_default_lock = threading.Lock()


def default_session() -> Session:
    global _default
    with _default_lock:
        if _default is None:
            _default = Session()
        return _default


def lookup(spec: ConvSpec, device: DeviceArg = None, db: str | Path | None = None, *,
           generated_only: bool = False, algorithm: str | None = None, shipped: bool = True) -> Plan:
    """The plan autoconv runs a spec with on a device: the tuning databases' answer (`db`, else
    $AUTOCONV_DB or the user's cache, then the shipped DBs), the default session's cache.

    generated_only=True answers with an algorithm that has device kernels even where the library
    baseline measured faster (what export writes); algorithm= forces one algorithm (its tuned
    params for this layer and device if any, else its heuristic; an algorithm that does not
    support the shape raises UnsupportedAlgorithmError); shipped=False reads only the given (or
    user's) database."""
    return default_session().lookup(spec, device, db, generated_only=generated_only, algorithm=algorithm,
                                    shipped=shipped)
