"""Run records: what made an output, saved beside it, one new pair of files per run.

Every long command (``features``, ``tune-head``, ``frame-test``, ``train-full``, ``submit``, ``evaluate``) writes
``<folder>/<UTC time>-<command>.json`` -- its resolved configuration: the options after ``--config`` and the command
line, where each came from, the config file's sha256, the versions of the software stack (FFmpeg as torchcodec
loaded it), the code's git commit and the machine -- and ``<same name>.log``, the run's log (the ``arena`` loggers
at INFO and the lines the command printed). The record is rewritten once more when the run ends, with its exit
status and duration, so a run that crashed still left what it was asked to do.

Nothing here goes into the outputs themselves: a feature cache's bytes depend only on what determines its features,
never on when, where or how many processes made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torchcodec

import arena
from arena._files import atomic_write_text
from arena.hardware import hardware_summary

RECORD_SUFFIX = ".json"
LOG_SUFFIX = ".log"
# The distributions whose versions decide what a run computes (the python and FFmpeg versions are added apart).
PACKAGES = ("torch", "torchvision", "timm", "torchcodec", "h5py", "optuna", "albumentations", "numpy")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The pair of files of one run: its record (JSON) and its log."""

    record: Path
    log: Path


def new_run_files(folder: str | os.PathLike, command: str, *, now: datetime | None = None) -> RunFiles:
    """Reserve ``<folder>/<UTC time>-<command>.json`` and ``.log`` for a new run; never an earlier run's names.

    The log file is created exclusively, so two runs that start in the same microsecond (shards of one cache) get
    distinct names (``-2``, ``-3``, ...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    for n in range(1, 1000):
        stem = f"{stamp}-{command}" + ("" if n == 1 else f"-{n}")
        files = RunFiles(folder / (stem + RECORD_SUFFIX), folder / (stem + LOG_SUFFIX))
        if files.record.exists():
            continue
        try:
            os.close(os.open(files.log, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return files
    raise FileExistsError(f"{folder}: no free run record name for {stamp}-{command}")


# --------------------------------------------------------------------------------------------------- the record


def jsonable(value: Any) -> Any:
    """An option's final value as JSON: tuples as lists, paths as strings, parsed specs (dataclasses) as dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ffmpeg_version() -> str | None:
    """The version of the FFmpeg libraries torchcodec loaded (e.g. ``5.1.6-0+deb12u1``); None when none loaded."""
    try:
        from torchcodec._core import get_ffmpeg_library_versions  # private: the only place that says it

        return str(get_ffmpeg_library_versions()["ffmpeg_version"])
    except Exception:  # noqa: BLE001 - a missing FFmpeg is the doctor's to report; here it is recorded as unknown
        major = getattr(torchcodec, "ffmpeg_major_version", None)
        return None if major is None else f"{major} (major)"


def software_versions() -> dict[str, str | None]:
    """arena, python, the packages that decide what is computed (None when not installed) and FFmpeg."""
    versions: dict[str, str | None] = {"arena": arena.__version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["ffmpeg"] = ffmpeg_version()
    return versions


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(package: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The commit of the repository the code runs from, and whether tracked files differ from it.

    None when git is missing or the package is not tracked by a repository (an installed wheel, even one inside
    another repository's virtual environment).
    """
    folder = Path(package or Path(arena.__file__).parent).resolve()
    if _git(folder, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (AttributeError, ValueError, OSError):
        return None


def machine() -> dict[str, Any]:
    """Host name, memory and `arena.hardware.hardware_summary` (platform, CPUs, torch threads, CUDA devices)."""
    return {"hostname": socket.gethostname(), "memory_gib": _memory_gib(), **hardware_summary()}


def resolved_config(command: str, *, options: Mapping[str, Any], sources: Mapping[str, str],
                    paths: Mapping[str, Any], config_file: str | os.PathLike | None) -> dict[str, Any]:
    """The record of a run that starts now.

    Args:
        command: the command's name (``features``, ...).
        options: every option's final value (after the config file and the command line).
        sources: where each value came from: ``command line``, ``config file``, ``environment`` or ``default``.
        paths: the path options' values made absolute (as given stays in ``options``).
        config_file: the ``--config`` file, when one was given.
    """
    config = None
    if config_file is not None:
        config = {"path": str(Path(config_file).resolve()), "sha256": file_sha256(config_file)}
    return {
        "command": command,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {k: jsonable(v) for k, v in options.items()},
        "sources": dict(sources),
        "paths": {k: jsonable(v) for k, v in paths.items()},
        "config_file": config,
        "versions": software_versions(),
        "git": git_state(),
        "machine": machine(),
    }


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n")


# ------------------------------------------------------------------------------------------------------ the log


class _Tee:
    """Stands in for ``sys.stdout``: passes every write through and hands each complete line to ``line``.

    Attributes (``encoding``, ``buffer``, ``isatty``, ...) are the stream's, so click writes to it as it would to the
    stream itself; a bytes write fails on the stream before anything is logged, as click's probe expects.
    """

    def __init__(self, stream, line: Callable[[str], None]) -> None:
        self._stream, self._line, self._partial = stream, line, ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for one in lines:
            self._line(one)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def close_lines(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _ConsoleFallback(logging.Handler):
    """Python's last-resort handler (WARNING and above to stderr), kept while the run's file handler is attached:
    without it a command whose loggers have no other handler would stop printing its warnings."""

    def __init__(self, file_handler: logging.Handler) -> None:
        super().__init__(logging.WARNING)
        self._own = {file_handler, self}

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:  # another handler in the chain prints it already
            if any(h not in self._own for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        if logging.lastResort is not None:
            logging.lastResort.handle(record)


class RunLog:
    """The open log of a run (`run_log`): `note` writes a line into the file only, not to the console."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler

    def note(self, message: str, level: int = logging.INFO, name: str = "arena.run") -> None:
        self.handler.handle(logging.LogRecord(name, level, __file__, 0, message, None, None))


@contextmanager
def run_log(path: str | os.PathLike) -> Iterator[RunLog]:
    """Log the run into ``path``: the ``arena`` loggers at INFO (with times) and every line printed to stdout.

    The handler, the stdout copy and the logger level are undone on exit, also when the command fails.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    fallback = _ConsoleFallback(handler)
    logger = logging.getLogger("arena")
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.addHandler(fallback)
    run = RunLog(handler)
    stdout = sys.stdout
    tee = _Tee(stdout, lambda line: run.note(line, name="stdout"))
    sys.stdout = tee
    try:
        yield run
    finally:
        tee.close_lines()
        if sys.stdout is tee:
            sys.stdout = stdout
        logger.removeHandler(fallback)
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def finish_record(record: dict[str, Any], started: float, exit_status: int, error: str | None) -> dict[str, Any]:
    """The record with the run's end: time, seconds, exit status and the error, if any."""
    return {**record, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 3), "exit_status": exit_status, "error": error}
