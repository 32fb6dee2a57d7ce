"""Distributed tuning on Optuna's storage: `autoconv tune --storage` workers sharing one study on a
real PostgreSQL server (started on localhost by a fixture; skipped with the reason when it cannot
be) and on a shared journal file: every trial in the study once, no config measured twice, the
trials split between the workers, the merged database holding the best; a worker killed with
SIGKILL mid-trial leaves the study intact and the other finishes. Liveness judgements unit-tested."""

import datetime
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoconv.errors import TuningDBError
from autoconv.tuning.study import STALE_AFTER_S, open_storage, owner_is_dead, worker_identity

LAYER = "n=1,c=16,h=12,w=12,k=16,r=3,s=3,pad=1"
ALGORITHM = "implicit_gemm"


def _postgres_bin() -> Path | None:
    packaged = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if packaged:
        return packaged[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on localhost: (bin dir, port, command prefix to run as its user)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server here: bash scripts/install_postgresql.sh")
    root = Path(tempfile.mkdtemp(prefix="autoconv-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the package's postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "autoconv", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        said = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot start PostgreSQL: {exc} {said.decode(errors='replace')[-300:]}")
    try:
        yield bindir, port, run_as
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres, request):
    """A fresh database on the server for one test."""
    bindir, port, run_as = postgres
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:50]
    subprocess.run([*run_as, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "autoconv", name],
                   check=True, capture_output=True, timeout=60)
    return f"postgresql://autoconv@127.0.0.1:{port}/{name}"


def _worker(storage: str, db: Path, trials: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "autoconv.cli", "tune", LAYER, "--algorithm", ALGORITHM, "--trials", str(trials),
               "--repeats", "1", "--no-early-stop", "--no-warm-start", "--storage", storage, "--db", str(db)]
    env = {**os.environ, "AUTOCONV_SHIPPED_DB_DIR": ""}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _the_study(storage: str) -> optuna.Study:
    loaded = open_storage(storage)
    names = optuna.study.get_all_study_names(loaded)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=loaded)


def _params(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


def _stored_best(db: Path) -> float:
    with sqlite3.connect(db) as connection:
        return connection.execute("select min(median_ms) from results where algorithm = ?", (ALGORITHM,)).fetchone()[0]


def _check_shared_study(storage: str, dbs: list[Path], pids: list[int], trials: int, tmp_path: Path) -> None:
    study = _the_study(storage)
    all_trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in all_trials if t.state == TrialState.RUNNING]
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= trials
    measured = [t for t in complete if t.user_attrs.get("measured")]
    assert len({_params(t) for t in measured}) == len(measured), "a config was measured twice"
    by_worker = {pid: sum(1 for t in measured if t.user_attrs["worker"]["pid"] == pid) for pid in pids}
    assert all(count > 0 for count in by_worker.values()), f"the trials were not split: {by_worker}"
    # Each worker stored its own results; merged, the best of them is kept, not re-measured.
    merged = tmp_path / "merged.db"
    said = subprocess.run([sys.executable, "-m", "autoconv.cli", "db", "merge", *map(str, dbs), "--db", str(merged)],
                          capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stdout + said.stderr
    assert _stored_best(merged) == min(_stored_best(db) for db in dbs)
    with sqlite3.connect(merged) as connection:
        assert connection.execute("select count(*) from measurements").fetchone()[0] == 0


def _run_two_workers(storage: str, tmp_path: Path, trials: int) -> None:
    dbs = [tmp_path / f"worker{i}.db" for i in range(2)]
    workers = [_worker(storage, db, trials) for db in dbs]
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, out + err
        assert "Traceback" not in err
    _check_shared_study(storage, dbs, [w.pid for w in workers], trials, tmp_path)


def test_two_workers_share_one_study_on_postgresql(postgres_url, tmp_path):
    _run_two_workers(postgres_url, tmp_path, trials=14)


def test_two_workers_share_one_study_on_a_journal_file(tmp_path):
    _run_two_workers(str(tmp_path / "shared" / "studies.journal"), tmp_path, trials=14)


def test_a_worker_killed_mid_trial_leaves_the_study_intact(postgres_url, tmp_path):
    trials = 18
    dbs = [tmp_path / "killed.db", tmp_path / "survivor.db"]
    victim = _worker(postgres_url, dbs[0], trials)
    survivor = _worker(postgres_url, dbs[1], trials)
    in_flight = None
    deadline = time.monotonic() + 120
    while in_flight is None and time.monotonic() < deadline and victim.poll() is None:
        try:
            study = _the_study(postgres_url)
        except AssertionError:  # not created yet
            time.sleep(0.05)
            continue
        in_flight = next((t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                          if t.user_attrs.get("worker", {}).get("pid") == victim.pid), None)
    assert in_flight is not None, "the victim never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, out + err
    study = _the_study(postgres_url)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert TrialState.RUNNING not in states.values(), "a dead worker's trial is still running"
    assert states[in_flight] in (TrialState.FAIL, TrialState.COMPLETE)
    assert sum(1 for s in states.values() if s == TrialState.COMPLETE) >= trials


def test_liveness_of_a_running_trials_owner():
    now = time.time()
    me = worker_identity()
    assert not owner_is_dead(me, now, now)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert owner_is_dead({**me, "pid": dead.pid}, now, now)
    # Another host's process cannot be asked: its heartbeat decides, and without one it is left alone.
    elsewhere = {**me, "host": me["host"] + "-elsewhere"}
    assert not owner_is_dead(elsewhere, now - STALE_AFTER_S / 2, now)
    assert owner_is_dead(elsewhere, now - STALE_AFTER_S - 1, now)
    assert not owner_is_dead(elsewhere, None, now)
    # No owner yet: a trial between `ask` and naming its owner, unless it is old.
    assert not owner_is_dead(None, None, now, datetime.datetime.now())
    assert owner_is_dead(None, None, now, datetime.datetime.now() - datetime.timedelta(minutes=5))


@pytest.mark.parametrize("url, expected", [
    ("redis://localhost/0", "expected a postgresql://"),
    ("postgresql://someone:secret@127.0.0.1:1/none", "cannot open the Optuna storage at postgresql://someone:***@"),
])
def test_a_bad_storage_is_one_line(url, expected):
    with pytest.raises(TuningDBError, match=expected.replace("*", r"\*").replace("/", "/")) as caught:
        open_storage(url)
    assert "secret" not in str(caught.value)
