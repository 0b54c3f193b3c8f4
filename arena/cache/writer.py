"""Writing a cache: crash-safe staging of each finished video, an exclusive lock, compaction, shard merging.

Crash safety. A kill at any moment must lose no finished video, and in-place HDF5 appends are not safe (a
half-written metadata block makes the whole file unreadable). So each finished video is first *staged* as one
small ``.npz`` in ``<cache>.parts/`` through `arena._files.atomic_write_bytes`, and readers see the main file plus
the staged parts as one cache. ``CacheWriter.close()`` *compacts*: it writes main + parts into a temporary file in
sorted key order with a deterministic layout (no timestamps), which `arena._files.atomic_write` syncs and renames
onto ``<cache>``; only then are the parts deleted. A kill during compaction leaves the old main file and the parts
intact. Because the compacted file depends only on the set of videos, an interrupted and resumed run gives a file
byte-identical to an uninterrupted one, and merging shards gives the same bytes as one process over the same videos.

A writer does not compact when it starts (close() does, and readers see staged parts anyway), so a resumed run
rewrites the file once, not twice; a complete cache that a rerun finds nothing to add to is not rewritten at all.
Failed videos are recorded (status ``failed`` + message) and count as done, so a rerun does not retry them unless
asked: ``done_keys(retry_failed=True)`` leaves them out, and writing such a key again replaces the failure record.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from arena._files import atomic_write, atomic_write_bytes, remove_stale_temporaries
from arena.cache.layout import (
    FORMAT_VERSION,
    PROVENANCE_FILE,
    STATUSES,
    Store,
    cache_exists,
    drop_parts,
    part_name,
    parts_dir,
    write_compacted,
)
from arena.cache.provenance import Provenance
from arena.cache.reader import FeatureCache
from arena.cache.shards import shard_path
from arena.errors import CacheError

_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader and decode workers): close the copies of the lock descriptors.

    A ``flock`` belongs to the open file description, which ``fork`` shares with the child, so a worker kept the
    cache locked until it noticed its parent had died (seconds after a ``kill -9``): a rerun started at once was
    refused as "being written by another process". Workers never write the cache, so they drop their copies
    (closing a copy does not release the parent's lock; spawned workers inherit no descriptors at all).
    """
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class _WriteLock:
    """Exclusive, non-blocking ``flock`` on ``<cache>.lock``; the file records the holder's pid for the message.

    Held by this process only: forked children close their copy (`_drop_inherited_locks`).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CacheError(
                f"{path} is being written by another process (pid {holder}); two writers would corrupt it. "
                f"Wait for that process to finish, or use --shard i/n to split the work into separate files."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _statuses(path: Path, provenance: Provenance) -> dict[str, str]:
    """``{key: status}`` of the videos cached at ``path`` (compacted or staged; {} when there is no cache).

    Raises:
        CacheError: the cache there was built with another configuration than ``provenance``.
    """
    if not cache_exists(path):
        return {}
    store = Store(path)
    try:
        differences = store.provenance.diff(provenance)
        if differences:
            raise CacheError(
                f"{path} was built with another configuration (" + "; ".join(differences) + "). Delete it (and its "
                ".parts/ folder) or point `arena features --cache` at a new file to rebuild."
            )
        return {k: e.status for k, e in store.entries.items()}
    finally:
        store.close()


def cached_statuses(paths: Sequence[str | os.PathLike], provenance: Provenance) -> dict[str, str]:
    """``{key: status}`` of the videos cached at any of ``paths`` (missing ones hold none); a video failed in one and
    cached in another counts as cached.

    Raises:
        CacheError: one of them was built with another configuration than ``provenance``.
    """
    out: dict[str, str] = {}
    for path in paths:
        for key, status in _statuses(Path(path), provenance).items():
            if out.get(key, "failed") == "failed":
                out[key] = status
    return out


class CacheWriter:
    """Crash-safe, resumable writer of one cache file (or one shard); holds an exclusive lock while open.

    Usage::

        with CacheWriter(path, provenance, shard=(0, 4)) as w:
            for key in todo:
                if key not in w.done_keys():
                    w.write(key, features=f, frame_indices=idx, num_source_frames=n, label=y)

    Each ``write`` is durable when it returns (a staged part file); ``close()`` compacts into one file.
    """

    def __init__(self, path: str | os.PathLike, provenance: Provenance, *,
                 shard: tuple[int, int] | None = None) -> None:
        self.path = shard_path(path, *shard) if shard is not None else Path(path)
        self.provenance = provenance
        self._parts = parts_dir(self.path)
        self._fingerprint = provenance.fingerprint()
        self._closed = False
        self._lock = _WriteLock(self.path)
        try:
            self._cleanup_stale()
            self._status: dict[str, str] = _statuses(self.path, provenance)
        except BaseException:
            self._lock.release()
            raise

    def _cleanup_stale(self) -> None:
        # Leftovers of a killed writer: an unfinished compaction and half-written parts. We hold the lock, so
        # nobody else is writing them.
        remove_stale_temporaries(self.path)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)  # a compaction of an earlier release
        if self._parts.is_dir():
            for file in self._parts.iterdir():
                if file.name.startswith("."):
                    file.unlink(missing_ok=True)

    # -- API ---------------------------------------------------------------------------------------------------------

    def done_keys(self, *, retry_failed: bool = False) -> set[str]:
        """Keys already in the cache (compacted or staged). Failed videos count as done unless ``retry_failed``."""
        return {k for k, s in self._status.items() if not (retry_failed and s == "failed")}

    def counts(self) -> dict[str, int]:
        """Number of videos per status, e.g. ``{"ok": 10, "partial": 1, "failed": 2}``."""
        return {s: sum(1 for v in self._status.values() if v == s) for s in STATUSES}

    def write(self, key: str, *, features: np.ndarray, frame_indices: np.ndarray, num_source_frames: int,
              label: int | None, status: Literal["ok", "partial"] = "ok", message: str = "",
              valid: np.ndarray | None = None, boxes: np.ndarray | None = None) -> None:
        """Store one finished video; durable when this returns.

        Args:
            key: the video's key (path relative to the data folder).
            features: float [V, U, d]: V = len(provenance.variants), U = len(frame_indices), d = feature_dim.
            frame_indices: int [U], strictly increasing source frame indices (normally ``union_indices``).
            num_source_frames: n, from which the reader computes ``uniform_indices(n, k)``.
            label: 0/1 for training videos, None for test videos.
            status: "ok", or "partial" when fewer distinct frames than asked could be decoded.
            message: why the video is partial.
            valid: bool [U], False for rows the decoder filled with another frame (masked by the reader).
            boxes: float [U, 4], the main face track's crop box per row; required when the provenance crops faces
                (NaN rows where the video had no face), refused otherwise.
        """
        self._check_open()
        if status not in ("ok", "partial"):
            raise ValueError(f"Invalid status {status!r}. Supported values are ok, partial (use write_failure).")
        n = operator.index(num_source_frames)
        if n < 1:
            raise ValueError(f"{key}: num_source_frames must be >= 1, got {n}")
        fi = np.asarray(frame_indices)
        if fi.ndim != 1 or fi.size == 0 or not np.issubdtype(fi.dtype, np.integer):
            raise ValueError(f"{key}: frame_indices must be a non-empty 1-D int array, got {fi.dtype} {fi.shape}")
        fi = fi.astype(np.int64)
        if np.any(np.diff(fi) <= 0) or fi[0] < 0 or fi[-1] >= n:
            raise ValueError(f"{key}: frame_indices must be strictly increasing within [0, {n - 1}], got {fi.tolist()}")
        feats = np.asarray(features)
        want = (len(self.provenance.variants), fi.size, self.provenance.feature_dim)
        if feats.shape != want or not np.issubdtype(feats.dtype, np.floating):
            raise ValueError(f"{key}: features must be float [variants, frames, dim] = {list(want)}, "
                             f"got {feats.dtype} {list(feats.shape)}")
        feats = feats.astype(np.float16)
        if not np.all(np.isfinite(feats)):
            raise ValueError(f"{key}: features contain NaN/inf (or values beyond float16 range)")
        v = np.ones(fi.size, bool) if valid is None else np.asarray(valid, dtype=bool)
        if v.shape != fi.shape:
            raise ValueError(f"{key}: valid must be bool [{fi.size}], got shape {list(v.shape)}")
        faces = self.provenance.crop_mode != "none"
        if (boxes is not None) != faces:
            raise ValueError(f"{key}: boxes are {'required' if faces else 'only stored'} with face crops "
                             f"(this cache's crop mode is {self.provenance.crop_mode})")
        b = None if boxes is None else np.asarray(boxes, dtype=np.float32)
        if b is not None and b.shape != (fi.size, 4):
            raise ValueError(f"{key}: boxes must be float [{fi.size}, 4], got shape {list(b.shape)}")
        self._stage(key, np.ascontiguousarray(feats.transpose(1, 0, 2)), fi, v, n, label, status, message, b)

    def write_failure(self, key: str, *, label: int | None, message: str, num_source_frames: int = 0) -> None:
        """Record a video that could not be processed (reported by ``failures()``, not retried by default)."""
        self._check_open()
        empty = np.zeros((0, len(self.provenance.variants), self.provenance.feature_dim), np.float16)
        self._stage(key, empty, np.zeros(0, np.int64), np.zeros(0, bool), int(num_source_frames), label, "failed",
                    str(message))

    def _stage(self, key: str, rows: np.ndarray, fi: np.ndarray, valid: np.ndarray, n: int, label: int | None,
               status: str, message: str, boxes: np.ndarray | None = None) -> None:
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"Invalid key {key!r}: expected a non-empty string")
        if label is not None:
            label = operator.index(label)
            if label < 0:
                raise ValueError(f"{key}: label must be None or >= 0, got {label}")
        previous = self._status.get(key)
        if previous is not None and previous != "failed":
            raise ValueError(f"{key} is already in {self.path} (status {previous}); skip the keys in done_keys()")
        prov_file = self._parts / PROVENANCE_FILE
        if not prov_file.exists():  # before the first part: a reader must know the provenance of staged parts
            atomic_write_bytes(prov_file, self.provenance.to_json().encode())
        meta = {"key": key, "status": status, "label": label, "num_source_frames": n, "message": message,
                "format_version": FORMAT_VERSION, "provenance_sha256": self._fingerprint}
        buf = io.BytesIO()
        arrays = {} if boxes is None else {"boxes": boxes}
        np.savez(buf, features=rows, frame_indices=fi, valid=valid, **arrays,
                 meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        atomic_write_bytes(self._parts / part_name(key), buf.getvalue())
        self._status[key] = status

    def close(self) -> None:
        """Compact main file + staged parts into one file (atomically) and release the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.compact()
        finally:
            self._closed = True
            self._lock.release()

    def abandon(self) -> None:
        """Release the lock without compacting (staged videos stay safe; the next writer compacts them)."""
        self._closed = True
        self._lock.release()

    def compact(self) -> None:
        """Rewrite main + parts as one compacted file now (close() does it anyway); no-op when nothing is staged."""
        self._check_open()
        if not cache_exists(self.path):  # nothing written: still leave an (empty) cache that says how it was built
            atomic_write(self.path, lambda tmp: write_compacted(tmp, self.provenance, []))
        else:
            store = Store(self.path)
            try:
                if self.path.exists() and not store.has_parts():
                    drop_parts(self.path)  # at most a provenance.json left by a kill: nothing staged
                    return
                atomic_write(self.path, lambda tmp: write_compacted(tmp, self.provenance, store.entries.values()))
            finally:
                store.close()
        drop_parts(self.path)  # only now: a kill before this leaves parts that repeat the main file's data

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"CacheWriter for {self.path} is closed")

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.abandon()  # Ctrl-C / SystemExit: leave at once; the staged parts keep every finished video
        else:
            self.close()

    def __repr__(self) -> str:
        return f"CacheWriter({str(self.path)!r}, {self.counts()})"


def absorb_shards(out: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> None:
    """Merge ``shards`` into the cache ``out`` (whose videos, if it exists, stay), then delete the shard files.

    The way a torchrun `arena features` ends on rank 0. ``out`` is byte-identical to the cache one process would
    have written for the same videos, and a crash at any moment is safe to rerun: until the new ``out`` is renamed
    into place the old one and the shards are untouched; after that the shards repeat ``out``'s data (which the
    reader accepts), so a rerun merges the same videos again and deletes them. Every file's write lock is held
    meanwhile: a writer still busy with one of them is refused.

    Raises:
        CacheError: a file is being written by another process, or the files disagree (configuration or data).
    """
    out, shards = Path(out), [Path(p) for p in shards]
    locks: list[_WriteLock] = []
    try:
        for path in (out, *shards):
            locks.append(_WriteLock(path))
        sources = [p for p in (out, *shards) if cache_exists(p)]
        if not sources:
            raise CacheError(f"Nothing to merge into {out}: none of {', '.join(map(str, shards))} exists.")
        with FeatureCache.open(sources) as cache:
            if not _holds(out, sum(1 for _ in cache.iter_entries())):  # else nothing to add: left untouched
                atomic_write(out, lambda tmp: write_compacted(tmp, cache.provenance, cache.iter_entries()))
        drop_parts(out)  # a killed one-process run's staged videos: now in the main file
        for path in shards:  # only now: until here a crash leaves every video where it was
            path.unlink(missing_ok=True)
            drop_parts(path)
            path.with_name(path.name + ".lock").unlink(missing_ok=True)
    finally:
        for lock in locks:
            lock.release()


def _holds(path: Path, n: int) -> bool:
    """``path`` is a compacted file of ``n`` videos and nothing staged beside it."""
    if not path.exists():
        return False
    store = Store(path)
    try:
        return not store.has_parts() and len(store.entries) == n
    finally:
        store.close()


def merge_shards(out: str | os.PathLike, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureCache:
    """Merge shard files (a list or a glob) into one compacted cache at ``out``.

    The result is byte-identical to the cache one process would have written for the same videos. Refuses to
    overwrite an existing ``out``. Returns the merged cache, opened.
    """
    out = Path(out)
    if out.exists() or parts_dir(out).exists():
        raise CacheError(f"{out} already exists; merge into a new path or delete it first.")
    with FeatureCache.open(paths) as cache:
        lock = _WriteLock(out)
        try:
            atomic_write(out, lambda tmp: write_compacted(tmp, cache.provenance, cache.iter_entries()))
        finally:
            lock.release()
    return FeatureCache.open(out)
