"""The fault switch: make one video's decode worker crash, hang or run out of memory, to test the isolation.

``ARENA_FAULT_INJECT=KIND:NAME[,KIND:NAME...]``, NAME a video's file name (no folder), KIND one of

* ``crash``: the worker kills itself with SIGSEGV, as a decoder that segfaults does;
* ``hang``: the worker sleeps for ever, as a decoder stuck in a broken stream does;
* ``oom``: the worker allocates memory in 16 MB steps, up to twice its memory limit (set a small
  ``ARENA_WORKER_MEMORY_MB`` with it, or the machine's own out-of-memory killer may act first).

The fault fires in the decode worker (`arena.isolation`) right before that video is decoded, so the commands that
decode in workers (``features``, ``train-full``, ``submit``, ``evaluate``) can be tested end to end through the
CLI. It never fires in the main process: with ``--workers 0`` nothing is injected (a crash there would end the run,
which is what workers are for). A value that cannot be parsed is refused before any video is decoded.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import numpy as np

from arena.errors import OptionError

ENV = "ARENA_FAULT_INJECT"
KINDS = ("crash", "hang", "oom")

_armed: dict[str, str] = {}  # file name -> kind, set in a decode worker only
_memory_mb = 0


def fault_plan(value: str | None = None) -> dict[str, str]:
    """``{file name: kind}`` from ``value`` (default: the ``ARENA_FAULT_INJECT`` environment variable).

    Raises:
        OptionError: an entry is not ``KIND:NAME`` with a known kind and a bare file name.
    """
    value = os.environ.get(ENV, "") if value is None else value
    plan: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        kind, _, name = entry.partition(":")
        if kind not in KINDS or not name or Path(name).name != name:
            raise OptionError(f"{ENV}: {entry!r} is not KIND:NAME with KIND one of {', '.join(KINDS)} and NAME a "
                              f"video's file name (e.g. crash:clip_3.mp4); unset {ENV} to run without faults.")
        plan[name] = kind
    return plan


def arm(plan: dict[str, str], memory_mb: int) -> None:
    """Called by a decode worker when it starts: from now on `before_decode` injects ``plan``'s faults."""
    global _memory_mb
    _armed.clear()
    _armed.update(plan)
    _memory_mb = int(memory_mb)


def before_decode(path: str | os.PathLike) -> None:
    """Inject the fault planned for ``path``'s file name, if any (a no-op outside decode workers)."""
    kind = _armed.get(Path(path).name)
    if kind == "crash":
        faulthandler.disable()  # no traceback of Python's for a crash that was asked for
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "oom":
        held = []
        for _ in range(2 * _memory_mb // 16 + 1):  # bounded: the limit stops the worker long before the end
            held.append(np.ones(16 << 20, dtype=np.uint8))  # written, so resident
            time.sleep(0.01)  # slow enough for the supervisor's 0.1 s polls to see the limit crossed
    if kind in ("hang", "oom"):
        while True:
            time.sleep(3600)
