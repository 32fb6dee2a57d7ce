"""The process's state in one object: settings (database paths), backends, the tuning databases'
contents and the plans looked up in them, and prepared convolutions. A default Session serves
autoconv.conv2d, autoconv.lookup and autoconv.get_backend; a caller may make its own."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from autoconv.backends import create_backend
from autoconv.backends.base import Backend, PreparedConv
from autoconv.device import DeviceInfo
from autoconv.plan import Plan
from autoconv.render import template_hash
from autoconv.serve.lookup import DatabaseContents, resolve
from autoconv.settings import Settings, read_settings
from autoconv.spec import ConvSpec
from autoconv.store import SQLiteStore

DeviceArg = DeviceInfo | Backend | int | str | None

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


def read_contents(path: Path) -> DatabaseContents:
    """Every current-template verified result of a database and its device rows; a missing,
    damaged or foreign database is empty (with a warning), never a crash."""
    if not path.is_file():
        return DatabaseContents()
    store = SQLiteStore.open_for_lookup(path)
    if store is None:
        return DatabaseContents()
    try:
        return DatabaseContents(tuple(store.results(template_hash=template_hash())),
                                {row["fingerprint"]: row for row in store.devices()})
    except Exception as exc:  # noqa: BLE001 - a damaged DB is a miss, never a crash
        warnings.warn(f"autoconv: ignoring tuning database {path}: {exc}", RuntimeWarning, stacklevel=2)
        return DatabaseContents()
    finally:
        store.close()


class Session:
    """Backends, database contents, plans and prepared convs of one process (thread-safe)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._lock = threading.RLock()
        self._backends: dict[tuple[str, int | str | None], Backend] = {}
        self._settings = settings or read_settings()
        self._contents: dict[str, tuple[tuple, DatabaseContents]] = {}
        self._plans: dict[tuple, Plan] = {}
        self._prepared: OrderedDict[tuple, PreparedConv] = OrderedDict()

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
            self._plans.clear()
            self._prepared.clear()

    def backend(self, name: str = "opencl", device: int | str | None = None) -> Backend:
        """The backend of that name on a device, shared so compiled kernels are reused."""
        key = (name, device)
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = create_backend(name, device)
                self._backends[key] = backend
            return backend

    def device_info(self, device: DeviceArg) -> DeviceInfo:
        if isinstance(device, DeviceInfo):
            return device
        if device is not None and not isinstance(device, (int, str)):
            return device.device
        return self.backend("opencl", device).device

    def database_paths(self, db: str | Path | None = None, shipped: bool = True) -> list[Path]:
        """The databases a lookup reads, in order: the given (or user's) DB, then the shipped ones."""
        first = Path(db) if db is not None else self._settings.db_path
        if not shipped:
            return [first]
        return [first, *(p for p in self._settings.shipped_dbs if p.resolve() != first.resolve())]

    def contents(self, path: Path) -> DatabaseContents:
        """A database's contents, read again only when the file changed."""
        state = file_state(path)
        with self._lock:
            cached = self._contents.get(str(path))
        if cached is not None and cached[0] == state:
            return cached[1]
        contents = read_contents(path) if state is not None else DatabaseContents()
        with self._lock:
            self._contents[str(path)] = (state, contents)
        return contents

    def lookup(self, spec: ConvSpec, device: DeviceArg = None, db: str | Path | None = None, *,
               generated_only: bool = False, algorithm: str | None = None, shipped: bool = True) -> Plan:
        """The plan for a spec on a device (a DeviceInfo, a Backend, or an OpenCL device selector)."""
        info = self.device_info(device)
        if db is not None:
            _warn_if_unusable(Path(db))
        paths = self.database_paths(db, shipped)
        states = tuple((str(p), file_state(p)) for p in paths)
        key = (info.fingerprint(), spec, states, generated_only, algorithm)
        with self._lock:
            plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = resolve(spec, info, [self.contents(p) for p in paths], generated_only=generated_only,
                       algorithm=algorithm)
        with self._lock:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def prepared(self, spec: ConvSpec, backend: Backend, plan: Plan) -> PreparedConv:
        """A prepared conv reused across calls with the same spec, backend and plan."""
        key = (id(backend), spec, plan)
        with self._lock:
            conv = self._prepared.get(key)
            if conv is not None:
                self._prepared.move_to_end(key)
                return conv
        conv = backend.prepare(spec, plan)
        with self._lock:
            self._prepared[key] = conv
            while len(self._prepared) > MAX_PREPARED:
                self._prepared.popitem(last=False)
        return conv


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
