"""One algorithm's Optuna study for one layer on one device: created or resumed from a journal
file beside the database (or any Optuna storage several workers share), repaired when its tail is
damaged, trials owned by a live worker left alone, the default config measured first, invalid
configs never compiled, and no config measured twice by the workers sharing the study."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import stat
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from autoconv.algorithms import Params, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError, TuningDBError
from autoconv.spec import ConvSpec

INF = float("inf")
# The default config is measured first; a run killed while measuring it tries it again this often.
DEFAULT_ATTEMPTS = 2
MAX_CONSECUTIVE_INVALID = 500
# A worker refreshes the "alive_at" stamp of its in-flight trials this often (seconds); a trial
# owned on another host whose stamp is older than STALE_AFTER_S is judged dead (its worker was
# killed or lost), since another host's process cannot be asked directly.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
# A RUNNING trial with no owner yet is a worker's trial between `ask` and the line that names its
# owner, or one left by a worker killed in that instant (or by an older autoconv): dead only once
# it is older than this.
OWNERLESS_GRACE_S = 10.0


def journal_path(db_path: Path) -> Path:
    """The Optuna journal beside the DB: studies survive a killed run there."""
    return db_path.with_name(db_path.name + ".optuna.journal")


def study_name(device: DeviceInfo, spec: ConvSpec, algorithm: str, templates: str) -> str:
    """Readable in optuna-dashboard (algorithm and layer), unique through a hash of the whole key."""
    readable = f"{device.fingerprint()}|{spec.key()}|{spec.dtype}|{algorithm}|{templates}"
    return f"autoconv {algorithm} {spec} #{hashlib.sha256(readable.encode()).hexdigest()[:16]}"


SQLITE_MAGIC = b"SQLite format 3\x00"
JOURNAL_START = b'{"op_code":'  # how Optuna begins every journal entry


def is_journal_entry(line: bytes) -> bool:
    """Whether one line is a whole Optuna journal entry (a JSON object with its op_code)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(entry, dict) and "op_code" in entry


def refuse_unless_journal(path: Path, what: str) -> None:
    """Raise unless `path` is absent, an empty regular file, or an Optuna journal (its first entry
    whole, or torn only by a kill mid-write). Reads at most 64 KiB and never writes: a tuning
    database, a FIFO or a user's text file given by mistake stays as it was."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TuningDBError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise TuningDBError(f"{what}: {path} is a directory; give the journal file's path")
    if not stat.S_ISREG(mode):
        raise TuningDBError(f"{what}: {path} is not a regular file (a FIFO, socket or device): give a new file's "
                            "path or an existing Optuna journal")
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError as exc:
        raise TuningDBError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        return
    first, newline, _ = head.partition(b"\n")
    if newline:
        if is_journal_entry(first):
            return
    elif head.startswith(JOURNAL_START) or JOURNAL_START.startswith(head):
        return  # a journal whose first entry was torn: repair keeps nothing and sets it aside
    kind = "an SQLite database (a tuning database?)" if head.startswith(SQLITE_MAGIC) else "not an Optuna journal"
    hint = f"; for an Optuna SQLite storage write sqlite:///{path}" if head.startswith(SQLITE_MAGIC) else ""
    raise TuningDBError(f"{what}: {path} is {kind}, and is left untouched: give a new file's path, an existing "
                        f"Optuna journal or a storage URL{hint}")


def repair_journal(path: Path) -> Path | None:
    """Keep the valid prefix of an Optuna journal and move a damaged tail (a torn last line after
    a power loss or full disk, or garbage) aside, under the journal's own lock. Returns where the
    tail went, or None when the journal was whole."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file():
        return None
    refuse_unless_journal(path, "journal")
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        valid = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n") or not is_journal_entry(line):
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
    return journal_file_storage(journal_path(db_path))


# Optuna's RDB dialects and the package that drives each (what to install when it is missing).
STORAGE_OPEN_ATTEMPTS = 3
STORAGE_DRIVERS = {"postgresql": "psycopg: pip install 'psycopg[binary]' (autoconv's [postgres] extra)", "mysql": "PyMySQL",
                   "sqlite": "nothing (built in)"}


def check_storage(storage: str) -> str:
    """The storage's URL scheme ("" for a journal file path), or TuningDBError for a storage that
    cannot be used: checked before any work, connecting to nothing and writing nothing."""
    if "://" not in storage:
        refuse_unless_journal(Path(storage).expanduser(), "--storage")
        return ""
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in STORAGE_DRIVERS:
        raise TuningDBError(f"--storage: expected a postgresql://, mysql:// or sqlite:/// URL or a journal file "
                            f"path, got a {scheme}:// URL")
    return scheme


def open_storage(storage: str) -> Any:
    """An Optuna storage several tuners can share: a database URL (postgresql://, mysql://,
    sqlite:///) or the path of a journal file, e.g. on a shared filesystem."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scheme = check_storage(storage)
    if not scheme:
        path = Path(storage).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TuningDBError(f"--storage: cannot create {path.parent}: {exc.strerror or exc}") from None
        return journal_file_storage(path)
    failure: Exception | None = None
    # Workers starting together on a new database race to create Optuna's tables, and all but
    # one fail; a second try finds the tables there.
    for attempt in range(STORAGE_OPEN_ATTEMPTS):
        try:
            # pool_pre_ping: a worker that waited long on a build finds a dropped connection renewed.
            return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        except ImportError:
            raise TuningDBError(f"--storage: the {scheme} driver is missing; install {STORAGE_DRIVERS[scheme]}") from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises its own OperationalError and friends
            failure = exc
            time.sleep(0.5 * (attempt + 1))
    reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    # The driver's message may quote the URL, or the tail of a password with an unescaped '@'.
    reason = without_password(reason, storage)
    for secret in url_secrets(storage):
        pieces = secret.split("@")
        for i in range(1, len(pieces)):  # what a driver reads as the host part, and the password's start
            tail, head = "@".join(pieces[i:]), "@".join(pieces[:i])
            reason = reason.replace(f"{tail}@", "***@").replace(f":{head}@", ":***@")
            for fragment in (tail, head):
                if len(fragment) >= 4:  # shorter ones would mask unrelated text
                    reason = reason.replace(fragment, "***")
    raise TuningDBError(f"--storage: cannot open the Optuna storage at {without_password(storage)}: {reason}")


PASSWORD_KEYS = ("password", "passwd", "pwd", "pass")


def url_secrets(url: str) -> list[str]:
    """The passwords in a storage URL (its credentials and password= query values), raw and
    percent-decoded, longest first."""
    from urllib.parse import parse_qsl, unquote

    scheme, _, rest = url.partition("://")
    found = []
    credentials, at, _ = rest.partition("/")[0].rpartition("@") if "@" in rest.partition("?")[0] else ("", "", "")
    if at and ":" in credentials:
        found.append(credentials.split(":", 1)[1])
    query = rest.partition("?")[2]
    found += [value for key, value in parse_qsl(query, keep_blank_values=True) if key.lower() in PASSWORD_KEYS]
    found += [part.split("=", 1)[1] for part in query.split("&")
              if "=" in part and part.split("=", 1)[0].lower() in PASSWORD_KEYS]
    secrets = {s for v in found for s in (v, unquote(v)) if s}
    return sorted(secrets, key=len, reverse=True)


def without_password(text: str, url: str | None = None) -> str:
    """Text fit to print: every password of the storage URL (`url`, else `text` itself) masked."""
    for secret in url_secrets(url if url is not None else text):
        text = text.replace(secret, "***")
    return text


def journal_file_storage(path: Path) -> Any:
    """An Optuna journal file as a storage, repaired first."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        repair_journal(path)
        return JournalStorage(JournalFileBackend(str(path)))
    except TuningDBError:
        raise
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


def owner_is_dead(worker: Any, alive_at: Any = None, now: float | None = None, started: Any = None) -> bool:
    """True when the process that owns a RUNNING trial is certainly gone. A trial without an owner
    counts as dead once `started` (a datetime) is OWNERLESS_GRACE_S old. On this host the process
    itself is asked; one on another host is dead when its heartbeat (`alive_at`, wall-clock
    seconds) is older than STALE_AFTER_S, and never judged when it has none."""
    now = time.time() if now is None else now
    if not isinstance(worker, dict):
        return not isinstance(started, _dt.datetime) or now - started.timestamp() > OWNERLESS_GRACE_S
    if worker.get("host") != socket.gethostname():
        if not isinstance(alive_at, (int, float)):
            return False
        return now - alive_at > STALE_AFTER_S
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


class Heartbeat:
    """Refreshes the "alive_at" stamp of this worker's in-flight trials every HEARTBEAT_S seconds,
    so that workers on other hosts can tell a slow trial from a dead worker's."""

    def __init__(self, interval_s: float = HEARTBEAT_S) -> None:
        self.interval_s = interval_s
        self._trials: dict[int, Any] = {}  # id() of an in-flight optuna Trial -> the trial
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, trial: Any) -> None:
        with self._lock:
            self._trials[id(trial)] = trial
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="autoconv-heartbeat", daemon=True)
                self._thread.start()

    def untrack(self, trial: Any) -> None:
        with self._lock:
            self._trials.pop(id(trial), None)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                trials = list(self._trials.values())
            for trial in trials:
                try:
                    trial.set_user_attr("alive_at", time.time())
                except Exception:  # noqa: BLE001 - finished meanwhile, or the storage is briefly away
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Proposal:
    """A trial asked of the study with its valid config; `known` is its outcome when it was
    measured before, here or by another worker (status, ms, relative error)."""

    trial: Any
    params: Params
    known: tuple[str, float, float] | None


class AlgorithmStudy:
    """The study of one tunable algorithm on one layer: resume, default first, then what the
    tuner queues (enqueue_first: the cost model's picks, warm-start seeds), then TPE."""

    def __init__(self, storage: Any, device: DeviceInfo, spec: ConvSpec, algorithm: str, templates: str,
                 default: Params, *, seed: int = 0, heartbeat: Heartbeat | None = None, sampler: str = "tpe") -> None:
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
            # constant_liar: trials asked ahead (the build pool) or by other workers, still
            # running, count as bad so TPE proposes elsewhere.
            if sampler == "random":  # the baseline a search strategy must beat (scripts/bench_tuning.py)
                self.study.sampler = optuna.samplers.RandomSampler(seed=seed + len(previous))
            elif sampler == "tpe":
                self.study.sampler = optuna.samplers.TPESampler(seed=seed + len(previous), multivariate=True,
                                                                group=True, n_startup_trials=8, constant_liar=True)
            else:
                raise InvalidParamsError(f"sampler: expected 'tpe' or 'random', got {sampler!r}")
        self.resumed = bool(existed and previous)
        if not self.resumed:
            self.study.set_user_attr("layer", spec.key())
            self.study.set_user_attr("algorithm", algorithm)
            self.study.set_user_attr("device", device.fingerprint())
            self.study.set_user_attr("template_hash", templates)
        self.heartbeat = heartbeat
        self.known: dict[Params, tuple[str, float, float]] = {}
        self.completed = 0
        # Best time after each completed trial, in order: what early stopping judges.
        self.best_after: list[float] = []
        self.skipped_invalid = 0
        self.skipped_duplicate = 0
        self._sync(previous)
        default_trials = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("default")]
        pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in default_trials)
        killed = sum(1 for t in default_trials if t.state == TrialState.FAIL)
        # The default is measured first; a run killed while measuring it tries it once more, so
        # "tuned vs default" is never silently missing.
        if self.default not in self.known and not pending and killed < DEFAULT_ATTEMPTS:
            self.study.enqueue_trial(self.space.sampled_values(self.default), user_attrs={"default": True})

    def enqueue_first(self, configs: Sequence[Params], tag: str) -> int:
        """Queue configs to be proposed next, in order (before the sampler's own), each marked with
        the user attribute `tag`: those neither measured yet nor already queued (by this worker or
        another sharing the study). Returns how many were queued."""
        from optuna.trial import TrialState

        queued = set()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                queued.add(self.space.canonical(self.space.validate(trial.system_attrs.get("fixed_params", {}))))
            except InvalidParamsError:
                continue
        count = 0
        for params in configs:
            params = self.space.canonical(params)
            if params in self.known or params in queued:
                continue
            self.study.enqueue_trial(self.space.sampled_values(params), user_attrs={tag: True})
            queued.add(params)
            count += 1
        return count

    def _sync(self, trials: Sequence[Any]) -> None:
        """Take in the study as the storage holds it now (other workers' trials included): fail the
        trials whose worker is dead, and recount the completed trials, the known outcomes and the
        best-so-far curve."""
        from optuna.trial import TrialState

        now = time.time()
        # A trial left RUNNING by a killed worker is over: it may be the config that killed it, so
        # it is failed rather than retried. A trial a live worker is measuring is left alone.
        for stale in [t for t in trials if t.state == TrialState.RUNNING
                      and owner_is_dead(t.user_attrs.get("worker"), t.user_attrs.get("alive_at"), now, t.datetime_start)]:
            try:
                self.study.tell(stale.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):
                pass  # its owner finished it meanwhile
        completed, running, best_after = 0, INF, []
        for t in sorted(trials, key=lambda t: t.number):
            if t.state != TrialState.COMPLETE:
                continue
            completed += 1
            value = t.value if isinstance(t.value, (int, float)) else INF
            if "status" in t.user_attrs:
                try:
                    params = self.space.validate(t.params)
                except InvalidParamsError:
                    params = None  # a journal entry this version cannot use
                if params is not None:
                    self.known.setdefault(params, (str(t.user_attrs["status"]), value,
                                                   t.user_attrs.get("rel_error") or INF))
            if math.isfinite(value):
                running = min(running, value)
            best_after.append(running)
        self.completed, self.best_after = completed, best_after

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

    def propose(self) -> Proposal | None:
        """Ask the study for a valid config not being measured by another trial. Invalid configs
        are failed unmeasured (never compiled, never learned from); a config another worker is
        measuring right now is failed as a duplicate. None when the sampler keeps proposing such
        configs."""
        from optuna.trial import TrialState

        for _ in range(MAX_CONSECUTIVE_INVALID):
            trial = self.study.ask()
            trial.set_user_attr("worker", worker_identity())
            trial.set_user_attr("alive_at", time.time())
            params = self.space.suggest(trial, self.limits)
            if params.violations(self.limits, self.spec):
                trial.set_user_attr("status", "invalid")
                self.study.tell(trial, state=TrialState.FAIL)
                self.skipped_invalid += 1
                continue
            # Every worker writes its config before looking at the others', so of two workers
            # proposing one config at once at least one sees the other: it is never measured twice.
            trials = self.study.get_trials(deepcopy=False)
            self._sync(trials)
            if params not in self.known and any(
                    t.number != trial.number and t.state == TrialState.RUNNING and self._params_of(t) == params
                    for t in trials):
                trial.set_user_attr("status", "duplicate")
                self.study.tell(trial, state=TrialState.FAIL)
                self.skipped_duplicate += 1
                continue
            if self.heartbeat is not None:
                self.heartbeat.track(trial)
            return Proposal(trial, params, self.known.get(params))
        return None

    def _params_of(self, trial: Any) -> Params | None:
        try:
            return self.space.validate(trial.params)
        except InvalidParamsError:
            return None  # still being suggested, or from another version

    def conclude(self, proposal: Proposal, status: str, ms: float, error: float, *, measured: bool) -> None:
        """Tell the study a proposal's outcome."""
        if self.heartbeat is not None:
            self.heartbeat.untrack(proposal.trial)
        self.known.setdefault(proposal.params, (status, ms, error))
        try:
            proposal.trial.set_user_attr("status", status)
            proposal.trial.set_user_attr("rel_error", error if math.isfinite(error) else None)
            proposal.trial.set_user_attr("measured", measured)
            self.study.tell(proposal.trial, ms)
        except (RuntimeError, ValueError):
            return  # another worker judged this trial dead and failed it; the measurement is in the DB
        self.completed += 1
        self.best_after.append(min(self.best_after[-1] if self.best_after else INF,
                                   ms if status == "ok" and math.isfinite(ms) else INF))

    def abandon(self, proposal: Proposal) -> None:
        """Fail a proposal that will not be measured (the budget ran out while it waited)."""
        from optuna.trial import TrialState

        if self.heartbeat is not None:
            self.heartbeat.untrack(proposal.trial)
        try:
            proposal.trial.set_user_attr("status", "not measured")
            self.study.tell(proposal.trial, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            pass
