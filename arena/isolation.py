"""Per-video isolation: videos are decoded in supervised worker processes, so a video can cost only itself.

Why not torch's DataLoader: a worker that segfaults, hangs or is killed ends the DataLoader's iterator and with it
the run, and nothing says which video did it. Here a supervisor thread in the main process hands each worker one
video at a time, so it knows which video each worker holds:

* a worker that dies (a signal, an exit) costs only its video, which comes back failed with the reason
  ("decoder crashed (signal 11, SIGSEGV)"), and a fresh worker takes over;
* one video may take at most ``seconds`` (`arena.limits.VIDEO_SECONDS`, ``ARENA_VIDEO_TIMEOUT``) and a worker may
  grow by at most ``memory_mb`` over its idle resident size (``ARENA_WORKER_MEMORY_MB``; measured at start and after
  each video, once the heap is trimmed); the supervisor checks
  both every 0.1 s, also while the main thread is busy on the GPU, and kills the worker with its process group
  (FFmpeg children included) when one is crossed;
* any exception while loading a video is that video's failure, with the exception's type and message, in a worker
  and in the in-process path (``workers=0``) alike. Crashes and hangs need workers: in-process they end the run.

The memory read is the resident anonymous memory from ``/proc/PID/statm`` (resident less shared/file-backed pages,
33 us a read; no limit where there is no ``/proc``).
``RLIMIT_AS`` counts address space, which torch, glibc's per-thread arenas and FFmpeg's threads reserve by the
gigabyte without using, and an allocation refused inside FFmpeg or torch surfaces as anything from a ``MemoryError``
to an abort; private memory from ``smaps_rollup`` is exact but costs 16 ms a read. A worker hands freed heap back
after each video (``malloc_trim``), so what a large video left behind does not count against the next.

Results come back in key order through one pipe per worker (torch's reductions move tensors through shared memory,
as in DataLoader), at most ``workers * prefetch`` batches ahead of the consumer; the supervisor collates them into
batches and, for a CUDA model, pins them. Workers start as DataLoader's do: from the main thread, between two
items (a fork from another thread could copy a lock the main thread holds mid-op), by ``fork``, or ``spawn`` when
they use CUDA. They ignore Ctrl-C (the main process stops them) and die with the main process
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of it leaves none behind. The fault switch of `arena.faults` is armed in
the workers. Training passes one ``lost`` record to all its epochs (`ClipLoader`): a video that cost a worker is
failed at once later, not decoded (and waited for) again.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch

from arena import faults
from arena.errors import OptionError
from arena.limits import MIN_WORKER_MEMORY_MB, VIDEO_SECONDS, WORKER_MEMORY_SHARE

TIMEOUT_ENV = "ARENA_VIDEO_TIMEOUT"
MEMORY_ENV = "ARENA_WORKER_MEMORY_MB"
POLL_SECONDS = 0.1  # how often the supervisor looks at the clock and the workers' memory
START_FAILURES = 3  # workers in a row that die before taking a video: something other than a video is wrong
_END = object()
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class WorkerLimits:
    """Per video: wall-clock ``seconds``; per worker: ``memory_mb`` of growth over its resident size at start."""

    seconds: float
    memory_mb: int


def worker_limits(workers: int) -> WorkerLimits:
    """The limits for ``workers`` workers: `arena.limits` defaults, or ``ARENA_VIDEO_TIMEOUT`` (seconds) and
    ``ARENA_WORKER_MEMORY_MB`` (per worker) from the environment.

    Raises:
        OptionError: a variable is set but not a positive number.
    """
    total_mb = os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**20
    default_mb = max(MIN_WORKER_MEMORY_MB, int(total_mb * WORKER_MEMORY_SHARE / max(workers, 1)))
    return WorkerLimits(_env_number(TIMEOUT_ENV, VIDEO_SECONDS), int(_env_number(MEMORY_ENV, default_mb)))


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise OptionError(f"{name}={text!r}: give a positive number, or unset it for the default ({default:g}).")
    return value


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): an exception as a video's failure reason."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def load(dataset: Any, key: Any) -> Any:
    """``dataset[key]``, or ``dataset.failed(key, reason)`` when loading raised: one video's exception is that
    video's failure."""
    try:
        return dataset[key]
    except Exception as exc:  # noqa: BLE001 - whatever one video raises is its own failure, never the run's
        return dataset.failed(key, describe(exc))


def isolated(dataset: Any, keys: Iterable, *, workers: int, prefetch: int = 2, batch_size: int = 1,
             collate: Callable[[list], Any] | None = None, pin_memory: bool = False, pin_device: int | None = None,
             start_method: str | None = None, limits: WorkerLimits | None = None,
             lost: dict[Any, str] | None = None, video_of: Callable[[Any], Any] = lambda key: key) -> Iterator:
    """``dataset[key]`` for every key, in key order, loaded by ``workers`` supervised processes (0: here).

    Args:
        dataset: indexable by the keys, picklable (``spawn``), with ``failed(key, reason)`` giving the item that
            stands for a video that could not be loaded (`arena.clips.ClipDataset.failed`).
        batch_size, collate: yield ``collate(items)`` for every ``batch_size`` consecutive items (the last batch may
            be smaller); without ``collate`` (``batch_size`` 1) the items themselves.
        pin_memory: pin each yielded object (its ``pin_memory()``) on the supervisor thread, current CUDA device
            ``pin_device``.
        start_method: the workers' start method (None: the platform's default, as DataLoader).
        limits: default `worker_limits` (``workers``).
        lost: videos (``video_of(key)``) whose worker crashed, hung or ran out of memory, with the reason: filled
            here, and a video already in it is not tried again (training's epochs pass the same dict).

    Raises:
        OptionError: ``ARENA_FAULT_INJECT`` or a limit's variable cannot be parsed.
    """
    plan = faults.fault_plan()
    limits = limits or worker_limits(workers)
    collate = collate or _only
    if workers <= 0:
        return _in_process(dataset, keys, batch_size, collate, pin_memory)
    pool = _Pool(dataset, keys, workers=workers, capacity=max(1, prefetch) * workers * batch_size,
                 batch_size=batch_size, collate=collate, pin=pin_memory, pin_device=pin_device,
                 context=mp.get_context(start_method), limits=limits, plan=plan,
                 lost={} if lost is None else lost, video_of=video_of)
    return pool.results()


def _only(items: list) -> Any:
    if len(items) != 1:
        raise ValueError(f"batches of {len(items)} need a collate function")
    return items[0]


def _in_process(dataset: Any, keys: Iterable, batch_size: int, collate: Callable, pin: bool) -> Iterator:
    group = []
    for key in keys:
        group.append(load(dataset, key))
        if len(group) == batch_size:
            yield collate(group).pin_memory() if pin else collate(group)
            group = []
    if group:
        yield collate(group).pin_memory() if pin else collate(group)


class ClipLoader:
    """What DataLoader was to training: batches of ``collate([dataset[key], ...])`` in ``sampler`` order, loaded by
    isolated workers (`isolated`). A new pass over the sampler (its current epoch) at each ``iter``; a video whose
    worker crashed, hung or ran out of memory is failed at once in later passes (``lost``), not tried again.

    Keys are a video's index or ``(epoch, index, ...)`` (`arena.distributed.EpochSampler`)."""

    def __init__(self, dataset: Any, sampler: Iterable, *, batch_size: int, collate: Callable[[list], Any],
                 workers: int, pin_memory: bool = False, pin_device: int | None = None) -> None:
        self.dataset, self.sampler, self.batch_size, self.collate = dataset, sampler, batch_size, collate
        self.workers, self.pin_memory, self.pin_device = workers, pin_memory, pin_device
        self.lost: dict[int, str] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator:
        return isolated(self.dataset, list(self.sampler), workers=self.workers, batch_size=self.batch_size,
                        collate=self.collate, pin_memory=self.pin_memory, pin_device=self.pin_device,
                        lost=self.lost, video_of=_video_index)


def _video_index(key: Any) -> int:
    return key[1] if isinstance(key, tuple) else key


# ------------------------------------------------------------------------------------------------ worker side


def _worker(conn, dataset: Any, plan: dict[str, str], memory_mb: int, parent: int) -> None:
    """A worker's life: say ready (with its resident size), then load one key at a time until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.setpgid(0, 0)  # its own process group: a kill reaches the FFmpeg children too
    libc = _libc()
    if libc is not None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the thread that started this worker
    if os.getppid() != parent:  # the main process died before the line above
        return
    torch.set_num_threads(1)
    faults.arm(plan, memory_mb)
    if libc is not None:  # the parent's free heap, inherited by the fork, is no part of this worker's baseline
        libc.malloc_trim(0)
    conn.send(("ready", _rss_mb(os.getpid())))
    while True:
        try:
            key = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if key is None:
            return
        result = load(dataset, key)
        try:
            conn.send(("done", result))
        except Exception as exc:  # noqa: BLE001 - e.g. no file descriptor left for the shared memory
            conn.send(("done", dataset.failed(key, f"cannot hand the decoded video over: {describe(exc)}")))
        del result
        if libc is not None:
            libc.malloc_trim(0)
        try:  # idle again: the baseline the next video's growth counts from
            conn.send(("base", _rss_mb(os.getpid())))
        except OSError:  # the main process is gone
            return


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.prctl, libc.malloc_trim  # noqa: B018 - both exist (glibc on Linux)
        return libc
    except (OSError, AttributeError):
        return None


def _rss_mb(pid: int) -> float:
    """Resident anonymous memory of ``pid`` in MB: statm's resident less its file-backed and shared part (0 where
    ``/proc`` cannot tell). File pages (torch's and FFmpeg's libraries, mapped files) come and go with the page
    cache, so a worker's total resident size can fall while it allocates; its anonymous memory only grows by what
    it allocates."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


# ------------------------------------------------------------------------------------------------ supervisor side


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode)
        if sig == signal.SIGKILL:
            return f"decode worker was killed (signal {-exitcode}, SIGKILL: the system may be out of memory)"
        return f"decoder crashed (signal {-exitcode}, {sig.name})"
    return f"decode worker exited with status {exitcode}"


class _Worker:
    """One worker process, the video it holds (``task``: position, key, start time) and why it was killed."""

    def __init__(self, context, dataset: Any, plan: dict[str, str], memory_mb: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, dataset, plan, memory_mb, os.getpid()),
                                       daemon=True, name="arena-decode")
        self.process.start()
        child.close()
        self.base_mb: float | None = None  # idle resident size (at start, after each video); None until ready
        self.created = time.monotonic()
        self.task: tuple[int, Any, float] | None = None
        self.reason = ""

    def kill(self, reason: str = "") -> None:
        self.reason = self.reason or reason  # the first reason stands
        for kill in (os.killpg, os.kill):  # the group (FFmpeg children), and the worker should it have none yet
            try:
                kill(self.process.pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self, *, graceful: bool) -> None:
        if graceful:
            try:
                self.conn.send(None)
                self.process.join(timeout=2)
            except OSError:
                pass
        if self.process.is_alive():
            self.kill()
        self.process.join(timeout=5)
        self.conn.close()


_LIVE: set[_Pool] = set()  # pools whose supervisor thread runs


@atexit.register
def _stop_live_pools() -> None:
    """At exit, stop the supervisors that an abandoned iterator left running (an exception out of the consuming
    loop keeps the generator, and so its ``finally``, alive until the end). A daemon thread still inside torch's C++
    code when the interpreter finalizes aborts the process ("terminate called without an active exception");
    atexit runs while daemon threads still run, so they are stopped and joined here, and their workers closed."""
    for pool in list(_LIVE):
        pool.stop.set()
        if pool.thread is not None:
            pool.thread.join(timeout=10)


class _Pool:
    """The supervisor: a thread that hands out keys, watches the clock and the memory, reports workers that die,
    and queues the results in key order for `results`. Workers are started by the consuming (main) thread, between
    two items, as DataLoader does: a fork from another thread could copy a lock the main thread holds mid-op."""

    def __init__(self, dataset: Any, keys: Iterable, *, workers: int, capacity: int, batch_size: int,
                 collate: Callable, pin: bool, pin_device: int | None, context, limits: WorkerLimits,
                 plan: dict[str, str], lost: dict[Any, str], video_of: Callable[[Any], Any]) -> None:
        self.dataset, self.keys, self.workers, self.capacity = dataset, iter(enumerate(keys)), workers, capacity
        self.batch_size, self.collate, self.pin, self.pin_device = batch_size, collate, pin, pin_device
        self.context, self.limits, self.plan, self.lost, self.video_of = context, limits, plan, lost, video_of
        self.out: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.wanted = workers  # workers the supervisor needs (under ``lock``)
        self.started: list[_Worker] = []  # started by the main thread, not yet taken by the supervisor
        self.thread: threading.Thread | None = None  # the supervisor, once `results` started it
        self.wake_r, self.wake_w = os.pipe()  # the consumer took a batch: room to hand out more keys
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def results(self) -> Iterator:
        thread = self.thread = threading.Thread(target=self._run, name="arena-decode-supervisor", daemon=True)
        _LIVE.add(self)
        thread.start()
        try:
            while True:
                self._start_wanted()
                try:
                    item = self.out.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                with contextlib.suppress(BlockingIOError):
                    os.write(self.wake_w, b"x")
                yield item
        finally:
            self.stop.set()
            thread.join()
            _LIVE.discard(self)
            for w in self.started:
                w.close(graceful=False)
            os.close(self.wake_r)
            os.close(self.wake_w)

    def _start_wanted(self) -> None:
        with self.lock:
            for _ in range(self.wanted):
                self.started.append(_Worker(self.context, self.dataset, self.plan, self.limits.memory_mb))
            self.wanted = 0

    def _run(self) -> None:
        pool: list[_Worker] = []
        try:
            if self.pin and self.pin_device is not None:
                torch.cuda.set_device(self.pin_device)
            self._supervise(pool)
            self.out.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self.out.put(exc)
        finally:
            graceful = not self.stop.is_set()
            for w in pool:
                w.close(graceful=graceful)

    def _supervise(self, pool: list[_Worker]) -> None:
        waiting: deque[tuple[int, Any]] = deque()  # handed out but not taken (a worker died first)
        done: dict[int, Any] = {}
        group: list = []
        next_pos, start_failures, more = 0, 0, True
        while not self.stop.is_set():
            with self.lock:
                pool += self.started
                self.started.clear()
            ahead = sum(w.task is not None for w in pool) + len(done) + len(group) + self.out.qsize() * self.batch_size
            for w in pool:
                if more and not waiting:
                    nxt = next(self.keys, None)
                    more = nxt is not None
                    if more and self.video_of(nxt[1]) in self.lost:  # its worker died on it before: not again
                        done[nxt[0]] = self.dataset.failed(nxt[1], self.lost[self.video_of(nxt[1])])
                    elif more:
                        waiting.append(nxt)
                if waiting and w.task is None and w.base_mb is not None and ahead < self.capacity:
                    pos, key = waiting.popleft()
                    try:
                        w.conn.send(key)
                    except OSError:
                        waiting.appendleft((pos, key))  # the worker is dead; its sentinel will say so
                        continue
                    w.task, ahead = (pos, key, time.monotonic()), ahead + 1
            if not waiting and not more and all(w.task is None for w in pool) and not done:
                break
            wait([w.conn for w in pool] + [w.process.sentinel for w in pool] + [self.wake_r], timeout=POLL_SECONDS)
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 4096)
            for w in list(pool):
                reason = self._check(w, done)
                if w.base_mb is not None:
                    start_failures = 0
                if reason is None:
                    continue
                pool.remove(w)
                w.close(graceful=False)
                if w.task is not None:
                    pos, key, _ = w.task
                    self.lost[self.video_of(key)] = w.reason or reason
                    done[pos] = self.dataset.failed(key, self.lost[self.video_of(key)])
                elif w.base_mb is None:
                    start_failures += 1
                    if start_failures >= START_FAILURES:
                        raise RuntimeError(f"{START_FAILURES} decode workers in a row died before taking a video "
                                           f"({reason}); run with --workers 0 to see why")
                with self.lock:
                    self.wanted += 1  # a fresh worker takes over
            while next_pos in done:
                group.append(done.pop(next_pos))
                next_pos += 1
                if len(group) == self.batch_size:
                    self._put(group)
                    group = []
        if group and not self.stop.is_set():
            self._put(group)

    def _put(self, group: list) -> None:
        batch = self.collate(group)
        self.out.put(batch.pin_memory() if self.pin else batch)

    def _check(self, w: _Worker, done: dict[int, Any]) -> str | None:
        """None while ``w`` is fine (taking its message if one came); else why it is gone."""
        try:
            if w.conn.poll():
                kind, value = w.conn.recv()
                if kind in ("ready", "base"):  # at start, and after each video (heap trimmed): what growth counts from
                    w.base_mb = value
                else:
                    done[w.task[0]] = value
                    w.task = None
                return None
        except Exception as exc:  # noqa: BLE001 - a half-sent message: the worker died while sending
            w.process.join(timeout=1)
            return w.reason or (_exit_reason(w.process.exitcode) if w.process.exitcode is not None
                                else f"the decoded video could not be received ({describe(exc)})")
        if not w.process.is_alive():
            w.process.join(timeout=1)
            return w.reason or _exit_reason(w.process.exitcode)
        now = time.monotonic()
        if w.base_mb is None and now - w.created > self.limits.seconds:
            w.kill(f"decode worker did not start within {self.limits.seconds:g} s ({TIMEOUT_ENV})")
            return w.reason
        if w.task is not None:  # memory first: a worker over both limits (a late poll) ran out of memory
            if w.base_mb is not None and _rss_mb(w.process.pid) - w.base_mb > self.limits.memory_mb:
                w.kill(f"exceeded the memory limit of {self.limits.memory_mb} MB ({MEMORY_ENV})")
                return w.reason
            if now - w.task[2] > self.limits.seconds:
                w.kill(f"timed out after {self.limits.seconds:g} s (the per-video limit, {TIMEOUT_ENV})")
                return w.reason
        return None
