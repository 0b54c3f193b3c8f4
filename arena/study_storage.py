"""Where a study lives, and how it survives its workers: Optuna storages, stale-trial recovery and requeueing.

* ``n_trials`` is a total target of finished trials, so a rerun after an interruption continues the study.
* A trial left RUNNING by a dead worker is failed on the next start and its parameters are enqueued again
  (retried), so nothing is lost and nothing stays RUNNING forever. Workers on this host are recognised by
  pid + process start time; on PostgreSQL, Optuna's heartbeat covers workers on other machines.
* Ctrl-C: the interrupted trial is failed by Optuna and queued again, so a rerun continues like kill -9 does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
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


def create_storage(url: str) -> BaseStorage:
    """Open an Optuna storage from a URL.

    ``journal:<path>`` -> a journal file (several processes on one machine); ``sqlite:///<path>`` -> a local
    database (one process); ``postgresql://...`` (or any SQLAlchemy URL) -> a shared database (several machines;
    with a heartbeat so trials of a machine that died are failed and retried).

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
            return RDBStorage(url)
        if re.match(r"^[a-z][a-z0-9+]*://", url):
            return RDBStorage(url, heartbeat_interval=30, grace_period=120, **_retry_callback())
    except OptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - drivers, SQLAlchemy and the OS raise many types; all mean "cannot open"
        first = (str(exc).splitlines() or [""])[0][:300]
        raise StudyError(f"--storage {shown}: cannot open the Optuna storage ({type(exc).__name__}: {first}); "
                         "check the URL, that the server is reachable and its driver installed, or that the "
                         "folder is writable.") from exc
    raise OptionError(f"Invalid storage ({shown}). Supported values are {STORAGE_HELP}.")


def _retry_callback() -> dict[str, Any]:
    # Optuna 4.9 renamed the retry callback of trials whose heartbeat stopped; the old name goes in Optuna 6.
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRIES)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)}


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


def recover_stale_trials(study: optuna.Study, *, orphan_grace_s: float = 30.0) -> list[int]:
    """Fail trials left RUNNING by a dead worker and enqueue their parameters again.

    A RUNNING trial is stale when its worker ran on this host and that process is gone (pid + start time), or
    when it has no worker record (killed before it wrote one, which an arena worker does within milliseconds of
    starting the trial) and started more than ``orphan_grace_s`` ago.
    Trials of other hosts are left to the storage heartbeat (PostgreSQL). Each trial's parameters are retried
    at most ``MAX_RETRIES`` times.

    Returns:
        numbers of the trials that were failed.
    """
    storage = study._storage  # the public Study API has no way to change a trial it does not own
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    failed = []
    now = time.time()
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
            if now - started < orphan_grace_s:
                continue
            reason = f"no worker record and RUNNING for {now - started:.0f} s"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished or failed by someone else meanwhile
        failed.append(t.number)
        _requeue(study, t, trials)
    return failed


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
