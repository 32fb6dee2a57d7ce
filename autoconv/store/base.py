"""The result-store contract: where tuning results and measurements live. SQLite
(autoconv.store.sqlite) is the one implementation; tests/test_store_conformance.py runs one
conformance class over every implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from autoconv.algorithms import Params
from autoconv.device import DeviceInfo
from autoconv.spec import ConvSpec

STATUS_OK = "ok"
STATUS_COMPILE_FAILED = "compile_failed"
STATUS_LAUNCH_FAILED = "launch_failed"
STATUS_WRONG_RESULT = "wrong_result"
STATUS_TOO_LARGE = "too_large"  # the buffers the config needs exceed the device's memory limits
STATUSES = (STATUS_OK, STATUS_COMPILE_FAILED, STATUS_LAUNCH_FAILED, STATUS_WRONG_RESULT, STATUS_TOO_LARGE)


# A measurement whose spread is wider than this was taken while something else loaded the cores.
UNSTEADY_SPREAD = 0.10


@dataclass(frozen=True)
class TimedConfig:
    """One verified measurement of a config on a layer: what a learned cost model trains on."""

    device: str
    spec: ConvSpec
    algorithm: str
    template_hash: str
    params: Params
    median_ms: float


@dataclass(frozen=True)
class TunedResult(TimedConfig):
    """The best verified config of one algorithm for one layer on one device (one row per
    (device, layer, dtype, algorithm, template hash)), with its spread and the default's time."""

    gflops: float
    rel_error: float
    default_ms: float | None
    trials: int
    spread: float | None = None  # IQR / median of the repeats
    repeats: int | None = None
    autoconv_version: str = ""
    created: str = ""
    verified: bool = True

    @property
    def speedup_vs_default(self) -> float | None:
        return None if not self.default_ms else self.default_ms / self.median_ms

    @property
    def unsteady(self) -> bool:
        """Measured with a spread (IQR / median) wider than UNSTEADY_SPREAD: stored only where no
        steady measurement of its key is, and flagged wherever it is shown."""
        return self.spread is not None and self.spread > UNSTEADY_SPREAD

    def better_than(self, other: "TunedResult") -> bool:
        return self.median_ms < other.median_ms



@runtime_checkable
class ResultStore(Protocol):
    """Contract: writes are atomic (a result or measurement is stored whole or not at all); a
    result is stored only if verified and faster than the stored one for its key; reads return
    only well-formed rows (a damaged one is skipped with a warning, never returned); a store
    opened read-only refuses writes with TuningDBError and never changes its file."""

    path: Any
    readonly: bool

    def record_device(self, info: DeviceInfo) -> None:
        ...

    def record_layer(self, spec: ConvSpec) -> None:
        ...

    def record_measurement(self, device: str, spec: ConvSpec, algorithm: str, template_hash: str,
                           params: Params | None, status: str, median_ms: float, rel_error: float,
                           message: str = "", *, spread: float | None = None, repeats: int | None = None) -> None:
        ...

    def save_result(self, result: TunedResult, *, refresh_default: bool = False, replace: bool = False) -> bool:
        """Store a verified result if it is faster than the stored one for its key (whatever it
        is with `replace`: the tuner's re-timed winner); True when stored. refresh_default stores
        the result's default time even when the stored best stays."""
        ...

    def results(self, device: str | None = None, template_hash: str | None = None,
                layers: Sequence[str] | None = None) -> list[TunedResult]:
        ...

    def devices(self) -> list[dict[str, Any]]:
        ...

    def device(self, fingerprint: str) -> dict[str, Any] | None:
        ...

    def measurements(self, device: str, spec: ConvSpec) -> Iterator[dict[str, Any]]:
        ...

    def timed_configs(self, template_hash: str | None = None) -> list[TimedConfig]:
        """Every verified ("ok") measurement with a time, of every device and layer (optionally of
        one template hash), oldest first; damaged rows and unknown algorithms are skipped."""
        ...

    def merge_from(self, other: "ResultStore") -> tuple[int, int]:
        ...

    def prune(self, *, current_template_hash: str | None = None, device: str | None = None) -> int:
        ...

    def close(self) -> None:
        ...


def best_per_algorithm(results: list[TunedResult], device: str, spec: ConvSpec) -> dict[str, TunedResult]:
    """Each algorithm's stored best for one layer on one device."""
    return {r.algorithm: r for r in results if r.device == device and r.spec == spec}


def fastest(results: list[TunedResult]) -> TunedResult | None:
    """The fastest result; ties broken by algorithm name so the answer does not depend on order."""
    return min(results, key=lambda r: (r.median_ms, r.algorithm), default=None)
