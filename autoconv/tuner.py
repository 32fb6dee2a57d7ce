"""The autotuner: one Optuna study per (device, layer, dtype, algorithm, template hash).

Each trial: sample params → check the device's constraints (an invalid config is never compiled,
and is told to Optuna as FAIL, which its samplers ignore) → compile → verify against the float64
reference on a NaN-poisoned output → time (warm-up, repeats, rotated inputs, median, events).
Failures are outcomes with a status and an infinite time, never exceptions. Every measurement is
written to the tuning DB as it is made, and the study lives in an Optuna journal file beside the
DB, so a killed run loses nothing and the next run resumes it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import socket
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from autoconv.backends import get_backend
from autoconv.backends.base import Backend, DeviceInfo
from autoconv.compare import TOLERANCE, random_operands, reference_output, relative_error
from autoconv.errors import (
    InvalidParamsError,
    KernelCompileError,
    KernelLaunchError,
    ResourceLimitError,
    TuningDBError,
)
from autoconv.params import GEMM_PARAMS, DeviceLimits, GemmParams, validate_gemm_params
from autoconv.plan import Plan, heuristic_gemm_params
from autoconv.render import ALGORITHM_IM2COL_BLAS, ALGORITHM_IM2COL_GEMM, template_hash
from autoconv.spec import ConvSpec
from autoconv.tuning_db import (
    STATUS_COMPILE_FAILED,
    STATUS_LAUNCH_FAILED,
    STATUS_OK,
    STATUS_TOO_LARGE,
    STATUS_WRONG_RESULT,
    TunedResult,
    TuningDB,
)

INF = float("inf")
# Sampled first; VW only matters when a tile is staged, PADA/PADB only for their staged tile.
_ALWAYS_SAMPLED = ("MWG", "NWG", "KWG", "WPTM", "WPTN", "VWN", "UNROLL", "SA", "SB", "B_TRANSPOSED", "IM2COL_ROWS")
_MAX_CONSECUTIVE_INVALID = 500
# A baseline is stored only when its spread (IQR / median) is below this: a measurement taken while
# something else loaded the cores must not decide which plan is served.
MAX_BASELINE_SPREAD = 0.10
BASELINE_ROUNDS = 3
# The default config is measured first; a run killed while measuring it tries it again this often.
DEFAULT_ATTEMPTS = 2


@dataclass(frozen=True)
class Outcome:
    """What measuring one config gave: status ok with a median time, or a failure with inf."""

    status: str
    median_ms: float
    rel_error: float = INF
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


class Evaluator(Protocol):
    """Measures configs of one layer on one device (replaced by a fake in the tuner's tests)."""

    def __call__(self, params: GemmParams) -> Outcome:
        ...

    def baseline(self) -> tuple[str, float]:
        """The library-BLAS baseline for the same layer: (name, median ms)."""
        ...


class DeviceEvaluator:
    """Measures configs on a real backend against the float64 reference."""

    def __init__(self, backend: Backend, spec: ConvSpec, *, repeats: int = 7, warmup: int = 2, seed: int = 0) -> None:
        self.backend, self.spec, self.repeats, self.warmup = backend, spec, repeats, warmup
        self.operands = random_operands(spec, seed)
        self.reference = reference_output(spec, self.operands)

    def __call__(self, params: GemmParams) -> Outcome:
        plan = Plan(ALGORITHM_IM2COL_GEMM, params, "tuning")
        try:
            conv = self.backend.prepare(self.spec, plan)
        except KernelCompileError as exc:
            return Outcome(STATUS_COMPILE_FAILED, INF, INF, str(exc))
        except ResourceLimitError as exc:
            return Outcome(STATUS_TOO_LARGE, INF, INF, str(exc))
        try:
            error = relative_error(conv.run(*self.operands, poison=True), self.reference)
            if not error < TOLERANCE:
                return Outcome(STATUS_WRONG_RESULT, INF, error, f"relative error {error:.2e} >= {TOLERANCE:.0e}")
            timing = conv.time(*self.operands, warmup=self.warmup, repeats=self.repeats)
        except KernelLaunchError as exc:
            return Outcome(STATUS_LAUNCH_FAILED, INF, INF, str(exc))
        except ResourceLimitError as exc:
            return Outcome(STATUS_TOO_LARGE, INF, INF, str(exc))
        return Outcome(STATUS_OK, timing.median_ms, error)

    def baseline(self) -> tuple[str, float | None]:
        """im2col + the library BLAS: cuBLAS on a backend that has it, else numpy's (OpenBLAS).

        Measured in up to BASELINE_ROUNDS rounds until one's spread is below MAX_BASELINE_SPREAD;
        None when none is (the cores were busy) or the layer does not fit the host."""
        if ALGORITHM_IM2COL_BLAS in self.backend.algorithms:
            backend, name = self.backend, f"{self.backend.name} BLAS"
        else:
            backend, name = get_backend("numpy"), "numpy BLAS"
        try:
            conv = backend.prepare(self.spec, Plan(ALGORITHM_IM2COL_BLAS, None, "baseline"))
            for _ in range(BASELINE_ROUNDS):
                samples = conv.time(*self.operands, warmup=self.warmup, repeats=max(self.repeats, 5)).samples_ms
                if spread(samples) <= MAX_BASELINE_SPREAD:
                    return name, statistics.median(samples)
        except ResourceLimitError as exc:
            warnings.warn(f"autoconv: no {name} baseline for {self.spec}: {exc}", RuntimeWarning, stacklevel=2)
            return name, None
        warnings.warn(f"autoconv: the {name} baseline for {self.spec} varied by more than "
                      f"{MAX_BASELINE_SPREAD:.0%} in {BASELINE_ROUNDS} rounds (busy cores?); it is not stored",
                      RuntimeWarning, stacklevel=2)
        return name, None


def spread(samples: tuple[float, ...] | list[float]) -> float:
    """Interquartile range over the median: how far repeated timings of one thing disagree."""
    if len(samples) < 2:
        return 0.0
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    middle = statistics.median(samples)
    return (quartiles[2] - quartiles[0]) / middle if middle > 0 else INF


def suggest_params(trial: Any, limits: DeviceLimits) -> GemmParams:
    """Sample a config from the declared choices (conditional params only when they matter)."""
    declared = {decl.name: decl for decl in GEMM_PARAMS}
    values: dict[str, int] = {}
    for name in _ALWAYS_SAMPLED:
        choices = declared[name].choices
        if name == "VWN":
            choices = tuple(c for c in choices if c <= limits.max_vector_width)
        values[name] = trial.suggest_categorical(name, choices)
    if values["SA"] or values["SB"]:
        values["VW"] = trial.suggest_categorical("VW", declared["VW"].choices)
    if values["SA"]:
        values["PADA"] = trial.suggest_categorical("PADA", declared["PADA"].choices)
    if values["SB"]:
        values["PADB"] = trial.suggest_categorical("PADB", declared["PADB"].choices)
    return validate_gemm_params(values)


def sampled_values(params: GemmParams) -> dict[str, int]:
    """The subset of a config the study samples (what enqueue_trial takes)."""
    values = {name: getattr(params, name) for name in _ALWAYS_SAMPLED}
    if params.SA or params.SB:
        values["VW"] = params.VW
    if params.SA:
        values["PADA"] = params.PADA
    if params.SB:
        values["PADB"] = params.PADB
    return values


def canonical(params: GemmParams) -> GemmParams:
    """The config with unsampled (irrelevant) params at their defaults: equal kernels compare equal."""
    return validate_gemm_params(sampled_values(params))


def study_name(device: DeviceInfo, spec: ConvSpec, algorithm: str, templates: str) -> str:
    readable = f"{device.fingerprint()}|{spec.key()}|{spec.dtype}|{algorithm}|{templates}"
    return "autoconv-" + hashlib.sha256(readable.encode()).hexdigest()[:24]


def journal_path(db_path: Path) -> Path:
    """The Optuna journal beside the DB: studies survive a killed run there."""
    return db_path.with_name(db_path.name + ".optuna.journal")


@dataclass
class LayerReport:
    """How tuning one layer went; `best` is what the DB now holds for it."""

    label: str
    spec: ConvSpec
    best: TunedResult | None = None
    trials: int = 0
    measured_now: int = 0
    skipped_invalid: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    resumed: bool = False


ProgressCallback = Callable[[LayerReport, int], None]


def repair_journal(path: Path) -> Path | None:
    """Keep the valid prefix of an Optuna journal and move a damaged tail (a torn last line after
    a power loss or full disk, or garbage) aside, under the journal's own lock. Returns where the
    tail went, or None when the journal was whole."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file():
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        valid = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                break
            if not isinstance(entry, dict) or "op_code" not in entry:
                break
            valid += len(line)
        if valid == len(data):
            return None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
        with open(aside, "xb") as tail:
            tail.write(data[valid:])
            tail.flush()
            os.fsync(tail.fileno())
        os.truncate(path, valid)
    finally:
        lock.release()
    warnings.warn(f"autoconv: the Optuna journal {path} had a damaged tail ({len(data) - valid} bytes); the valid "
                  f"part is kept and the tail was moved to {aside}", RuntimeWarning, stacklevel=2)
    return aside


def _storage(db_path: Path) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = journal_path(db_path)
    try:
        repair_journal(path)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise TuningDBError(f"the Optuna journal {path} cannot be used: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - optuna raises plain ValueError/KeyError on a bad replay
        raise TuningDBError(f"the Optuna journal {path} cannot be replayed ({type(exc).__name__}: {exc}); move it "
                            "aside to start its studies afresh (every measurement stays in the database)") from None


def _process_start(pid: int) -> str:
    """The kernel's start time of a process (telling a live process from a reused pid); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def worker_identity() -> dict[str, Any]:
    """Who is measuring a trial: recorded on the trial so another process can tell whether it is alive."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def owner_is_dead(worker: Any) -> bool:
    """True when the process that owns a RUNNING trial is certainly gone. A trial without an owner
    (left by an older autoconv) counts as dead; one owned on another host is never judged here."""
    if not isinstance(worker, dict):
        return True
    if worker.get("host") != socket.gethostname():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return bool(worker.get("start")) and _process_start(pid) != worker.get("start")


def tune_layer(
    spec: ConvSpec,
    device: DeviceInfo,
    evaluate: Evaluator,
    db: TuningDB,
    *,
    trials: int | None = 60,
    deadline: float | None = None,
    label: str = "",
    seed: int = 0,
    storage: Any = None,
    progress: ProgressCallback | None = None,
) -> LayerReport:
    """Run (or resume) the layer's study until it holds `trials` measured trials or the
    monotonic-clock `deadline` passes; returns the report and leaves the best in the DB."""
    import optuna
    from optuna.trial import TrialState

    if trials is None and deadline is None:
        raise InvalidParamsError("tuning needs a budget: a trial count or a time limit")
    started = time.monotonic()
    templates = template_hash()
    algorithm = ALGORITHM_IM2COL_GEMM
    fingerprint, limits = device.fingerprint(), device.limits()
    report = LayerReport(label or str(spec), spec)
    storage = storage if storage is not None else _storage(db.path)
    name = study_name(device, spec, algorithm, templates)
    db.record_device(device)
    db.record_layer(spec)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        existing = [t for t in optuna.study.get_all_study_names(storage) if t == name]
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        previous = study.get_trials(deepcopy=False)
        sampler = optuna.samplers.TPESampler(seed=seed + len(previous), multivariate=True, group=True,
                                             n_startup_trials=8)
        study.sampler = sampler
    report.resumed = bool(existing and previous)
    if not report.resumed:
        study.set_user_attr("layer", spec.key())
        study.set_user_attr("device", fingerprint)
        study.set_user_attr("template_hash", templates)

    # A trial left RUNNING by a killed run is over: it may be the config that killed it, so it
    # is failed rather than retried. A trial another live tuner is measuring is left alone.
    for stale in [t for t in previous if t.state == TrialState.RUNNING and owner_is_dead(t.user_attrs.get("worker"))]:
        try:
            study.tell(stale.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            pass  # its owner finished it meanwhile

    known: dict[GemmParams, Outcome] = {}
    for t in previous:
        if t.state == TrialState.COMPLETE and "status" in t.user_attrs:
            try:
                params = validate_gemm_params(t.params)
            except InvalidParamsError:
                continue  # a journal entry this version cannot use
            value = t.value if isinstance(t.value, (int, float)) else INF
            known[params] = Outcome(str(t.user_attrs["status"]), value, t.user_attrs.get("rel_error") or INF)
    report.trials = sum(1 for t in previous if t.state == TrialState.COMPLETE)

    # The baseline is measured afresh by every run (a stored one may have been taken under load);
    # a noisy measurement falls back to the last steady one, else the layer has no baseline.
    baseline_name, baseline_ms = evaluate.baseline()
    attrs = study.user_attrs
    if baseline_ms is not None:
        study.set_user_attr("baseline", baseline_name)
        study.set_user_attr("baseline_ms", baseline_ms)
    elif isinstance(attrs.get("baseline_ms"), (int, float)) and attrs.get("baseline") == baseline_name:
        baseline_ms = float(attrs["baseline_ms"])

    default = canonical(heuristic_gemm_params(spec, device.device_type, limits))
    default_trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("default")]
    default_pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in default_trials)
    default_killed = sum(1 for t in default_trials if t.state == TrialState.FAIL)
    # The default is measured first; a run killed while measuring it tries it once more, so
    # "tuned vs default" is never silently missing.
    if default not in known and not default_pending and default_killed < DEFAULT_ATTEMPTS:
        study.enqueue_trial(sampled_values(default), user_attrs={"default": True})

    def default_ms() -> float | None:
        outcome = known.get(default)
        return outcome.median_ms if outcome is not None and outcome.ok else None

    def save(params: GemmParams | None, outcome: Outcome) -> None:
        result = TunedResult(
            device=fingerprint, spec=spec, algorithm=algorithm, template_hash=templates, params=params,
            median_ms=outcome.median_ms, gflops=spec.flops / (outcome.median_ms * 1e6),
            rel_error=outcome.rel_error, baseline=baseline_name, baseline_ms=baseline_ms,
            default_ms=default_ms(), trials=report.trials)
        db.save_result(result, refresh_references=True)

    best = min((item for item in known.items() if item[1].ok), key=lambda item: item[1].median_ms, default=None)
    consecutive_invalid = 0
    while True:
        if trials is not None and report.trials >= trials:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        trial = study.ask()
        trial.set_user_attr("worker", worker_identity())
        params = suggest_params(trial, limits)
        broken = params.violations(limits)
        if broken:
            # Never compiled, never learned from: samplers skip FAIL trials.
            trial.set_user_attr("status", "invalid")
            study.tell(trial, state=TrialState.FAIL)
            report.skipped_invalid += 1
            consecutive_invalid += 1
            if consecutive_invalid >= _MAX_CONSECUTIVE_INVALID:
                break
            continue
        consecutive_invalid = 0
        outcome = known.get(params)
        if outcome is None:
            outcome = evaluate(params)
            known[params] = outcome
            report.measured_now += 1
            db.record_measurement(fingerprint, spec, algorithm, templates, params, outcome.status,
                                  outcome.median_ms, outcome.rel_error, outcome.message)
        if not outcome.ok:
            report.failures[outcome.status] = report.failures.get(outcome.status, 0) + 1
        try:
            trial.set_user_attr("status", outcome.status)
            trial.set_user_attr("rel_error", outcome.rel_error if math.isfinite(outcome.rel_error) else None)
            study.tell(trial, outcome.median_ms)
        except (RuntimeError, ValueError):
            # Another process judged this trial dead and failed it; the measurement is in the DB.
            pass
        report.trials += 1
        if outcome.ok and (best is None or outcome.median_ms < best[1].median_ms):
            best = (params, outcome)
            save(params, outcome)
        if progress is not None:
            report.best = _current(db, fingerprint, spec, algorithm, templates)
            progress(report, trials or 0)

    if best is not None:
        save(*best)  # refreshes the trial count and the default time beside the winner
    elif baseline_ms is not None and report.trials:
        # Nothing generated was right: the layer's plan is the baseline.
        save(None, Outcome(STATUS_OK, baseline_ms, 0.0))
    report.best = _current(db, fingerprint, spec, algorithm, templates)
    report.wall_s = time.monotonic() - started
    return report


def _current(db: TuningDB, fingerprint: str, spec: ConvSpec, algorithm: str, templates: str) -> TunedResult | None:
    for result in db.results(device=fingerprint, template_hash=templates):
        if result.spec == spec and result.algorithm == algorithm:
            return result
    return None


def tune_layers(
    layers: list[tuple[str, ConvSpec]],
    backend: Backend,
    db: TuningDB,
    *,
    trials: int | None = 60,
    time_budget_s: float | None = None,
    seed: int = 0,
    repeats: int = 7,
    progress: ProgressCallback | None = None,
    on_layer_start: Callable[[str, ConvSpec], None] | None = None,
) -> list[LayerReport]:
    """Tune layers one after another; a time budget is shared out evenly over the layers left."""
    storage = _storage(db.path)
    reports = []
    end = None if time_budget_s is None else time.monotonic() + time_budget_s
    for index, (label, spec) in enumerate(layers):
        if on_layer_start is not None:
            on_layer_start(label, spec)
        deadline = None
        if end is not None:
            deadline = time.monotonic() + max(0.0, end - time.monotonic()) / (len(layers) - index)
        evaluator = DeviceEvaluator(backend, spec, repeats=repeats, seed=seed)
        try:
            reports.append(tune_layer(spec, backend.device, evaluator, db, trials=trials, deadline=deadline,
                                      label=label, seed=seed, storage=storage, progress=progress))
        except OSError as exc:  # the journal became unwritable (read-only, disk full) mid-run
            raise TuningDBError(f"the Optuna journal {journal_path(db.path)} cannot be written: "
                                f"{exc.strerror or exc}") from None
    return reports


__all__ = ["DeviceEvaluator", "Evaluator", "LayerReport", "Outcome", "tune_layer", "tune_layers"]
