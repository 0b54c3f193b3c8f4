"""Where a study lives, and how it survives its workers: Optuna storages, stale-trial recovery and requeueing.

* ``n_trials`` is a total target of finished trials, so a rerun after an interruption continues the study.
* A trial left RUNNING by a dead worker is failed and its parameters are enqueued again (retried once per
  death), so nothing is lost and nothing stays RUNNING forever. Workers on this host are recognised by
  pid + process start time at once; a worker on another machine by Optuna's heartbeat, on every database
  storage (SQLite included), within its grace period. Whichever route fails the trial first requeues it: the
  RUNNING -> FAIL change succeeds once (PostgreSQL locks the row), so the parameters are retried exactly once.
* Ctrl-C: the interrupted trial is failed by Optuna and queued again, so a rerun continues like kill -9 does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from arena.errors import OptionError, StudyError
from arena.head_train import HeadParams

# How many times the parameters of a trial killed with its worker are retried before giving up on them.
MAX_RETRIES = 2
STORAGE_HELP = "journal:<file>, sqlite:///<file> and database URLs such as postgresql://user@host/db"
# Every HeadParams field is drawn by the study: one source of truth for what a complete trial holds.
PARAM_NAMES = tuple(f.name for f in dataclasses.fields(HeadParams))
# Optuna heartbeat of database storages: (seconds between beats, seconds without a beat after which a RUNNING
# trial is failed). SQLite lives on one machine, where a dead worker is recognised by its pid at once; a server's
# workers sit behind a network, where a pause of some seconds must not fail a trial that is still running.
LOCAL_HEARTBEAT = (5, 30)
SERVER_HEARTBEAT = (10, 60)
# A trial with no worker record yet: an arena worker writes one milliseconds after starting the trial, so a trial
# without one for this long (while watched, or since it started) belongs to a worker killed in that moment.
ORPHAN_GRACE_S = 10.0
# Optuna 4.9 renamed the callback run on trials whose heartbeat stopped; the old name goes in Optuna 6.
_STALE_CALLBACK = ("heartbeat_stale_trial_callback"
                   if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage.__init__).parameters
                   else "failed_trial_callback")


def create_storage(url: str) -> BaseStorage:
    """Open an Optuna storage from a URL.

    ``journal:<path>`` -> a journal file (several processes on one machine); ``sqlite:///<path>`` -> a local
    database (one process); ``postgresql://...`` (or any SQLAlchemy URL) -> a shared database (several machines).
    A plain ``postgresql://`` uses psycopg 3 when it is installed (``postgresql+psycopg://``; the dev extra installs
    it), otherwise SQLAlchemy's default driver; ``postgresql+<driver>://`` picks one. Every database storage beats a
    heartbeat (:data:`LOCAL_HEARTBEAT`, :data:`SERVER_HEARTBEAT`), so a trial of a worker that died anywhere is
    failed and retried.

    Raises:
        OptionError: a URL of none of these forms. StudyError: the storage cannot be opened (unreachable
            server, missing database driver, folder not writable, ...).
    """
    shown = redact_url(url)
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):]).expanduser()
            if not path.name:
                raise OptionError(f"Invalid storage ({shown}): give a file, e.g. journal:models/optuna.journal.")
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return _database(url, LOCAL_HEARTBEAT)
        if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is not None:
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        if re.match(r"^[a-z][a-z0-9+]*://", url):
            return _database(url, SERVER_HEARTBEAT)
    except OptionError:
        raise
    except ModuleNotFoundError as exc:
        raise StudyError(f"--storage {shown}: the database driver {exc.name!r} is not installed; install it "
                         "(PostgreSQL: pip install 'psycopg[binary]') or name an installed one, e.g. "
                         "postgresql+psycopg2://...") from exc
    except Exception as exc:  # noqa: BLE001 - drivers, SQLAlchemy and the OS raise many types; all mean "cannot open"
        first = (str(exc).splitlines() or [""])[0][:300]
        raise StudyError(f"--storage {shown}: cannot open the Optuna storage ({type(exc).__name__}: {first}); "
                         "check the URL, that the server is reachable and its driver installed, or that the "
                         "folder is writable.") from exc
    raise OptionError(f"Invalid storage ({shown}). Supported values are {STORAGE_HELP}.")


def _database(url: str, heartbeat: tuple[int, int]) -> RDBStorage:
    def open_storage() -> RDBStorage:
        with warnings.catch_warnings():  # the heartbeat arguments are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat[0], grace_period=heartbeat[1],
                              **{_STALE_CALLBACK: requeue_heartbeat_stale})

    for pause in (0.5, 1.0):
        try:
            return open_storage()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a new database race to create its tables (PostgreSQL: "duplicate key
            # value violates unique constraint pg_type_typname_nsp_index"); the losers find them made next time.
            time.sleep(pause)
    return open_storage()


def requeue_heartbeat_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback for a trial it failed because its heartbeat stopped (run at the start of a trial of any
    worker): retry its parameters as :func:`recover_stale_trials` would. (Optuna's own retry callback would also
    copy the dead worker's record and retry partly drawn parameters.)"""
    _requeue(study, trial, study.get_trials(deepcopy=False))


def redact_url(url: str) -> str:
    """The storage URL without a password, for logs and summaries."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time since boot, in clock ticks


def worker_identity() -> dict[str, Any]:
    """This process as a trial records it: host, pid and the process start time (tells a reused pid apart)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start_ticks(os.getpid())}


def worker_alive(worker: dict[str, Any]) -> bool:
    """Whether the process of a ``worker_identity`` record (of this host) still runs."""
    pid, start = int(worker.get("pid", -1)), worker.get("start")
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = _proc_start_ticks(pid)
        return now is not None and (start is None or now == start)  # a reused pid has another start time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: optuna.Study, *, orphan_grace_s: float | None = None) -> list[int]:
    """Fail trials left RUNNING by a dead worker and enqueue their parameters again.

    A RUNNING trial is stale when its worker ran on this host and that process is gone (pid + start time), when
    the storage's heartbeat for it stopped longer than the grace period ago (workers on other machines), or when
    it has had no worker record (killed before it wrote one, which an arena worker does milliseconds after
    starting the trial) for ``orphan_grace_s`` (default :data:`ORPHAN_GRACE_S`), since it started or while
    watched here. Such a record-less trial is waited for, up to ``orphan_grace_s``: a worker started again right
    after a kill -9 then continues the study exactly as an uninterrupted run would, instead of drawing its next
    parameters while the dead trial still counts as running.
    Each trial's parameters are retried at most ``MAX_RETRIES`` times.

    Returns:
        numbers of the trials that were failed.
    """
    storage = study._storage  # the public Study API has no way to change a trial it does not own
    orphan_grace_s = ORPHAN_GRACE_S if orphan_grace_s is None else orphan_grace_s
    failed = _fail_heartbeat_stale(study)
    host = socket.gethostname()
    first_seen: dict[int, float] = {}
    give_up = time.monotonic() + orphan_grace_s + 1.0
    while True:
        trials = study.get_trials(deepcopy=False)
        now, waiting = time.time(), False
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            worker = t.user_attrs.get("worker")
            if worker:
                if worker.get("host") != host or worker_alive(worker):
                    continue
                reason = f"worker {worker.get('host')}:{worker.get('pid')} died while running it"
            else:
                started = t.datetime_start.timestamp() if t.datetime_start else now
                unrecorded = max(now - started, time.monotonic() - first_seen.setdefault(t.number, time.monotonic()))
                if unrecorded < orphan_grace_s:
                    waiting = True
                    continue
                reason = f"no worker record after {unrecorded:.0f} s"
            if _fail(storage, t, reason):
                failed.append(t.number)
                _requeue(study, t, trials)
        if not waiting or time.monotonic() > give_up:
            return failed
        time.sleep(0.2)


def _fail_heartbeat_stale(study: optuna.Study) -> list[int]:
    """Fail and requeue the RUNNING trials whose heartbeat stopped (what Optuna does before each trial, here also
    after the last one, and with the reason recorded)."""
    storage = study._storage  # an RDBStorage wrapped by Optuna in a cache, which passes the heartbeat on
    interval = getattr(storage, "get_heartbeat_interval", None)
    if interval is None or interval() is None:
        return []
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        t = storage.get_trial(trial_id)
        if t.state == TrialState.RUNNING and _fail(storage, t, "its worker's heartbeat stopped"):
            failed.append(t.number)
            _requeue(study, t, study.get_trials(deepcopy=False))
    return failed


def _fail(storage: BaseStorage, t: FrozenTrial, reason: str) -> bool:
    """RUNNING -> FAIL with the reason; False when another process finished or failed it first."""
    try:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        return storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
        return False


def _requeue(study: optuna.Study, t: FrozenTrial, trials: Sequence[FrozenTrial]) -> None:
    """Enqueue the parameters of a trial that died, unless they were only partly drawn.

    An enqueued trial's parameters come from its ``fixed_params``; a sampled one's only when all were drawn before
    it died. A partly drawn trial is not enqueued: the next trial is sampled with the same seed and history
    (see ``arena.study.trial_sampler``), so it draws the very same parameters anyway.
    """
    params = {**t.params, **t.system_attrs.get("fixed_params", {})}
    if set(params) != set(PARAM_NAMES):
        return
    root = t.user_attrs.get("retry_of", t.number)
    if sum(1 for u in trials if u.user_attrs.get("retry_of") == root) < MAX_RETRIES:
        attrs = {"retry_of": root, **({"seed_defaults": True} if t.user_attrs.get("seed_defaults") else {})}
        study.enqueue_trial(params, user_attrs=attrs)


def requeue_interrupted(study: optuna.Study) -> None:
    """After Ctrl-C, enqueue the parameters of this process's trial that Optuna just marked FAIL, so a rerun
    runs them first -- as it would after kill -9 -- and the study continues as if never interrupted."""
    me = worker_identity()
    mine = [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.FAIL and t.user_attrs.get("worker", {}).get("pid") == me["pid"]
            and t.user_attrs.get("worker", {}).get("host") == me["host"]]
    if mine:
        _requeue(study, mine[-1], study.get_trials(deepcopy=False))


def finished_trials(study: optuna.Study) -> int:
    """Complete + pruned trials: what ``n_trials`` counts."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
