"""Where tuning results live: the ResultStore contract and its SQLite implementation."""

from autoconv.store.base import (
    STATUS_COMPILE_FAILED,
    STATUS_LAUNCH_FAILED,
    STATUS_OK,
    STATUS_TOO_LARGE,
    STATUS_WRONG_RESULT,
    STATUSES,
    ResultStore,
    TimedConfig,
    TunedResult,
    best_per_algorithm,
    fastest,
)
from autoconv.store.sqlite import SCHEMA_VERSION, SQLiteStore, device_from_row

__all__ = ["ResultStore", "SCHEMA_VERSION", "SQLiteStore", "STATUSES", "STATUS_COMPILE_FAILED",
           "STATUS_LAUNCH_FAILED", "STATUS_OK", "STATUS_TOO_LARGE", "STATUS_WRONG_RESULT", "TimedConfig", "TunedResult",
           "best_per_algorithm", "device_from_row", "fastest"]
