"""Runtime lookup: the plan to run a ConvSpec with on a device, from the tuning databases.

Chain: in-process cache → the user's DB → the DBs shipped with autoconv; within them, in order:
exact shape → nearest tuned shape (same kernel size, stride, dilation and grouping) → the device's
most frequent winner → the vendor's most frequent winner → the built-in heuristic. Only verified
results made with the current templates are served. Never fails for a valid spec: a missing or
unreadable database is a miss.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from autoconv.backends.base import Backend, DeviceInfo
from autoconv.params import GemmParams
from autoconv.plan import Plan, heuristic_plan
from autoconv.render import ALGORITHM_IM2COL_BLAS, ALGORITHM_IM2COL_GEMM, template_hash
from autoconv.settings import settings
from autoconv.spec import ConvSpec
from autoconv.tuning_db import TunedResult, TuningDB

DeviceArg = DeviceInfo | Backend | int | str | None

_lock = threading.Lock()
_plans: dict[tuple, Plan] = {}
_db_contents: dict[tuple, tuple[list[TunedResult], dict[str, dict]]] = {}
_MAX_CACHED = 4096


def baseline_plan(source: str) -> Plan:
    return Plan(ALGORITHM_IM2COL_BLAS, None, source)


def _device_info(device: DeviceArg) -> DeviceInfo:
    if isinstance(device, DeviceInfo):
        return device
    if device is not None and not isinstance(device, (int, str)):
        return device.device
    from autoconv.backends import get_backend

    return get_backend("opencl", device).device


def _file_state(path: Path) -> tuple[int, int, int] | None:
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
    return (main.st_mtime_ns, main.st_size, hash(wal_state))


def _contents(path: Path, state: tuple) -> tuple[list[TunedResult], dict[str, dict]]:
    """Every current-template verified result of a DB and its device rows, read once per version."""
    key = (str(path), state)
    with _lock:
        cached = _db_contents.get(key)
    if cached is not None:
        return cached
    db = TuningDB.open_for_lookup(path)
    if db is None:
        contents: tuple[list[TunedResult], dict[str, dict]] = ([], {})
    else:
        try:
            contents = (db.results(template_hash=template_hash()), {d["fingerprint"]: d for d in db.devices()})
        except Exception as exc:  # noqa: BLE001 - a damaged DB is a miss, never a crash
            import warnings

            warnings.warn(f"autoconv: ignoring tuning database {path}: {exc}", RuntimeWarning, stacklevel=2)
            contents = ([], {})
        finally:
            db.close()
    with _lock:
        for stale in [k for k in _db_contents if k[0] == str(path)]:
            del _db_contents[stale]
        _db_contents[key] = contents
    return contents


def _warn_if_unusable(path: Path) -> None:
    """A `db` the caller named that cannot be a database is said once, not silently ignored."""
    import warnings

    if path.is_dir():
        warnings.warn(f"autoconv: db: {path} is a directory, not a tuning database; it is ignored",
                      RuntimeWarning, stacklevel=3)
    elif not path.exists():
        warnings.warn(f"autoconv: db: {path} does not exist; plans come from the shipped databases and defaults",
                      RuntimeWarning, stacklevel=3)


def database_paths(db: str | Path | None = None, shipped: bool = True) -> list[Path]:
    """The databases a lookup reads, in order: the given (or user's) DB, then the shipped ones."""
    first = Path(db) if db is not None else settings().db_path
    if not shipped:
        return [first]
    return [first, *(p for p in settings().shipped_dbs if p.resolve() != first.resolve())]


def lookup(spec: ConvSpec, device: DeviceArg = None, db: str | Path | None = None, *,
           allow_baseline: bool = True, shipped: bool = True) -> Plan:
    """The plan for a spec on a device (a DeviceInfo, a Backend, or an OpenCL device selector).

    allow_baseline=False always answers with a generated kernel, even where the library baseline
    measured faster (what `autoconv compare` shows as the generated GEMM). shipped=False reads
    only the given (or user's) database.
    """
    info = _device_info(device)
    if db is not None:
        _warn_if_unusable(Path(db))
    paths = database_paths(db, shipped)
    states = tuple((str(p), _file_state(p)) for p in paths)
    key = (info.fingerprint(), spec, template_hash(), states, allow_baseline)
    with _lock:
        plan = _plans.get(key)
    if plan is not None:
        return plan
    dbs = [_contents(Path(p), state) for p, state in states if state is not None]
    plan = _resolve(spec, info, dbs, allow_baseline)
    with _lock:
        if len(_plans) >= _MAX_CACHED:
            _plans.clear()
        _plans[key] = plan
    return plan


def clear_cache() -> None:
    with _lock:
        _plans.clear()
        _db_contents.clear()


def _resolve(spec: ConvSpec, info: DeviceInfo, dbs: Sequence[tuple[list[TunedResult], dict[str, dict]]],
             allow_baseline: bool) -> Plan:
    fingerprint, limits = info.fingerprint(), info.limits()
    mine = [r for results, _ in dbs for r in results if r.device == fingerprint and r.algorithm == ALGORITHM_IM2COL_GEMM]
    for result in mine:
        if result.spec == spec and (allow_baseline or result.params is not None):
            if result.baseline_wins and allow_baseline:
                return baseline_plan(f"tuned: {result.baseline} baseline beat every generated kernel")
            return Plan(ALGORITHM_IM2COL_GEMM, result.params, "tuned")

    usable = [r for r in mine if r.params is not None and not r.params.violations(limits)]
    similar = [r for r in usable if _same_family(r.spec, spec)]
    if similar:
        nearest = min(similar, key=lambda r: (_distance(r.spec, spec), r.spec.key()))
        return Plan(ALGORITHM_IM2COL_GEMM, nearest.params, f"nearest tuned shape {nearest.spec}")

    winner = _most_frequent(r.params for r in usable)
    if winner is not None:
        return Plan(ALGORITHM_IM2COL_GEMM, winner, "device default (most frequent tuned winner)")

    peers = {fp for _, devices in dbs for fp, row in devices.items()
             if fp != fingerprint and row.get("backend") == info.backend and row.get("vendor") == info.vendor
             and row.get("device_type") == info.device_type}
    vendor_results = [r for results, _ in dbs for r in results if r.device in peers and r.params is not None
                      and r.algorithm == ALGORITHM_IM2COL_GEMM and not r.params.violations(limits)]
    winner = _most_frequent(r.params for r in vendor_results)
    if winner is not None:
        return Plan(ALGORITHM_IM2COL_GEMM, winner, f"vendor default ({info.vendor} {info.device_type})")
    return heuristic_plan(spec, info.device_type, limits)


def _same_family(a: ConvSpec, b: ConvSpec) -> bool:
    """Same kernel size, stride, dilation and kind of grouping (dense, depthwise or grouped)."""
    def grouping(spec: ConvSpec) -> str:
        if spec.groups == 1:
            return "dense"
        return "depthwise" if spec.groups == spec.c else f"grouped{spec.groups}"

    return (a.r, a.s, a.stride, a.dilation, grouping(a), a.dtype) == (b.r, b.s, b.stride, b.dilation, grouping(b), b.dtype)


def _distance(a: ConvSpec, b: ConvSpec) -> float:
    """Log-ratio distance over the GEMM's dimensions: what the best tiles depend on."""
    return sum(abs(math.log2(x / y)) for x, y in ((a.gemm_m, b.gemm_m), (a.gemm_n, b.gemm_n), (a.gemm_k, b.gemm_k)))


def _most_frequent(params: Iterable[GemmParams | None]) -> GemmParams | None:
    counts = Counter(p for p in params if p is not None)
    if not counts:
        return None
    # Ties broken by the params' text so the answer does not depend on row order.
    return max(counts.items(), key=lambda item: (item[1], str(sorted(item[0].as_dict().items()))))[0]
