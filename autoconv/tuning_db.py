"""The tuning database: devices, layers, every measured config and the best verified result per
key, in SQLite through sqlite-utils, with a versioned schema (sqlite-utils Migrations) and WAL.

A result key is (device fingerprint, layer key, dtype, algorithm, template hash): everything that
changes the answer. Params are stored as JSON and validated again on every read, so a database
row can never put anything but known small integers into a kernel.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils
from sqlite_utils.migrations import Migrations

from autoconv.backends.base import DeviceInfo
from autoconv.errors import InvalidParamsError, InvalidSpecError, TuningDBError
from autoconv.params import GemmParams, validate_gemm_params
from autoconv.spec import ConvSpec

STATUS_OK = "ok"
STATUS_COMPILE_FAILED = "compile_failed"
STATUS_LAUNCH_FAILED = "launch_failed"
STATUS_WRONG_RESULT = "wrong_result"
STATUSES = (STATUS_OK, STATUS_COMPILE_FAILED, STATUS_LAUNCH_FAILED, STATUS_WRONG_RESULT)

migrations = Migrations("autoconv")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["devices"].create({
        "fingerprint": str, "backend": str, "platform": str, "vendor": str, "name": str, "driver": str,
        "device_type": str, "compute_units": int, "local_mem_bytes": int, "max_work_group_size": int,
        "max_work_item_sizes": str, "first_seen": str,
    }, pk="fingerprint")
    db["layers"].create({
        "key": str, "n": int, "c": int, "h": int, "w": int, "k": int, "r": int, "s": int,
        "stride_h": int, "stride_w": int, "pad_h": int, "pad_w": int, "dilation_h": int, "dilation_w": int,
        "groups": int, "bias": int, "dtype": str, "layout": str,
    }, pk="key")
    db["results"].create({
        "id": int, "device": str, "layer": str, "dtype": str, "algorithm": str, "template_hash": str,
        "params": str, "median_ms": float, "gflops": float, "rel_error": float, "verified": int,
        "baseline": str, "baseline_ms": float, "default_ms": float, "trials": int,
        "autoconv_version": str, "created": str,
    }, pk="id", foreign_keys=[("device", "devices", "fingerprint"), ("layer", "layers", "key")])
    db["results"].create_index(["device", "layer", "dtype", "algorithm", "template_hash"], unique=True)
    db["measurements"].create({
        "id": int, "device": str, "layer": str, "dtype": str, "algorithm": str, "template_hash": str,
        "params": str, "status": str, "median_ms": float, "rel_error": float, "message": str, "created": str,
    }, pk="id", foreign_keys=[("device", "devices", "fingerprint"), ("layer", "layers", "key")])
    db["measurements"].create_index(["device", "layer", "template_hash"])


SCHEMA_VERSION = len(migrations._migrations)  # noqa: SLF001 - the count of migrations is the version


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _autoconv_version() -> str:
    from autoconv import __version__

    return __version__


@dataclass(frozen=True)
class TunedResult:
    """The best verified config for one key, with the baseline and default timed beside it."""

    device: str
    spec: ConvSpec
    algorithm: str
    template_hash: str
    params: GemmParams | None
    median_ms: float
    gflops: float
    rel_error: float
    baseline: str
    baseline_ms: float | None
    default_ms: float | None
    trials: int
    autoconv_version: str = ""
    created: str = ""
    verified: bool = True

    @property
    def baseline_wins(self) -> bool:
        """The library baseline beat every generated kernel measured for this layer."""
        return self.params is None or (self.baseline_ms is not None and self.baseline_ms < self.median_ms)

    @property
    def speedup_vs_baseline(self) -> float | None:
        return None if not self.baseline_ms else self.baseline_ms / self.median_ms

    @property
    def speedup_vs_default(self) -> float | None:
        return None if not self.default_ms else self.default_ms / self.median_ms

    def better_than(self, other: "TunedResult") -> bool:
        return self.median_ms < other.median_ms


def device_from_row(row: dict[str, Any]) -> DeviceInfo:
    """A DeviceInfo from a devices row (a device seen elsewhere: exports and lookups for it)."""
    return DeviceInfo(backend=row["backend"], platform=row["platform"], vendor=row["vendor"], name=row["name"],
                      driver=row["driver"], device_type=row["device_type"], compute_units=row["compute_units"],
                      local_mem_bytes=row["local_mem_bytes"], max_work_group_size=row["max_work_group_size"],
                      max_work_item_sizes=tuple(json.loads(row["max_work_item_sizes"])))


def spec_row(spec: ConvSpec) -> dict[str, Any]:
    return {
        "key": spec.key(), "n": spec.n, "c": spec.c, "h": spec.h, "w": spec.w, "k": spec.k, "r": spec.r, "s": spec.s,
        "stride_h": spec.stride[0], "stride_w": spec.stride[1], "pad_h": spec.padding[0], "pad_w": spec.padding[1],
        "dilation_h": spec.dilation[0], "dilation_w": spec.dilation[1], "groups": spec.groups,
        "bias": int(spec.bias), "dtype": spec.dtype, "layout": spec.layout,
    }


def spec_from_row(row: dict[str, Any]) -> ConvSpec:
    return ConvSpec(n=row["n"], c=row["c"], h=row["h"], w=row["w"], k=row["k"], r=row["r"], s=row["s"],
                    stride=(row["stride_h"], row["stride_w"]), padding=(row["pad_h"], row["pad_w"]),
                    dilation=(row["dilation_h"], row["dilation_w"]), groups=row["groups"], bias=bool(row["bias"]),
                    dtype=row["dtype"], layout=row["layout"])


def params_json(params: GemmParams | None) -> str | None:
    # Sorted keys: the same params always give the same text (export and merge rely on it).
    return None if params is None else json.dumps(params.as_dict(), sort_keys=True)


def parse_params(text: str | None, where: str) -> GemmParams | None:
    """Params from a DB row, validated; raises InvalidParamsError naming the row."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except ValueError:
        raise InvalidParamsError(f"{where}: params are not JSON") from None
    if not isinstance(raw, dict):
        raise InvalidParamsError(f"{where}: params are not a JSON object")
    try:
        return validate_gemm_params(raw)
    except InvalidParamsError as exc:
        raise InvalidParamsError(f"{where}: {exc}") from None


def _conditions(*pairs: tuple[str, Any]) -> tuple[list[str], list[Any]]:
    """SQL conditions and their arguments for the pairs whose value is given (not None)."""
    chosen = [(sql, value) for sql, value in pairs if value is not None]
    return [sql for sql, _ in chosen], [value for _, value in chosen]


class TuningDB:
    """One SQLite tuning database file. Writers open it read-write (created and migrated on
    demand); readers that must never fail use TuningDB.open_for_lookup."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        try:
            if readonly:
                if not self.path.is_file():
                    raise TuningDBError(f"tuning database {self.path} does not exist")
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
                self.db = sqlite_utils.Database(conn)
                self._check_schema()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite_utils.Database(sqlite3.connect(str(self.path), check_same_thread=False))
                self.db.execute("PRAGMA busy_timeout = 10000")
                self._check_not_newer()
                migrations.apply(self.db)
                if self.db.journal_mode != "wal":
                    self.db.enable_wal()
        except sqlite3.DatabaseError as exc:
            raise TuningDBError(f"tuning database {self.path} cannot be {'read' if readonly else 'opened'}: {exc}") from None
        except OSError as exc:
            raise TuningDBError(f"tuning database {self.path}: {exc.strerror or exc}") from None

    @classmethod
    def open_for_lookup(cls, path: str | Path) -> "TuningDB | None":
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
        return [row["name"] for row in self.db["_sqlite_migrations"].rows_where("migration_set = ?", ["autoconv"])]

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
        if len(self._applied()) != SCHEMA_VERSION:
            raise TuningDBError(f"tuning database {self.path} has an older schema; any `autoconv tune` or "
                                f"`autoconv db merge` into it upgrades it")

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "TuningDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Writing -----------------------------------------------------------------------------------

    def _write(self) -> Any:
        if self.readonly:
            raise TuningDBError(f"tuning database {self.path} is open read-only")
        return self.db.conn  # as a context manager: one transaction, committed or rolled back whole

    def record_device(self, info: DeviceInfo) -> None:
        with self._lock, self._write():
            self.db["devices"].insert({
                "fingerprint": info.fingerprint(), "backend": info.backend, "platform": info.platform,
                "vendor": info.vendor, "name": info.name, "driver": info.driver, "device_type": info.device_type,
                "compute_units": info.compute_units, "local_mem_bytes": info.local_mem_bytes,
                "max_work_group_size": info.max_work_group_size,
                "max_work_item_sizes": json.dumps(list(info.max_work_item_sizes)), "first_seen": _now(),
            }, ignore=True)

    def record_layer(self, spec: ConvSpec) -> None:
        with self._lock, self._write():
            self.db["layers"].insert(spec_row(spec), ignore=True)

    def record_measurement(self, device: str, spec: ConvSpec, algorithm: str, template_hash: str,
                           params: GemmParams | None, status: str, median_ms: float, rel_error: float,
                           message: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"status: {status!r} is not one of {STATUSES}")
        with self._lock, self._write():
            self.db["measurements"].insert({
                "device": device, "layer": spec.key(), "dtype": spec.dtype, "algorithm": algorithm,
                "template_hash": template_hash, "params": params_json(params), "status": status,
                "median_ms": median_ms if median_ms != float("inf") else None,
                "rel_error": rel_error if rel_error != float("inf") else None,
                "message": message[:2000], "created": _now(),
            })

    def save_result(self, result: TunedResult) -> bool:
        """Store a verified result unless a better one is already stored for its key; True if stored."""
        if not result.verified:
            return False
        with self._lock, self._write():
            existing = self._result_row(result.device, result.spec, result.algorithm, result.template_hash)
            if existing is not None and existing["median_ms"] <= result.median_ms:
                if existing["trials"] < result.trials:  # more trials confirm the same best
                    self.db["results"].update(existing["id"], {"trials": result.trials})
                return False
            self.db["layers"].insert(spec_row(result.spec), ignore=True)
            row = {
                "device": result.device, "layer": result.spec.key(), "dtype": result.spec.dtype,
                "algorithm": result.algorithm, "template_hash": result.template_hash,
                "params": params_json(result.params), "median_ms": result.median_ms, "gflops": result.gflops,
                "rel_error": result.rel_error, "verified": 1, "baseline": result.baseline,
                "baseline_ms": result.baseline_ms, "default_ms": result.default_ms,
                "trials": max(result.trials, existing["trials"] if existing else 0),
                "autoconv_version": result.autoconv_version or _autoconv_version(),
                "created": result.created or _now(),
            }
            if existing is not None:
                self.db["results"].update(existing["id"], row)
            else:
                self.db["results"].insert(row)
            return True

    # Reading -----------------------------------------------------------------------------------

    def _result_row(self, device: str, spec: ConvSpec, algorithm: str, template_hash: str) -> dict[str, Any] | None:
        rows = list(self.db["results"].rows_where(
            "device = ? and layer = ? and dtype = ? and algorithm = ? and template_hash = ?",
            [device, spec.key(), spec.dtype, algorithm, template_hash]))
        return rows[0] if rows else None

    def results(self, device: str | None = None, template_hash: str | None = None) -> list[TunedResult]:
        """Verified results (optionally for one device / template hash); a row whose params or
        layer fail validation is skipped with a warning."""
        where, args = _conditions(("r.device = ?", device), ("r.template_hash = ?", template_hash))
        where.insert(0, "r.verified = 1")
        sql = ("select r.*, l.n, l.c, l.h, l.w, l.k, l.r, l.s, l.stride_h, l.stride_w, l.pad_h, l.pad_w, "
               "l.dilation_h, l.dilation_w, l.groups, l.bias, l.layout from results r join layers l on r.layer = l.key "
               f"where {' and '.join(where)} order by r.device, r.layer, r.algorithm")
        with self._lock:
            rows = [dict(zip([d[0] for d in cursor.description], values))
                    for cursor in [self.db.execute(sql, args)] for values in cursor.fetchall()]
        found = []
        for row in rows:
            where_text = f"{self.path}: result {row['id']} ({row['layer']})"
            try:
                spec = spec_from_row(row)
                params = parse_params(row["params"], where_text)
            except (InvalidParamsError, InvalidSpecError, TypeError) as exc:
                warnings.warn(f"autoconv: ignoring {exc}", RuntimeWarning, stacklevel=2)
                continue
            found.append(TunedResult(
                device=row["device"], spec=spec, algorithm=row["algorithm"], template_hash=row["template_hash"],
                params=params, median_ms=row["median_ms"], gflops=row["gflops"] or 0.0,
                rel_error=row["rel_error"] or 0.0, baseline=row["baseline"] or "", baseline_ms=row["baseline_ms"],
                default_ms=row["default_ms"], trials=row["trials"] or 0,
                autoconv_version=row["autoconv_version"] or "", created=row["created"] or "", verified=True))
        return found

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["devices"].rows_where(order_by="name"))

    def device(self, fingerprint: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(self.db["devices"].rows_where("fingerprint = ?", [fingerprint]))
        return rows[0] if rows else None

    def measurements(self, device: str, spec: ConvSpec) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = list(self.db["measurements"].rows_where("device = ? and layer = ?", [device, spec.key()],
                                                           order_by="id"))
        yield from rows

    # Maintenance -------------------------------------------------------------------------------

    def merge_from(self, other: "TuningDB") -> tuple[int, int]:
        """Copy devices, layers and results from another DB keeping the best verified result per
        key; returns (results stored, results kept as they were)."""
        for device_row in other.devices():
            with self._lock, self._write():
                self.db["devices"].insert(device_row, ignore=True)
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
        with self._lock, self._write():
            deleted = self.db.execute(f"delete from results where {where}", args).rowcount
            self.db.execute(f"delete from measurements where {where}", args)
        return deleted

