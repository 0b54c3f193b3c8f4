"""`arena tune-head --storage postgresql://...` against a real PostgreSQL server, and the storage heartbeat.

A throwaway server (initdb + postgres on a free localhost port, trust authentication, its socket and data in a
temporary folder) serves the module; it is stopped and its folder removed afterwards, whatever happens. Without
PostgreSQL's binaries the tests fail with what to install -- CI must run them -- unless ARENA_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from _head_world import FAST, copy_split

import arena.study_storage as study_storage
from arena.models_folder import BEST_HEAD_FILE
from arena.study import run_study
from arena.study_storage import create_storage, recover_stale_trials

INSTALL = ("install PostgreSQL (Debian/Ubuntu: apt-get install -y postgresql) and the dev extra (pip install -c "
           "constraints.txt -e '.[dev]'), or set ARENA_SKIP_POSTGRES=1 to skip these tests")


def _server_bin() -> Path | None:
    """The folder holding initdb and postgres: initdb's on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = [Path(found).resolve().parent] if (found := shutil.which("initdb")) else []
    debian = sorted((p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    return next((d for d in on_path + debian if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged(folder: Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root, the command prefix that runs it as `postgres` (or `nobody`),
    owner of ``folder``; otherwise none."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    os.chown(folder, user.pw_uid, user.pw_gid)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict]:
    """A running server with an empty database ``optuna``: {"url", "version"}."""
    if os.environ.get("ARENA_SKIP_POSTGRES") == "1":
        pytest.skip("ARENA_SKIP_POSTGRES=1")
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.fail(f"PostgreSQL's initdb and postgres were not found on PATH or in /usr/lib/postgresql: {INSTALL}.")
    try:
        import psycopg
    except ImportError:
        pytest.fail(f"the PostgreSQL driver psycopg is not installed: {INSTALL}.")
    root = Path(tempfile.mkdtemp(prefix="arena-pg-"))  # not under pytest's tmp_path: its parents are root-only
    log = root / "server.log"
    server = None
    try:
        as_user = _unprivileged(root)
        run = {"cwd": root, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "timeout": 120}
        done = subprocess.run([*as_user, bin_dir / "initdb", "-D", root / "data", "-A", "trust", "-U", "arena",
                               "-E", "UTF8", "--no-sync"], **run)
        assert done.returncode == 0, done.stdout[-2000:]
        port = _free_port()
        with log.open("w") as out:  # durability is of no use in a throwaway server: fsync and friends off
            server = subprocess.Popen([*as_user, bin_dir / "postgres", "-D", root / "data", "-p", str(port),
                                       "-k", root, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                       "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                                      cwd=root, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="arena", dbname="postgres",
                                       connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the PostgreSQL server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        with conn:
            conn.execute("CREATE DATABASE optuna")
            version = conn.execute("SHOW server_version").fetchone()[0]
        yield {"url": f"postgresql://arena@127.0.0.1:{port}/optuna", "version": version}
    finally:
        if server is not None:
            server.send_signal(signal.SIGQUIT)  # "immediate" shutdown: nothing in it is worth a checkpoint
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


# Each worker imports everything first and waits for the test's signal. The victim blocks inside its first trial
# (the test kills it there with SIGKILL); the survivor starts its second trial's training only once the victim is
# dead, so the kill always falls in the middle of a study that goes on.
WORKER = """
import os, pathlib, sys, time
import arena.study
from arena.cli import main
flags, role = pathlib.Path(sys.argv[1]), sys.argv[2]
real, calls = arena.study.train_head, []

def wait_for(name):
    deadline = time.monotonic() + 120
    while not (flags / name).exists() and time.monotonic() < deadline:
        time.sleep(0.01)

def train_head(*args, **kwargs):
    calls.append(1)
    if role == "victim":
        (flags / "victim-in-trial").touch()
        time.sleep(600)
    if len(calls) == 2:
        wait_for("victim-killed")
    return real(*args, **kwargs)

arena.study.train_head = train_head
(flags / f"ready-{role}").touch()
wait_for("go")
sys.argv = ["arena", *sys.argv[3:]]
main()
"""


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, f"a worker ended early (exit {p.returncode}): {p.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.02)


def test_two_workers_on_postgres_one_killed_mid_trial(postgres, setup, tmp_path):
    """Two `arena tune-head` workers start together on a new PostgreSQL database (both create its tables) and
    share one study; one is killed with SIGKILL inside a trial. The other fails the dead trial, runs its
    parameters again once, and ends the study at exactly --n-trials finished."""
    models = copy_split(setup, tmp_path / "models")
    flags = tmp_path / "flags"
    flags.mkdir()
    n_trials = 3  # the survivor's two trials and the retry of the victim's: the study ends on the retry
    args = ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]), "--models", str(models),
            "--storage", postgres["url"], "--study-name", "pg", "--n-trials", str(n_trials), "--epochs", "3",
            "--batch-size", "16", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    procs = {role: subprocess.Popen([sys.executable, "-c", WORKER, str(flags), role, *args], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for role in ("victim", "survivor")}
    try:
        for role in procs:
            _wait_for(flags / f"ready-{role}", list(procs.values()))
        (flags / "go").touch()
        _wait_for(flags / "victim-in-trial", list(procs.values()))
        victim = procs["victim"]
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL  # reaped: no zombie left that would still look alive
        (flags / "victim-killed").touch()
        out, err = procs["survivor"].communicate(timeout=300)
        assert procs["survivor"].returncode == 0, err[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    storage = create_storage(postgres["url"])
    assert storage.url.startswith("postgresql+psycopg://")  # a plain postgresql:// uses psycopg 3
    trials = optuna.load_study(study_name="pg", storage=storage).trials
    states = [t.state.name for t in trials]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == n_trials and "RUNNING" not in states, states
    (dead,) = [t for t in trials if t.user_attrs.get("worker", {}).get("pid") == victim.pid]
    assert dead.state.name == "FAIL" and "died while running it" in dead.user_attrs["fail_reason"]
    root = dead.user_attrs.get("retry_of", dead.number)
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == root and t.number > dead.number]
    assert retry.params == dead.params and retry.state.name in ("COMPLETE", "PRUNED")
    assert retry.user_attrs["worker"]["pid"] == procs["survivor"].pid
    assert states.count("FAIL") == 1 and (models / BEST_HEAD_FILE).is_file()
    assert f"study 'pg' ({postgres['url']})" in out


SPACE = {"attn_dim": [64, 128, 256, 512], "dropout": (0.3, 0.7), "lr": (1e-4, 3e-3), "weight_decay": (1e-6, 1e-1),
         "frames": [6, 8], "tta_aug": [False, True], "input_dropout": (0.0, 0.9)}


def _draw(trial: optuna.Trial) -> float:
    for name, choices in SPACE.items():
        if isinstance(choices, list):
            trial.suggest_categorical(name, choices)
        else:
            trial.suggest_float(name, *choices)
    return 0.0


@pytest.mark.parametrize(("kind", "route"), [("sqlite", "optuna"), ("postgresql", "arena")])
def test_heartbeat_recovers_a_trial_of_a_dead_worker_on_another_machine(kind, route, tmp_path, monkeypatch, request):
    """Every database storage beats a heartbeat: the trial of a remote worker that stopped beating (a host name
    the pid check cannot judge) is failed after the grace period and its parameters run again exactly once --
    whether arena's recovery (after each trial) or Optuna's (before each trial) notices first."""
    monkeypatch.setattr(study_storage, "LOCAL_HEARTBEAT", (1, 2))
    monkeypatch.setattr(study_storage, "SERVER_HEARTBEAT", (1, 2))
    url = request.getfixturevalue("postgres")["url"] if kind == "postgresql" else f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name=f"heartbeat-{route}", storage=create_storage(url))
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        dead = study.ask()  # what a worker elsewhere does in study.optimize, up to its last heartbeat
    dead.set_user_attr("worker", {"host": "another-machine", "pid": 1, "start": 0})
    _draw(dead)
    study._storage.record_heartbeat(dead._trial_id)
    assert recover_stale_trials(study, orphan_grace_s=0) == []  # beating within the grace period: alive

    time.sleep(3.2)  # no beat for longer than the grace period (SQLite keeps whole seconds)
    if route == "arena":
        assert recover_stale_trials(study, orphan_grace_s=0) == [dead.number]
        assert study.trials[dead.number].user_attrs["fail_reason"] == "its worker's heartbeat stopped"
    study.optimize(_draw, n_trials=1)  # Optuna fails heartbeat-stale trials (arena's callback requeues) first
    assert recover_stale_trials(study, orphan_grace_s=0) == []
    trials = study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # one retry, with the dead trial's parameters
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == dead.number
    assert "another-machine" not in str(trials[1].user_attrs)  # the dead worker's record is not carried over


# Killed between starting a trial and writing its worker record: the moment that used to leave a rerun unsure
# whether the trial's worker was alive.
KILLED_BEFORE_RECORD = """
import os, signal, sys
import optuna
optuna.load_study(study_name="o", storage=sys.argv[1]).ask()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.usefixtures("one_thread")
def test_a_rerun_right_after_a_kill_before_the_worker_record_continues_as_if_uninterrupted(store, tmp_path,
                                                                                         monkeypatch):
    """The rerun waits out the record-less trial (ORPHAN_GRACE_S), fails it, and draws what a straight run drew."""
    monkeypatch.setattr(study_storage, "ORPHAN_GRACE_S", 1.0)
    kw = {"study_name": "o", "seed": 1, "config": FAST, "progress": False, "n_startup_trials": 1}
    straight = run_study(store, storage=create_storage(f"journal:{tmp_path / 'a.log'}"), n_trials=2, **kw)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    run_study(store, storage=create_storage(url), n_trials=1, **kw)
    child = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RECORD, url], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    started = time.monotonic()
    resumed = run_study(store, storage=create_storage(url), n_trials=2, **kw)
    assert time.monotonic() - started >= 1.0  # it waited for the record that never came
    states = [t.state.name for t in resumed.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "no worker record" in resumed.trials[1].user_attrs["fail_reason"]
    assert [t.params for t in resumed.trials if t.state.name == "COMPLETE"] == [t.params for t in straight.trials]
