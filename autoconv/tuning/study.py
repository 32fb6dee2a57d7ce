"""One algorithm's Optuna study for one layer on one device: created or resumed from a journal
file beside the database, repaired when its tail is damaged, trials owned by a live process left
alone, the default config measured first, invalid configs never compiled."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from autoconv.algorithms import Params, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError, TuningDBError
from autoconv.spec import ConvSpec

INF = float("inf")
# The default config is measured first; a run killed while measuring it tries it again this often.
DEFAULT_ATTEMPTS = 2
MAX_CONSECUTIVE_INVALID = 500


def journal_path(db_path: Path) -> Path:
    """The Optuna journal beside the DB: studies survive a killed run there."""
    return db_path.with_name(db_path.name + ".optuna.journal")


def study_name(device: DeviceInfo, spec: ConvSpec, algorithm: str, templates: str) -> str:
    """Readable in optuna-dashboard (algorithm and layer), unique through a hash of the whole key."""
    readable = f"{device.fingerprint()}|{spec.key()}|{spec.dtype}|{algorithm}|{templates}"
    return f"autoconv {algorithm} {spec} #{hashlib.sha256(readable.encode()).hexdigest()[:16]}"


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


def journal_storage(db_path: Path) -> Any:
    """The Optuna storage of a database's studies: its journal file, repaired first."""
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


class AlgorithmStudy:
    """The study of one tunable algorithm on one layer: resume, default first, then TPE."""

    def __init__(self, storage: Any, device: DeviceInfo, spec: ConvSpec, algorithm: str, templates: str,
                 default: Params, *, seed: int = 0, seeds: Sequence[Params] = ()) -> None:
        import optuna
        from optuna.trial import TrialState

        self.algorithm, self.device, self.spec = algorithm, device, spec
        self.space = get_algorithm(algorithm).space
        self.limits = device.limits()
        self.default = self.space.canonical(default)
        name = study_name(device, spec, algorithm, templates)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            existed = name in optuna.study.get_all_study_names(storage)
            self.study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
            previous = self.study.get_trials(deepcopy=False)
            self.study.sampler = optuna.samplers.TPESampler(seed=seed + len(previous), multivariate=True, group=True,
                                                            n_startup_trials=8)
        self.resumed = bool(existed and previous)
        if not self.resumed:
            self.study.set_user_attr("layer", spec.key())
            self.study.set_user_attr("algorithm", algorithm)
            self.study.set_user_attr("device", device.fingerprint())
            self.study.set_user_attr("template_hash", templates)
        # A trial left RUNNING by a killed run is over: it may be the config that killed it, so it
        # is failed rather than retried. A trial another live tuner is measuring is left alone.
        for stale in [t for t in previous if t.state == TrialState.RUNNING and owner_is_dead(t.user_attrs.get("worker"))]:
            try:
                self.study.tell(stale.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):
                pass  # its owner finished it meanwhile
        self.known: dict[Params, tuple[str, float, float]] = {}
        for t in previous:
            if t.state == TrialState.COMPLETE and "status" in t.user_attrs:
                try:
                    params = self.space.validate(t.params)
                except InvalidParamsError:
                    continue  # a journal entry this version cannot use
                value = t.value if isinstance(t.value, (int, float)) else INF
                self.known[params] = (str(t.user_attrs["status"]), value, t.user_attrs.get("rel_error") or INF)
        self.completed = sum(1 for t in previous if t.state == TrialState.COMPLETE)
        default_trials = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("default")]
        pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in default_trials)
        killed = sum(1 for t in default_trials if t.state == TrialState.FAIL)
        # The default is measured first; a run killed while measuring it tries it once more, so
        # "tuned vs default" is never silently missing.
        if self.default not in self.known and not pending and killed < DEFAULT_ATTEMPTS:
            self.study.enqueue_trial(self.space.sampled_values(self.default), user_attrs={"default": True})
        # A new study starts from the winners of similar layers (warm start), right after its default.
        self.seeded = 0
        if not self.resumed:
            for params in seeds:
                self.study.enqueue_trial(self.space.sampled_values(params), user_attrs={"warm_start": True})
                self.seeded += 1
        # Best time after each completed trial, in order: what early stopping judges.
        self.best_after: list[float] = []
        running = INF
        for t in sorted(previous, key=lambda t: t.number):
            if t.state == TrialState.COMPLETE and isinstance(t.value, (int, float)) and math.isfinite(t.value):
                running = min(running, t.value)
            if t.state == TrialState.COMPLETE:
                self.best_after.append(running)
        self.skipped_invalid = 0

    def stalled(self, window: int, min_gain: float) -> bool:
        """True when the last `window` trials improved the best by no more than `min_gain` (a
        fraction): the study has converged and its budget is better spent elsewhere."""
        if len(self.best_after) <= window:
            return False
        before, now = self.best_after[-window - 1], self.best_after[-1]
        return math.isfinite(before) and now >= before * (1 - min_gain)

    def default_ms(self) -> float | None:
        status, ms, _ = self.known.get(self.default, ("", INF, INF))
        return ms if status == "ok" and math.isfinite(ms) else None

    def best(self) -> tuple[Params, float, float] | None:
        ok = [(p, ms, err) for p, (status, ms, err) in self.known.items() if status == "ok" and math.isfinite(ms)]
        return min(ok, key=lambda item: item[1], default=None)

    def step(self, measure: Callable[[Params], tuple[str, float, float, str]]) -> tuple[Params, str, float, float, str, bool] | None:
        """Ask for one valid config, measure it (or reuse a known outcome), tell the study.
        Returns (params, status, ms, rel_error, message, measured_now), or None when the sampler
        keeps proposing invalid configs."""
        from optuna.trial import TrialState

        for _ in range(MAX_CONSECUTIVE_INVALID):
            trial = self.study.ask()
            trial.set_user_attr("worker", worker_identity())
            params = self.space.suggest(trial, self.limits)
            if params.violations(self.limits, self.spec):
                # Never compiled, never learned from: samplers skip FAIL trials.
                trial.set_user_attr("status", "invalid")
                self.study.tell(trial, state=TrialState.FAIL)
                self.skipped_invalid += 1
                continue
            known = self.known.get(params)
            measured_now = known is None
            if known is None:
                status, ms, error, message = measure(params)
                self.known[params] = (status, ms, error)
            else:
                (status, ms, error), message = known, ""
            try:
                trial.set_user_attr("status", status)
                trial.set_user_attr("rel_error", error if math.isfinite(error) else None)
                self.study.tell(trial, ms)
            except (RuntimeError, ValueError):
                pass  # another process judged this trial dead and failed it; the measurement is in the DB
            self.completed += 1
            self.best_after.append(min(self.best_after[-1] if self.best_after else INF,
                                       ms if status == "ok" and math.isfinite(ms) else INF))
            return params, status, ms, error, message, measured_now
        return None
