"""The SQLite result store: devices, layers, every measured config and each algorithm's best
verified result per layer, through sqlite-utils, with a versioned schema (sqlite-utils
Migrations) and WAL.

A result key is (device fingerprint, layer key, dtype, algorithm, template hash): everything that
changes the answer. Params are stored as JSON and validated again on every read against the
algorithm's declared space, so a database row can never put anything but known small integers
into a kernel.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import sqlite_utils
from sqlite_utils.migrations import Migrations

from autoconv.algorithms import Params, get_algorithm, list_algorithms
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError, InvalidSpecError, TuningDBError
from autoconv.spec import ConvSpec
from autoconv.store.base import STATUS_OK, STATUSES, ResultStore, TimedConfig, TunedResult

# Params are a small JSON object; anything longer is damage (or an attack), refused before parsing.
MAX_PARAMS_TEXT = 4096
# A verified result's relative error is below the float32 tolerance (autoconv.compare.TOLERANCE).
_VERIFIED_ERROR_LIMIT = 1e-4

# Tables and columns every reader relies on: a file lacking one is damaged, said in one line.
REQUIRED_COLUMNS = {
    "devices": ("fingerprint", "backend", "platform", "vendor", "name", "driver", "device_type", "compute_units",
                "local_mem_bytes", "max_work_group_size", "max_work_item_sizes"),
    "layers": ("key", "n", "c", "h", "w", "k", "r", "s", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
               "dilation_w", "groups", "bias", "dtype", "layout"),
    "results": ("id", "device", "layer", "dtype", "algorithm", "template_hash", "params", "median_ms", "gflops",
                "rel_error", "verified", "default_ms", "trials", "spread", "repeats", "autoconv_version", "created"),
    "measurements": ("id", "device", "layer", "dtype", "algorithm", "template_hash", "params", "status",
                     "median_ms", "rel_error", "message", "created"),
}

migrations = Migrations("autoconv")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.table("devices").create({
        "fingerprint": str, "backend": str, "platform": str, "vendor": str, "name": str, "driver": str,
        "device_type": str, "compute_units": int, "local_mem_bytes": int, "max_work_group_size": int,
        "max_work_item_sizes": str, "first_seen": str,
    }, pk="fingerprint")
    db.table("layers").create({
        "key": str, "n": int, "c": int, "h": int, "w": int, "k": int, "r": int, "s": int,
        "stride_h": int, "stride_w": int, "pad_h": int, "pad_w": int, "dilation_h": int, "dilation_w": int,
        "groups": int, "bias": int, "dtype": str, "layout": str,
    }, pk="key")
    db.table("results").create({
        "id": int, "device": str, "layer": str, "dtype": str, "algorithm": str, "template_hash": str,
        "params": str, "median_ms": float, "gflops": float, "rel_error": float, "verified": int,
        "baseline": str, "baseline_ms": float, "default_ms": float, "trials": int,
        "autoconv_version": str, "created": str,
    }, pk="id", foreign_keys=[("device", "devices", "fingerprint"), ("layer", "layers", "key")])
    db.table("results").create_index(["device", "layer", "dtype", "algorithm", "template_hash"], unique=True)
    db.table("measurements").create({
        "id": int, "device": str, "layer": str, "dtype": str, "algorithm": str, "template_hash": str,
        "params": str, "status": str, "median_ms": float, "rel_error": float, "message": str, "created": str,
    }, pk="id", foreign_keys=[("device", "devices", "fingerprint"), ("layer", "layers", "key")])
    db.table("measurements").create_index(["device", "layer", "template_hash"])


@migrations()
def m002_one_row_per_algorithm(db: sqlite_utils.Database) -> None:
    """v2: every algorithm's best is a row of its own, the library baseline (im2col_blas) too.

    A v1 row held the generated GEMM's best with the baseline's time beside it (params NULL when
    the baseline had won): its baseline becomes an im2col_blas row of the same key, a baseline-won
    row becomes that row itself, and each result gets columns for its spread and repeat count."""
    for row in list(db.table("results").rows):
        baseline_ms = row.get("baseline_ms")
        usable = isinstance(baseline_ms, (int, float)) and not isinstance(baseline_ms, bool) \
            and math.isfinite(baseline_ms) and baseline_ms > 0
        if row.get("params") is None:
            db.table("results").update(row["id"], {"algorithm": "im2col_blas", "params": "{}", "default_ms": None})
        elif usable and row.get("algorithm") == "im2col_gemm":
            db.table("results").insert({
                "device": row["device"], "layer": row["layer"], "dtype": row["dtype"], "algorithm": "im2col_blas",
                "template_hash": row["template_hash"], "params": "{}", "median_ms": baseline_ms, "gflops": None,
                "rel_error": None, "verified": 1, "default_ms": None, "trials": 1,
                "autoconv_version": row["autoconv_version"], "created": row["created"],
            }, ignore=True)
    db.table("results").transform(drop={"baseline", "baseline_ms"})
    db.table("results").add_column("spread", float)
    db.table("results").add_column("repeats", int)
    db.table("results").create_index(["device", "layer", "dtype", "algorithm", "template_hash"], unique=True,
                               if_not_exists=True)


@migrations()
def m003_asymmetric_padding(db: sqlite_utils.Database) -> None:
    """v3: a layer's padding after the input (bottom, right); NULL in older rows means symmetric."""
    db.table("layers").add_column("pad_bottom", int)
    db.table("layers").add_column("pad_right", int)


@migrations()
def m004_measurement_spread(db: sqlite_utils.Database) -> None:
    """v4: every measurement keeps its spread (IQR / median) and repeat count, as results do."""
    db.table("measurements").add_column("spread", float)
    db.table("measurements").add_column("repeats", int)


@migrations()
def m005_fused_epilogue(db: sqlite_utils.Database) -> None:
    """v5: a layer's fused epilogue (activation after the residual); NULL in older rows means none."""
    db.table("layers").add_column("activation", str)
    db.table("layers").add_column("residual", int)


SCHEMA_VERSION = len(migrations._migrations)  # noqa: SLF001 - the count of migrations is the version


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _autoconv_version() -> str:
    from autoconv import __version__

    return __version__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def device_from_row(row: dict[str, Any]) -> DeviceInfo:
    """A DeviceInfo from a devices row (a device seen elsewhere: exports and lookups for it).
    Raises TuningDBError when a column has the wrong type or range (a damaged row)."""
    texts = ("fingerprint", "backend", "platform", "vendor", "name", "driver", "device_type")
    counts = ("compute_units", "local_mem_bytes", "max_work_group_size")
    bad = [name for name in texts if not _is_text(row.get(name))]
    bad += [name for name in counts if not _is_int(row.get(name)) or not 0 <= row[name] < 2**62]
    sizes: Any = None
    if _is_text(row.get("max_work_item_sizes")) and len(row["max_work_item_sizes"]) <= 200:
        try:
            sizes = json.loads(row["max_work_item_sizes"])
        except ValueError:
            sizes = None
    if not isinstance(sizes, list) or not 1 <= len(sizes) <= 3 or not all(_is_int(v) and 0 < v < 2**31 for v in sizes):
        bad.append("max_work_item_sizes")
    if bad:
        raise TuningDBError(f"device row {str(row.get('fingerprint'))[:80]!r} is damaged ({', '.join(bad)})")
    info = DeviceInfo(backend=row["backend"], platform=row["platform"], vendor=row["vendor"], name=row["name"],
                      driver=row["driver"], device_type=row["device_type"], compute_units=row["compute_units"],
                      local_mem_bytes=row["local_mem_bytes"], max_work_group_size=row["max_work_group_size"],
                      max_work_item_sizes=tuple(sizes))
    if info.fingerprint() != row["fingerprint"]:
        raise TuningDBError(f"device row {row['fingerprint'][:80]!r} is damaged (fingerprint does not match its fields)")
    return info


def spec_row(spec: ConvSpec) -> dict[str, Any]:
    return {
        "key": spec.key(), "n": spec.n, "c": spec.c, "h": spec.h, "w": spec.w, "k": spec.k, "r": spec.r, "s": spec.s,
        "stride_h": spec.stride[0], "stride_w": spec.stride[1], "pad_h": spec.padding[0], "pad_w": spec.padding[1],
        "dilation_h": spec.dilation[0], "dilation_w": spec.dilation[1], "groups": spec.groups,
        "bias": int(spec.bias), "dtype": spec.dtype, "layout": spec.layout,
        "pad_bottom": spec.bottom_right[0], "pad_right": spec.bottom_right[1],
        "activation": spec.activation, "residual": int(spec.residual),
    }


def spec_from_row(row: dict[str, Any]) -> ConvSpec:
    if row.get("bias") not in (0, 1) or isinstance(row.get("bias"), bool):
        raise InvalidSpecError(f"bias: expected 0 or 1, got {row.get('bias')!r}")
    residual = row.get("residual")
    if residual not in (None, 0, 1) or isinstance(residual, bool):
        raise InvalidSpecError(f"residual: expected 0 or 1, got {residual!r}")
    activation = row.get("activation")
    if activation is not None and not _is_text(activation):
        raise InvalidSpecError(f"activation: expected text, got {activation!r}")
    return ConvSpec(n=row["n"], c=row["c"], h=row["h"], w=row["w"], k=row["k"], r=row["r"], s=row["s"],
                    stride=(row["stride_h"], row["stride_w"]), padding=(row["pad_h"], row["pad_w"]),
                    dilation=(row["dilation_h"], row["dilation_w"]), groups=row["groups"], bias=bool(row["bias"]),
                    dtype=row["dtype"], layout=row["layout"],
                    padding_end=None if row.get("pad_bottom") is None and row.get("pad_right") is None
                    else (row["pad_bottom"], row["pad_right"]),
                    activation=activation or "none", residual=bool(residual))


def params_json(params: Params | None) -> str:
    # Sorted keys: the same params always give the same text (export and merge rely on it).
    return json.dumps({} if params is None else params.as_dict(), sort_keys=True)


def parse_params(text: str | None, algorithm: str, where: str) -> Params:
    """Params from a DB row, validated by the algorithm's space; raises InvalidParamsError naming the row."""
    if not isinstance(text, str) or len(text) > MAX_PARAMS_TEXT:
        raise InvalidParamsError(f"{where}: params are not a short JSON text")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidParamsError(f"{where}: params are not JSON") from None
    if not isinstance(raw, dict):
        raise InvalidParamsError(f"{where}: params are not a JSON object")
    try:
        return get_algorithm(algorithm).space.validate(raw)
    except InvalidParamsError as exc:
        raise InvalidParamsError(f"{where}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ms(value: Any) -> bool:
    return _is_number(value) and value > 0


def result_from_row(row: dict[str, Any], where: str) -> TunedResult:
    """A TunedResult from a joined results+layers row, every column checked for type and range.
    Raises InvalidParamsError naming the row and the damaged columns: a bad row is never served."""
    bad = [name for name in ("device", "layer", "algorithm", "template_hash") if not _is_text(row.get(name))]
    if not _positive_ms(row.get("median_ms")):
        bad.append("median_ms")
    if row.get("default_ms") is not None and not _positive_ms(row["default_ms"]):
        bad.append("default_ms")
    error = row.get("rel_error")
    if error is not None and not (_is_number(error) and 0 <= error < _VERIFIED_ERROR_LIMIT):
        bad.append("rel_error")
    spread = row.get("spread")
    if spread is not None and not (_is_number(spread) and spread >= 0):
        bad.append("spread")
    for name in ("trials", "repeats"):
        if row.get(name) is not None and not (_is_int(row[name]) and 0 <= row[name] < 2**31):
            bad.append(name)
    if row.get("verified") != 1:
        bad.append("verified")
    for name in ("autoconv_version", "created"):
        if row.get(name) is not None and not _is_text(row[name]):
            bad.append(name)
    if bad:
        raise InvalidParamsError(f"{where}: damaged column(s) {', '.join(bad)}")
    try:
        spec = spec_from_row(row)
    except (InvalidSpecError, TypeError, KeyError, OverflowError) as exc:
        raise InvalidParamsError(f"{where}: damaged layer ({exc})") from None
    if spec.key() != row["layer"]:
        raise InvalidParamsError(f"{where}: the layer's fields do not match its key")
    params = parse_params(row.get("params"), row["algorithm"], where)
    median_ms = float(row["median_ms"])
    return TunedResult(
        device=row["device"], spec=spec, algorithm=row["algorithm"], template_hash=row["template_hash"],
        params=params, median_ms=median_ms, gflops=spec.flops / (median_ms * 1e6), rel_error=float(error or 0.0),
        default_ms=None if row.get("default_ms") is None else float(row["default_ms"]),
        trials=row.get("trials") or 0, spread=None if spread is None else float(spread), repeats=row.get("repeats"),
        autoconv_version=row.get("autoconv_version") or "", created=row.get("created") or "", verified=True)


def _conditions(*pairs: tuple[str, Any]) -> tuple[list[str], list[Any]]:
    """SQL conditions and their arguments for the pairs whose value is given (not None)."""
    chosen = [(sql, value) for sql, value in pairs if value is not None]
    return [sql for sql, _ in chosen], [value for _, value in chosen]


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise creating and migrating databases in one directory across processes (several
    `autoconv tune` started at once on a new file). flock on the directory, not the database
    file: closing another descriptor of the database would drop SQLite's own POSIX locks."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _wal_in_use(path: Path) -> bool:
    try:
        return Path(f"{path}-wal").stat().st_size > 0
    except OSError:
        return False


class SQLiteStore(ResultStore):
    """One SQLite tuning database file. Writers open it read-write (created and migrated on
    demand); readers (readonly=True) never write: no schema, no WAL conversion, no -wal/-shm
    files left behind, and they work in read-only directories. A reader of an older schema
    migrates a copy in memory. SQLiteStore.open_for_lookup is the reader that never fails."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise TuningDBError(f"tuning database {self.path} is a directory, not a database file")
        try:
            if readonly:
                self.db = sqlite_utils.Database(self._connect_readonly())
                self._check_not_newer()
                if self._applied() and len(self._applied()) < SCHEMA_VERSION:
                    self.db = self._migrated_copy()
                self._check_schema()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with _directory_lock(self.path.parent):
                    self.db = sqlite_utils.Database(sqlite3.connect(str(self.path), check_same_thread=False))
                    self.db.execute("PRAGMA busy_timeout = 10000")
                    self._check_not_newer()
                    migrations.apply(self.db)
                    if self.db.journal_mode != "wal":
                        self.db.enable_wal()
                self._check_tables()
        except sqlite3.DatabaseError as exc:
            raise TuningDBError(f"tuning database {self.path} cannot be {'read' if readonly else 'opened'}: {exc}") from None
        except OSError as exc:
            raise TuningDBError(f"tuning database {self.path}: {exc.strerror or exc}") from None

    def _connect_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise TuningDBError(f"tuning database {self.path} does not exist")
        if self.path.stat().st_size == 0:
            raise TuningDBError(f"{self.path} is an empty file, not an autoconv tuning database")
        uri = self.path.resolve().as_uri()
        if _wal_in_use(self.path):
            # Committed data may still sit in the -wal file (a tuner is writing): read through it.
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
                conn.execute("select count(*) from sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                warnings.warn(f"autoconv: {self.path} is read from its main file only (its directory is "
                              "read-only, so recent writes in its -wal file cannot be read)", RuntimeWarning,
                              stacklevel=3)
        # No writer: read the file as it is, creating nothing beside it (works in read-only places).
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)

    def _migrated_copy(self) -> sqlite_utils.Database:
        """An older-schema file read through an in-memory copy brought up to date: the file itself
        is never written by a reader."""
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.conn.backup(memory)
        self.db.conn.close()
        copy = sqlite_utils.Database(memory)
        migrations.apply(copy)
        return copy

    @classmethod
    def open_for_lookup(cls, path: str | Path) -> "SQLiteStore | None":
        """Read-only handle, or None (with a warning unless the file is simply absent): a missing,
        unreadable or foreign database is a miss, never a crash."""
        if not Path(path).is_file():
            return None
        try:
            return cls(path, readonly=True)
        except TuningDBError as exc:
            warnings.warn(f"autoconv: ignoring {exc}", RuntimeWarning, stacklevel=2)
            return None

    def _applied(self) -> list[str]:
        if "_sqlite_migrations" not in self.db.table_names():
            return []
        return [row["name"] for row in self.db.table("_sqlite_migrations").rows_where("migration_set = ?", ["autoconv"])]

    def _check_not_newer(self) -> None:
        tables = set(self.db.table_names())
        known = {m.name for m in migrations._migrations}  # noqa: SLF001
        unknown = [name for name in self._applied() if name not in known]
        if unknown:
            raise TuningDBError(f"tuning database {self.path} was written by a newer autoconv (migrations {unknown})")
        if tables and "_sqlite_migrations" not in tables:
            raise TuningDBError(f"{self.path} is not an autoconv tuning database (tables: {', '.join(sorted(tables))})")

    def _check_schema(self) -> None:
        self._check_not_newer()
        if not self._applied():
            raise TuningDBError(f"{self.path} is not an autoconv tuning database (it has no autoconv schema)")
        self._check_tables()

    def _check_tables(self) -> None:
        for table, columns in REQUIRED_COLUMNS.items():
            present = {column.name for column in self.db[table].columns} if self.db[table].exists() else set()
            missing = [c for c in columns if c not in present]
            if not present:
                raise TuningDBError(f"tuning database {self.path} is damaged: table {table!r} is missing")
            if missing:
                raise TuningDBError(f"tuning database {self.path} is damaged: table {table!r} lacks {', '.join(missing)}")

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Under the handle's lock; an SQLite error (a dropped table, a damaged page) becomes one
        TuningDBError naming the file."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                raise TuningDBError(f"tuning database {self.path} cannot be read: {exc}") from None

    # Writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction under the handle's lock, committed or rolled back whole; an SQLite error
        (a read-only file, a full disk) becomes one TuningDBError naming the file."""
        if self.readonly:
            raise TuningDBError(f"tuning database {self.path} is open read-only")
        with self._lock:
            try:
                with self.db.conn:
                    # IMMEDIATE: the write lock is taken before the reads, so another process
                    # cannot insert the row this transaction just found missing (read-then-write).
                    if not self.db.conn.in_transaction:
                        self.db.conn.execute("BEGIN IMMEDIATE")
                    yield
            except sqlite3.DatabaseError as exc:
                raise TuningDBError(f"tuning database {self.path} cannot be written: {exc}") from None

    def record_device(self, info: DeviceInfo) -> None:
        with self._writing():
            self.db.table("devices").insert({
                "fingerprint": info.fingerprint(), "backend": info.backend, "platform": info.platform,
                "vendor": info.vendor, "name": info.name, "driver": info.driver, "device_type": info.device_type,
                "compute_units": info.compute_units, "local_mem_bytes": info.local_mem_bytes,
                "max_work_group_size": info.max_work_group_size,
                "max_work_item_sizes": json.dumps(list(info.max_work_item_sizes)), "first_seen": _now(),
            }, ignore=True)

    def record_layer(self, spec: ConvSpec) -> None:
        with self._writing():
            self.db.table("layers").insert(spec_row(spec), ignore=True)

    def record_measurement(self, device: str, spec: ConvSpec, algorithm: str, template_hash: str,
                           params: Params | None, status: str, median_ms: float, rel_error: float,
                           message: str = "", *, spread: float | None = None, repeats: int | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status: {status!r} is not one of {STATUSES}")
        with self._writing():
            self.db.table("measurements").insert({
                "device": device, "layer": spec.key(), "dtype": spec.dtype, "algorithm": algorithm,
                "template_hash": template_hash, "params": params_json(params), "status": status,
                "median_ms": median_ms if median_ms != float("inf") else None,
                "rel_error": rel_error if rel_error != float("inf") else None,
                "message": message[:2000], "created": _now(),
                "spread": spread if spread is not None and math.isfinite(spread) else None, "repeats": repeats,
            })

    def save_result(self, result: TunedResult, *, refresh_default: bool = False, replace: bool = False) -> bool:
        """Store a verified result unless a better one is already stored for its key; True if stored.

        refresh_default=True (the tuner, which has just measured it) replaces the stored default
        time even when the stored best stays; replace=True stores the result even when the stored
        one is faster (a fresh, steady measurement of a config that is not tuned)."""
        if not result.verified:
            return False
        with self._writing():
            existing = self._result_row(result.device, result.spec, result.algorithm, result.template_hash)
            existing_trials = existing["trials"] if existing is not None and _is_int(existing["trials"]) else 0
            # A damaged stored row (say median_ms NULL) is replaced, never compared with.
            if not replace and existing is not None and _positive_ms(existing["median_ms"]) \
                    and existing["median_ms"] <= result.median_ms:
                changes: dict[str, Any] = {}
                if existing_trials < result.trials:  # more trials confirm the same best
                    changes["trials"] = result.trials
                if refresh_default and result.default_ms is not None:
                    changes["default_ms"] = result.default_ms
                if changes:
                    self.db.table("results").update(existing["id"], changes)
                return False
            self.db.table("layers").insert(spec_row(result.spec), ignore=True)
            row = {
                "device": result.device, "layer": result.spec.key(), "dtype": result.spec.dtype,
                "algorithm": result.algorithm, "template_hash": result.template_hash,
                "params": params_json(result.params), "median_ms": result.median_ms, "gflops": result.gflops,
                "rel_error": result.rel_error, "verified": 1, "default_ms": result.default_ms,
                "trials": max(result.trials, existing_trials), "spread": result.spread, "repeats": result.repeats,
                "autoconv_version": result.autoconv_version or _autoconv_version(),
                "created": result.created or _now(),
            }
            if existing is not None:
                self.db.table("results").update(existing["id"], row)
            else:
                self.db.table("results").insert(row)
            return True

    # Reading -----------------------------------------------------------------------------------

    def _result_row(self, device: str, spec: ConvSpec, algorithm: str, template_hash: str) -> dict[str, Any] | None:
        rows = list(self.db.table("results").rows_where(
            "device = ? and layer = ? and dtype = ? and algorithm = ? and template_hash = ?",
            [device, spec.key(), spec.dtype, algorithm, template_hash]))
        return rows[0] if rows else None

    def results(self, device: str | None = None, template_hash: str | None = None,
                layers: Sequence[str] | None = None) -> list[TunedResult]:
        """Verified results (optionally for one device / template hash / set of layer keys, read
        through the results index); a row with a damaged column (wrong type, out of range, params
        that fail validation) is skipped with a warning."""
        where, args = _conditions(("r.device = ?", device), ("r.template_hash = ?", template_hash))
        if layers is not None:
            where.append(f"r.layer in ({', '.join('?' for _ in layers) or 'null'})")
            args = [*args, *layers]
        where.insert(0, "r.verified = 1")
        sql = ("select r.*, l.n, l.c, l.h, l.w, l.k, l.r, l.s, l.stride_h, l.stride_w, l.pad_h, l.pad_w, "
               "l.dilation_h, l.dilation_w, l.groups, l.bias, l.layout, l.pad_bottom, l.pad_right, l.activation, l.residual "
               "from results r join layers l on r.layer = l.key "
               # A result of a device the file does not describe is orphaned (damage): never served.
               "join devices d on r.device = d.fingerprint "
               f"where {' and '.join(where)} order by r.device, r.layer, r.algorithm")
        with self._reading():
            cursor = self.db.execute(sql, args)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, values)) for values in cursor.fetchall()]
        found = []
        for row in rows:
            where_text = f"{self.path}: result {row.get('id')!r} ({str(row.get('layer'))[:120]})"
            try:
                found.append(result_from_row(row, where_text))
            except InvalidParamsError as exc:
                warnings.warn(f"autoconv: ignoring {exc}", RuntimeWarning, stacklevel=2)
        return found

    def devices(self) -> list[dict[str, Any]]:
        """The devices rows whose every column is well-formed; a damaged one is skipped with a warning."""
        with self._reading():
            rows = list(self.db.table("devices").rows)
        good = []
        for row in rows:
            try:
                device_from_row(row)
            except TuningDBError as exc:
                warnings.warn(f"autoconv: ignoring {self.path}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            good.append(row)
        return sorted(good, key=lambda row: (row["name"], row["fingerprint"]))

    def device(self, fingerprint: str) -> dict[str, Any] | None:
        return next((row for row in self.devices() if row["fingerprint"] == fingerprint), None)

    def measurements(self, device: str, spec: ConvSpec) -> Iterator[dict[str, Any]]:
        """Every measurement of a layer on a device, in order; rows whose status is not a known
        status are skipped (a damaged row)."""
        with self._reading():
            rows = list(self.db.table("measurements").rows_where("device = ? and layer = ?", [device, spec.key()],
                                                           order_by="id"))
        yield from (row for row in rows if row.get("status") in STATUSES)

    def timed_configs(self, template_hash: str | None = None) -> list[TimedConfig]:
        """Every verified measurement with a time (a cost model's training data), oldest first."""
        where, args = _conditions(("m.template_hash = ?", template_hash))
        where += ["m.status = ?", "m.median_ms > 0"]
        sql = ("select m.id, m.device, m.layer, m.dtype, m.algorithm, m.template_hash, m.params, m.median_ms, "
               "l.n, l.c, l.h, l.w, l.k, l.r, l.s, l.stride_h, l.stride_w, l.pad_h, l.pad_w, l.dilation_h, "
               "l.dilation_w, l.groups, l.bias, l.layout, l.pad_bottom, l.pad_right, l.activation, l.residual "
               f"from measurements m join layers l on m.layer = l.key where {' and '.join(where)} order by m.id")
        with self._reading():
            cursor = self.db.execute(sql, [*args, STATUS_OK])
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, values)) for values in cursor.fetchall()]
        found, known = [], set(list_algorithms())
        for row in rows:
            # Rows of an algorithm this version lacks, or damaged ones, teach nothing: skipped quietly
            # (a training set of thousands of rows must not print a warning per row).
            if row["algorithm"] not in known or not _positive_ms(row["median_ms"]):
                continue
            try:
                spec = spec_from_row(row)
                if spec.key() != row["layer"]:
                    continue
                params = parse_params(row["params"], row["algorithm"], f"measurement {row['id']}")
            except (InvalidParamsError, InvalidSpecError, KeyError, TypeError):
                continue
            found.append(TimedConfig(row["device"], spec, row["algorithm"], row["template_hash"], params,
                                     float(row["median_ms"])))
        return found

    # Maintenance -------------------------------------------------------------------------------

    def merge_from(self, other: ResultStore) -> tuple[int, int]:
        """Copy devices, layers and results from another DB keeping the best verified result per
        key; returns (results stored, results kept as they were)."""
        for device_row in other.devices():
            with self._writing():
                self.db.table("devices").insert(device_row, ignore=True)
        stored = kept = 0
        for result in other.results():
            if self.save_result(result):
                stored += 1
            else:
                kept += 1
        return stored, kept

    def prune(self, *, current_template_hash: str | None = None, device: str | None = None) -> int:
        """Delete results (and measurements) made with another template version, or of one
        device; returns how many results were deleted."""
        clauses, args = _conditions(("template_hash != ?", current_template_hash), ("device = ?", device))
        if not clauses:
            return 0
        where = " or ".join(clauses)
        with self._writing():
            deleted = self.db.execute(f"delete from results where {where}", args).rowcount
            self.db.execute(f"delete from measurements where {where}", args)
        return deleted

