"""The HDF5 feature cache: per-video backbone features for every TTA variant, with provenance.

Layout of a compacted cache file (``format = "arena-feature-cache"``, ``format_version = 1``)::

    attrs: format, format_version, provenance (canonical JSON) and one JSON attribute per provenance field
    key                [N]       fixed-length UTF-8 bytes, sorted
    status             [N]       b"ok" | b"partial" | b"failed"
    message            [N]       fixed-length UTF-8 bytes (why partial / failed)
    label              [N]       int64, -1 = no label (test video)
    num_source_frames  [N]       int64, the n that ``uniform_indices(n, k)`` is computed from
    row_start, row_count [N]     int64, the video's rows in the row-wise datasets below
    frame_indices      [R]       int64, source frame index of each row (strictly increasing per video)
    valid              [R]       bool, False for a row that the decoder filled with another frame
    features           [R, V, d] float16, rows x variants x feature dim (one contiguous block per video)

Crash safety. A kill at any moment must lose no finished video, and in-place HDF5 appends are not safe
(a half-written metadata block makes the whole file unreadable). So each finished video is first
*staged* as one small ``.npz`` in ``<cache>.parts/`` (written to a temp name, fsync'd, then atomically
renamed), and readers see the main file plus the staged parts as one cache. ``CacheWriter.close()``
*compacts*: it writes main + parts into ``<cache>.tmp`` in sorted key order with a deterministic layout
(no timestamps), fsyncs, renames it onto ``<cache>`` and only then deletes the parts. A kill during
compaction leaves the old main file and the parts intact. Because the compacted file depends only on
the set of videos, an interrupted and resumed run gives a file byte-identical to an uninterrupted one,
and merging shards gives the same bytes as a single-process run over the same videos.

Reading: the index is loaded at open; the features block is contiguous and memory-mapped on first use, so a
batch gathers only the rows it needs and the OS page cache serves repeated reads (tools/bench_cache.py).
A writer does not compact when it starts (close() does, and readers see staged parts anyway), so a resumed
run rewrites the file once, not twice.

Failed videos are recorded (status ``failed`` + message) and count as done, so a rerun does not retry
them unless asked: ``done_keys(retry_failed=True)`` leaves them out, and writing such a key again
replaces the failure record.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import glob as _glob
import hashlib
import io
import json
import operator
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT = "arena-feature-cache"
FORMAT_VERSION = 1
STATUSES = ("ok", "partial", "failed")
DEFAULT_FRAME_COUNTS = (24, 32, 48)

_PART_SUFFIX = ".npz"
_PROVENANCE_FILE = "provenance.json"
_SHARD_RE = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)(?P<suffix>\.[^.]*)?$")


class CacheError(RuntimeError):
    """A cache that cannot be used as asked: names the file, the problem and what to do."""


def _rebuild_hint(path: str | os.PathLike) -> str:
    return (
        f"Rebuild it with `arena features --cache {path}` (or `make features`), "
        f"or delete {path} and {path}.parts/ to start afresh."
    )


def _uniform_indices(num_frames: int, k: int) -> np.ndarray:
    # Imported lazily: arena.video pulls in torch/torchcodec, which `arena cache info` and the kill tests do not need.
    # The cache must use exactly the indices the decoder uses, so there is one definition, in arena.video.
    from arena.video import uniform_indices

    return np.asarray(uniform_indices(int(num_frames), int(k)), dtype=np.int64)


def union_indices(num_source_frames: int, frame_counts: Iterable[int]) -> np.ndarray:
    """Sorted union of ``uniform_indices(n, k)`` over ``frame_counts``: the frames to decode once per video.

    Args:
        num_source_frames: n, the number of frames the video yields (>= 1).
        frame_counts: the k values the cache must serve, e.g. (24, 32, 48).
    """
    n = operator.index(num_source_frames)
    counts = [operator.index(k) for k in frame_counts]
    if n < 1:
        raise ValueError(f"num_source_frames must be >= 1, got {n}")
    if not counts or min(counts) < 1:
        raise ValueError(f"frame_counts must be a non-empty list of positive ints, got {list(frame_counts)}")
    return np.unique(np.concatenate([_uniform_indices(n, k) for k in counts])).astype(np.int64)


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """Path of shard ``index`` (0-based) of ``count``: ``cache.h5`` -> ``cache.shard-0-of-4.h5``."""
    index, count = operator.index(index), operator.index(count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must satisfy 0 <= index < count, got index={index}, count={count}")
    p = Path(path)
    return p.with_name(f"{p.stem}.shard-{index}-of-{count}{p.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse a ``--shard i/n`` option (i is 0-based) into ``(i, n)``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"Invalid shard {text!r}. Expected i/n with 0 <= i < n, e.g. 0/4.")
    index, count = int(m.group(1)), int(m.group(2))
    shard_path("x.h5", index, count)  # validates the range
    return index, count


def shard_keys(keys: Iterable[str], index: int, count: int) -> list[str]:
    """The keys that shard ``index`` of ``count`` processes: every count-th of the sorted keys."""
    shard_path("x.h5", index, count)
    return sorted(keys)[index::count]


# --------------------------------------------------------------------------------------------------------------------
# Provenance


@dataclass(frozen=True)
class Provenance:
    """Everything that determines the cached numbers; a cache built with other values is refused.

    ``frame_counts`` and ``variants`` say what was extracted; a reader may ask for any k whose frames are
    covered and any subset of the variants.
    """

    backbone: str
    weights_source: str
    weights_hash: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    tta: dict
    variants: tuple[str, ...]
    frame_counts: tuple[int, ...]
    arena_version: str
    split_sha256: str
    feature_dim: int

    def __post_init__(self) -> None:
        def norm(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("backbone", "weights_source", "weights_hash", "interpolation", "arena_version", "split_sha256"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Provenance.{name} must be a str, got {getattr(self, name)!r}")
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Provenance.input_size must be (height, width) > 0, got {self.input_size!r}")
        norm("input_size", size)
        norm("mean", tuple(float(v) for v in self.mean))
        norm("std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"Provenance.mean and std must have the same non-zero length, got {self.mean}, {self.std}")
        variants = tuple(self.variants)
        if not variants or len(set(variants)) != len(variants) or not all(isinstance(v, str) for v in variants):
            raise ValueError(f"Provenance.variants must be distinct names, got {self.variants!r}")
        norm("variants", variants)
        counts = tuple(sorted({operator.index(k) for k in self.frame_counts}))
        if not counts or counts[0] < 1:
            raise ValueError(f"Provenance.frame_counts must be positive ints, got {self.frame_counts!r}")
        norm("frame_counts", counts)
        if operator.index(self.feature_dim) < 1:
            raise ValueError(f"Provenance.feature_dim must be >= 1, got {self.feature_dim}")
        norm("feature_dim", operator.index(self.feature_dim))
        try:  # a JSON round trip makes tuples lists and keys strings, so the stored and the live spec compare equal
            norm("tta", json.loads(json.dumps(dict(self.tta), sort_keys=True)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Provenance.tta must be a JSON-serialisable dict, got {self.tta!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON: the same provenance always gives the same string (stored in the file)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Inverse of :meth:`to_dict`; refuses missing or unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"provenance fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def diff(self, other: Provenance, *, ignore: Iterable[str] = ()) -> list[str]:
        """Human-readable differences, one ``"field: self -> other"`` line per differing field."""
        a, b, skip = self.to_dict(), other.to_dict(), set(ignore)
        return [
            f"{name}: {_short(a[name])} -> {_short(b[name])}"
            for name in a
            if name not in skip and a[name] != b[name]
        ]


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# Records and their storage


class _Source:
    """Where a video's feature rows live: a main HDF5 file (rows [R, V, d]) or one staged part (its own array)."""

    def __init__(self, label: str, *, dataset: Any = None, part: Path | None = None) -> None:
        self.label = label
        self._array: np.ndarray | None = None
        self._dataset = dataset
        self._part = part

    def _read(self) -> np.ndarray:
        if self._part is not None:  # a staged part is read whole (it is one video); not kept, so compaction streams
            try:
                with np.load(self._part, allow_pickle=False) as z:
                    return z["features"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                raise CacheError(f"Staged cache part {self.label} is damaged ({exc}); delete it and rerun "
                                 "`arena features` to recompute its video.") from exc
        ds = self._dataset
        try:
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if offset is not None:
                # Memory-map the contiguous block: no copy of the whole file, gathers touch only the rows they need,
                # and the OS page cache keeps it for the next reader. Check the size first: mapping past the end of
                # a truncated file would crash the process (SIGBUS) instead of raising.
                if offset + ds.size * ds.dtype.itemsize > os.path.getsize(self.label):
                    raise ValueError("the features block runs past the end of the file (truncated)")
                return np.memmap(self.label, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
            return ds[...]
        except Exception as exc:  # noqa: BLE001 - any h5py read failure means a damaged file
            raise CacheError(f"Cannot read features from {self.label}: {exc}. {_rebuild_hint(self.label)}") from exc

    def rows(self, start: int, count: int) -> np.ndarray:
        if self._array is not None:
            return self._array[start : start + count]
        if self._part is not None:
            return self._read()[start : start + count]
        try:
            return self._dataset[start : start + count]
        except Exception as exc:  # noqa: BLE001 - any h5py read failure means a damaged file
            raise CacheError(f"Cannot read features from {self.label}: {exc}. {_rebuild_hint(self.label)}") from exc

    def load(self) -> np.ndarray:
        """All rows as one array (a read-only memory map of a main file, kept): batch() gathers from here."""
        if self._array is None:
            self._array = self._read()
        return self._array


@dataclass
class _Entry:
    key: str
    status: str
    label: int | None
    num_source_frames: int
    message: str
    frame_indices: np.ndarray
    valid: np.ndarray
    source: _Source
    row_start: int

    @property
    def row_count(self) -> int:
        return int(self.frame_indices.shape[0])

    def features(self) -> np.ndarray:
        return self.source.rows(self.row_start, self.row_count)

    def same_data(self, other: _Entry) -> bool:
        return (
            (self.status, self.label, self.num_source_frames, self.message)
            == (other.status, other.label, other.num_source_frames, other.message)
            and np.array_equal(self.frame_indices, other.frame_indices)
            and np.array_equal(self.valid, other.valid)
            and np.array_equal(self.features().view(np.uint16), other.features().view(np.uint16))
        )


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _part_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40] + _PART_SUFFIX


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name in the same folder, fsync, rename: the file is either old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _read_main(path: Path) -> tuple[Provenance, dict[str, _Entry], Any]:
    """Open a compacted cache file; returns provenance, entries and the open h5py file (caller closes)."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError with a cryptic text for garbage/truncation
        raise CacheError(
            f"{path} is not a readable HDF5 feature cache (damaged, truncated or not HDF5: {exc}). "
            + _rebuild_hint(path)
        ) from exc
    try:
        if fh.attrs.get("format") != FORMAT:
            raise CacheError(f"{path} is an HDF5 file but not an arena feature cache. {_rebuild_hint(path)}")
        version = int(fh.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format version {version}; this arena reads version {FORMAT_VERSION}. "
                f"{_rebuild_hint(path)}"
            )
        prov = Provenance.from_json(fh.attrs["provenance"])
        keys = [k.decode() for k in fh["key"][...]]
        status = [s.decode() for s in fh["status"][...]]
        message = [m.decode() for m in fh["message"][...]]
        label = fh["label"][...]
        nsrc = fh["num_source_frames"][...]
        start, count = fh["row_start"][...], fh["row_count"][...]
        frame_indices, valid = fh["frame_indices"][...], fh["valid"][...]
        feats = fh["features"]
        n, rows = len(keys), frame_indices.shape[0]
        shapes_ok = (
            all(len(a) == n for a in (status, message, label, nsrc, start, count))
            and valid.shape == (rows,)
            and feats.shape == (rows, len(prov.variants), prov.feature_dim)
            and feats.dtype == np.float16
            and len(set(keys)) == n
            and set(status) <= set(STATUSES)
            and bool(np.all(start >= 0))
            and bool(np.all(start + count <= rows))
        )
        if not shapes_ok:
            raise CacheError(f"{path} has inconsistent cache datasets (damaged file). {_rebuild_hint(path)}")
        source = _Source(str(path), dataset=feats)
        entries = {}
        for i, key in enumerate(keys):
            s, c = int(start[i]), int(count[i])
            entries[key] = _Entry(
                key=key, status=status[i], label=None if label[i] < 0 else int(label[i]),
                num_source_frames=int(nsrc[i]), message=message[i], frame_indices=frame_indices[s : s + c],
                valid=valid[s : s + c], source=source, row_start=s,
            )
        return prov, entries, fh
    except CacheError:
        fh.close()
        raise
    except Exception as exc:  # noqa: BLE001 - KeyError/ValueError from a file that is HDF5 but not ours or damaged
        fh.close()
        raise CacheError(f"{path} is damaged or not an arena feature cache ({exc!r}). {_rebuild_hint(path)}") from exc


def _read_part(file: Path, cache_path: Path) -> tuple[str, _Entry]:
    """Load one staged video (small, fully in memory); returns its provenance fingerprint and entry."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            fi, valid = z["frame_indices"], z["valid"]
        entry = _Entry(
            key=meta["key"], status=meta["status"], label=meta["label"],
            num_source_frames=int(meta["num_source_frames"]), message=meta["message"],
            frame_indices=fi.astype(np.int64), valid=valid.astype(bool),
            source=_Source(str(file), part=file), row_start=0,
        )
        if meta.get("format_version") != FORMAT_VERSION or entry.status not in STATUSES or valid.shape != fi.shape:
            raise ValueError("unexpected contents")
        return meta["provenance_sha256"], entry
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CacheError(
            f"Staged cache part {file} of {cache_path} is damaged ({exc}). Delete that part (its video will be "
            f"recomputed) and rerun `arena features --cache {cache_path}`."
        ) from exc


class _Store:
    """One cache path as the reader sees it: the compacted main file plus any staged parts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.provenance: Provenance | None = None
        self.entries: dict[str, _Entry] = {}
        self._h5: Any = None
        parts = _parts_dir(path)
        if path.exists():
            self.provenance, self.entries, self._h5 = _read_main(path)
        prov_file = parts / _PROVENANCE_FILE
        if prov_file.exists():
            try:
                staged = Provenance.from_json(prov_file.read_text())
            except (OSError, ValueError, TypeError) as exc:
                self.close()
                raise CacheError(f"{prov_file} is damaged ({exc}). {_rebuild_hint(path)}") from exc
            if self.provenance is None:
                self.provenance = staged
            elif staged != self.provenance:
                self.close()
                raise CacheError(
                    f"Staged parts in {parts} were written with another configuration than {path}: "
                    + "; ".join(self.provenance.diff(staged)) + f". {_rebuild_hint(path)}"
                )
        if self.provenance is None:
            raise CacheError(f"No feature cache at {path}. Build it with `arena features --cache {path}` "
                             "(or `make features`).")
        fingerprint = self.provenance.fingerprint()
        for file in sorted(parts.glob("*" + _PART_SUFFIX)) if parts.is_dir() else []:
            if file.name.startswith("."):
                continue
            try:
                fp, entry = _read_part(file, path)
            except FileNotFoundError:  # removed by a writer's compaction meanwhile: its video is in the main file
                continue
            except CacheError:
                self.close()
                raise
            if fp != fingerprint:
                self.close()
                raise CacheError(f"Staged part {file} was written with another configuration than {path}. "
                                 f"{_rebuild_hint(path)}")
            self.entries[entry.key] = entry  # a staged part is newer than the main file (e.g. a retried failure)

    def has_parts(self) -> bool:
        parts = _parts_dir(self.path)
        return parts.is_dir() and any(not p.name.startswith(".") for p in parts.glob("*" + _PART_SUFFIX))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _exists(path: Path) -> bool:
    """A cache is there: a main file, or staged parts (which start with provenance.json)."""
    return path.exists() or (_parts_dir(path) / _PROVENANCE_FILE).exists()


def _write_compacted(out: Path, provenance: Provenance, entries: Iterable[_Entry]) -> None:
    """Write a compacted cache file to ``out`` (sorted keys, no timestamps): same videos -> same bytes."""
    import h5py

    items = sorted(entries, key=lambda e: e.key)
    n = len(items)
    counts = np.array([e.row_count for e in items], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    rows = int(counts.sum())

    def text(values: list[str]) -> np.ndarray:
        raw = [v.encode() for v in values]
        return np.array(raw, dtype=f"S{max([1, *map(len, raw)])}")

    with h5py.File(out, "w", libver="earliest", track_order=False) as fh:
        fh.attrs["format"] = FORMAT
        fh.attrs["format_version"] = FORMAT_VERSION
        fh.attrs["provenance"] = provenance.to_json()
        for name, value in provenance.to_dict().items():  # one attribute per field, readable with h5dump / h5ls
            fh.attrs[f"provenance.{name}"] = json.dumps(value, sort_keys=True)

        def put(name: str, data: np.ndarray) -> None:
            fh.create_dataset(name, data=data, track_times=False)

        put("key", text([e.key for e in items]))
        put("status", text([e.status for e in items]))
        put("message", text([e.message for e in items]))
        put("label", np.array([-1 if e.label is None else e.label for e in items], dtype=np.int64))
        put("num_source_frames", np.array([e.num_source_frames for e in items], dtype=np.int64))
        put("row_start", starts)
        put("row_count", counts)
        put("frame_indices", np.concatenate([e.frame_indices for e in items] or [np.zeros(0)]).astype(np.int64))
        put("valid", np.concatenate([e.valid for e in items] or [np.zeros(0)]).astype(bool))
        feats = fh.create_dataset(
            "features", shape=(rows, len(provenance.variants), provenance.feature_dim), dtype=np.float16,
            track_times=False,
        )
        for entry, start in zip(items, starts, strict=True):  # streamed video by video: memory stays bounded
            if entry.row_count:
                feats[int(start) : int(start) + entry.row_count] = entry.features()
    _fsync_path(out)


def _install(tmp: Path, path: Path) -> None:
    """Atomically put a finished compacted file in place, then drop the staged parts it now contains."""
    os.replace(tmp, path)
    _fsync_path(path.parent)
    _drop_parts(path)


def _drop_parts(path: Path) -> None:
    """Delete the staged parts folder (its videos are in the main file); provenance.json goes last."""
    parts = _parts_dir(path)
    if parts.is_dir():
        for file in parts.iterdir():
            if file.name != _PROVENANCE_FILE:
                file.unlink(missing_ok=True)
        (parts / _PROVENANCE_FILE).unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------------
# Writer


class _WriteLock:
    """Exclusive, non-blocking ``flock`` on ``<cache>.lock``; the file records the holder's pid for the message."""

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

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
        self._parts = _parts_dir(self.path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fingerprint = provenance.fingerprint()
        self._closed = False
        self._lock = _WriteLock(self.path)
        try:
            self._cleanup_stale()
            self._status: dict[str, str] = {}
            if _exists(self.path):
                store = _Store(self.path)
                try:
                    differences = store.provenance.diff(provenance)
                    if differences:
                        raise CacheError(
                            f"{self.path} was built with another configuration ("
                            + "; ".join(differences) + "). Delete it (and its .parts/ folder) or point "
                            "`arena features --cache` at a new file to rebuild."
                        )
                    self._status = {k: e.status for k, e in store.entries.items()}
                finally:
                    store.close()
        except BaseException:
            self._lock.release()
            raise

    def _cleanup_stale(self) -> None:
        # Leftovers of a killed writer: an unfinished compaction and half-written parts. We hold the lock, so
        # nobody else is writing them.
        self._tmp.unlink(missing_ok=True)
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
              valid: np.ndarray | None = None) -> None:
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
        self._stage(key, np.ascontiguousarray(feats.transpose(1, 0, 2)), fi, v, n, label, status, message)

    def write_failure(self, key: str, *, label: int | None, message: str, num_source_frames: int = 0) -> None:
        """Record a video that could not be processed (reported by ``failures()``, not retried by default)."""
        self._check_open()
        empty = np.zeros((0, len(self.provenance.variants), self.provenance.feature_dim), np.float16)
        self._stage(key, empty, np.zeros(0, np.int64), np.zeros(0, bool), int(num_source_frames), label, "failed",
                    str(message))

    def _stage(self, key: str, rows: np.ndarray, fi: np.ndarray, valid: np.ndarray, n: int, label: int | None,
               status: str, message: str) -> None:
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"Invalid key {key!r}: expected a non-empty string")
        if label is not None:
            label = operator.index(label)
            if label < 0:
                raise ValueError(f"{key}: label must be None or >= 0, got {label}")
        previous = self._status.get(key)
        if previous is not None and previous != "failed":
            raise ValueError(f"{key} is already in {self.path} (status {previous}); skip the keys in done_keys()")
        prov_file = self._parts / _PROVENANCE_FILE
        if not prov_file.exists():  # before the first part: a reader must know the provenance of staged parts
            self._parts.mkdir(parents=True, exist_ok=True)
            _atomic_write(prov_file, self.provenance.to_json().encode())
        meta = {"key": key, "status": status, "label": label, "num_source_frames": n, "message": message,
                "format_version": FORMAT_VERSION, "provenance_sha256": self._fingerprint}
        buf = io.BytesIO()
        np.savez(buf, features=rows, frame_indices=fi, valid=valid,
                 meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        _atomic_write(self._parts / _part_name(key), buf.getvalue())
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
        if not _exists(self.path):  # nothing written at all: still leave a (empty) cache that says how it was built
            _write_compacted(self._tmp, self.provenance, [])
            _install(self._tmp, self.path)
            return
        store = _Store(self.path)
        try:
            if self.path.exists() and not store.has_parts():
                _drop_parts(self.path)  # at most a provenance.json left by a kill: nothing staged
                return
            _write_compacted(self._tmp, self.provenance, store.entries.values())
        finally:
            store.close()
        _install(self._tmp, self.path)

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


# --------------------------------------------------------------------------------------------------------------------
# Reader


def _expand(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not items:
        raise CacheError("No cache paths given. Build a cache with `arena features --cache PATH` (or `make features`).")
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if _glob.has_magic(text):
            found = sorted({_base_of(Path(p)) for p in _glob.glob(text)})
            if not found:
                raise CacheError(f"No cache files match {text}. Build them with `arena features --cache PATH`.")
            paths.extend(found)
        elif not _exists(Path(text)):
            paths.extend(_find_shards(Path(text)))
        else:
            paths.append(Path(text))
    return list(dict.fromkeys(paths))


def _base_of(path: Path) -> Path:
    """``x.h5.parts`` / ``x.h5.lock`` -> ``x.h5`` (so that a glob like ``cache.shard-*`` works)."""
    for suffix in (".parts", ".lock", ".tmp"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _find_shards(path: Path) -> list[Path]:
    """A missing ``cache.h5`` whose shards exist: return the complete shard set, or say which are missing."""
    pattern = f"{_glob.escape(path.stem)}.shard-*-of-*{path.suffix}"
    found = {p for p in path.parent.glob(pattern)} | {_base_of(p) for p in path.parent.glob(pattern + ".parts")}
    shards: dict[int, set[int]] = {}
    for p in found:
        m = _SHARD_RE.match(p.name)
        if m and m.group("stem") == path.stem:
            shards.setdefault(int(m.group("n")), set()).add(int(m.group("i")))
    if not shards:
        raise CacheError(f"No feature cache at {path}. Build it with `arena features --cache {path}` "
                         "(or `make features`).")
    if len(shards) > 1:
        raise CacheError(f"No {path}, and its shard files mix shard counts {sorted(shards)}; pass the shard files "
                         "you mean explicitly, or merge them with `arena cache merge`.")
    (count, have), = shards.items()
    missing = sorted(set(range(count)) - have)
    if missing:
        raise CacheError(f"No {path}, and shards {missing} of {count} are missing ("
                         + ", ".join(str(shard_path(path, i, count)) for i in missing)
                         + f"). Run `arena features --cache {path} --shard i/{count}` for them.")
    return [shard_path(path, i, count) for i in range(count)]


class FeatureCache:
    """Reader over one cache file or a set of shards, seen as one cache. Use :meth:`open`."""

    def __init__(self, stores: list[_Store], entries: dict[str, _Entry], provenance: Provenance) -> None:
        self._stores = stores
        self._entries = dict(sorted(entries.items()))
        self.provenance = provenance
        self.paths = [s.path for s in stores]
        self.keys = [k for k, e in self._entries.items() if e.status != "failed"]
        self._variant_index = {v: i for i, v in enumerate(provenance.variants)}

    @classmethod
    def open(cls, path_or_paths: str | os.PathLike | Sequence[str | os.PathLike], *,
             expect: Provenance | None = None) -> FeatureCache:
        """Open a cache (a file, a list of shard files, or a glob) and check it against ``expect``.

        A missing ``cache.h5`` whose shards ``cache.shard-i-of-n.h5`` all exist opens the shard set.
        ``expect`` may ask for a subset of the stored variants and for frame counts other than the stored ones
        as long as every video's stored frames cover them.

        Raises:
            CacheError: missing/damaged file, differing provenance between shards or against ``expect``,
                duplicate keys with different data, or frame counts that the stored frames do not cover.
        """
        paths = _expand(path_or_paths)
        stores: list[_Store] = []
        try:
            for p in paths:
                stores.append(_Store(p))
            provenance = stores[0].provenance
            entries: dict[str, _Entry] = {}
            origin: dict[str, Path] = {}
            for store in stores:
                differences = provenance.diff(store.provenance)
                if differences:
                    raise CacheError(f"{store.path} and {stores[0].path} were built with different configurations ("
                                     + "; ".join(differences) + "); they cannot be read as one cache.")
                for key, entry in store.entries.items():
                    if key in entries and not entries[key].same_data(entry):
                        raise CacheError(f"Video {key} is in both {origin[key]} and {store.path} with different "
                                         "data; remove one of them (or rebuild it).")
                    entries.setdefault(key, entry)
                    origin.setdefault(key, store.path)
            cache = cls(stores, entries, provenance)
            if expect is not None:
                cache._check_expected(expect)
            return cache
        except BaseException:
            for store in stores:
                store.close()
            raise

    def _check_expected(self, expect: Provenance) -> None:
        where = ", ".join(map(str, self.paths))
        differences = self.provenance.diff(expect, ignore=("frame_counts", "variants"))
        if differences:
            raise CacheError(
                f"Feature cache {where} does not match the current configuration ("
                + "; ".join(differences) + f"). {_rebuild_hint(self.paths[0])}"
            )
        missing = [v for v in expect.variants if v not in self._variant_index]
        if missing:
            raise CacheError(f"Feature cache {where} has variants {list(self.provenance.variants)}, not {missing}. "
                             f"{_rebuild_hint(self.paths[0])}")
        for k in expect.frame_counts:
            if k not in self.provenance.frame_counts:
                for key in self.keys:
                    self._positions(key, k)  # raises CacheError naming the first uncovered video

    # -- per video ---------------------------------------------------------------------------------------------------

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"Video {key!r} is not in the feature cache {', '.join(map(str, self.paths))}") from None

    def label(self, key: str) -> int | None:
        """0/1 for training videos, None for test videos."""
        return self._entry(key).label

    def status(self, key: str) -> str:
        """"ok", "partial" or "failed"."""
        return self._entry(key).status

    def message(self, key: str) -> str:
        return self._entry(key).message

    def num_source_frames(self, key: str) -> int:
        return self._entry(key).num_source_frames

    def failures(self) -> dict[str, str]:
        """Failed videos and why: ``{key: message}``."""
        return {k: e.message for k, e in self._entries.items() if e.status == "failed"}

    def partials(self) -> dict[str, str]:
        return {k: e.message for k, e in self._entries.items() if e.status == "partial"}

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for e in self._entries.values() if e.status == s) for s in STATUSES}

    def _positions(self, key: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``uniform_indices(n, k)`` inside the video's stored rows, and the attention mask."""
        entry = self._entry(key)
        if entry.status == "failed":
            raise CacheError(f"Video {key} failed during feature extraction ({entry.message}); it has no features. "
                             "Leave it out (FeatureCache.keys lists the usable videos) or rerun `arena features` "
                             "with retry of failed videos.")
        k = operator.index(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        want = _uniform_indices(entry.num_source_frames, k)
        pos = np.searchsorted(entry.frame_indices, want)
        pos_clipped = np.minimum(pos, entry.row_count - 1)
        if np.any(entry.frame_indices[pos_clipped] != want):
            lacking = sorted(set(want.tolist()) - set(entry.frame_indices.tolist()))
            raise CacheError(
                f"Feature cache {entry.source.label} cannot serve k={k} for {key} (n={entry.num_source_frames}): "
                f"frames {lacking[:10]}{'...' if len(lacking) > 10 else ''} were not extracted (built for frame counts "
                f"{list(self.provenance.frame_counts)}). Rebuild with `arena features --frames ...` including {k}."
            )
        first = np.ones(k, dtype=bool)
        first[1:] = want[1:] != want[:-1]  # linspace indices are sorted, so a repeat follows its first occurrence
        mask = first & entry.valid[pos_clipped]
        if not mask.any():  # no valid row at all: keep the attention softmax defined
            mask = first
        return pos_clipped, mask

    def _variant_ids(self, variants: str | int | Sequence[str | int]) -> list[int]:
        if isinstance(variants, str) and variants == "all":
            return list(range(len(self.provenance.variants)))
        items = [variants] if isinstance(variants, (str, int)) else list(variants)
        ids = []
        for v in items:
            if isinstance(v, str):
                if v not in self._variant_index:
                    raise ValueError(f"Unknown variant {v!r}. This cache has {list(self.provenance.variants)}.")
                ids.append(self._variant_index[v])
            else:
                i = operator.index(v)
                if not 0 <= i < len(self.provenance.variants):
                    raise ValueError(f"Variant index {i} out of range 0..{len(self.provenance.variants) - 1}")
                ids.append(i)
        return ids

    def features(self, key: str, k: int, variant: str | int = "original") -> tuple[np.ndarray, np.ndarray]:
        """Features of the k frames at ``uniform_indices(n, k)`` for one variant.

        Returns:
            (float16 [k, d], bool mask [k]: True for the first occurrence of each frame index).
        """
        (vid,) = self._variant_ids(variant)
        pos, mask = self._positions(key, k)
        entry = self._entry(key)
        return entry.features()[pos, vid], mask

    def batch(self, keys: Sequence[str], k: int,
              variants: Literal["all"] | str | int | Sequence[str | int] = "all") -> tuple[np.ndarray, np.ndarray]:
        """Features of many videos at once, for vectorised head training.

        The first call memory-maps each file's feature block (read once into the OS page cache); every call then
        gathers only the rows it needs. 600 videos x 5 variants x 48 frames x 1536-d: about a second.

        Returns:
            (float16 [N, V, k, d], bool mask [N, k]).
        """
        vids = self._variant_ids(variants)
        keys = list(keys)
        out = np.empty((len(keys), len(vids), k, self.provenance.feature_dim), dtype=np.float16)
        mask = np.empty((len(keys), k), dtype=bool)
        groups: dict[int, tuple[_Source, list[int], list[np.ndarray]]] = {}
        for i, key in enumerate(keys):
            pos, mask[i] = self._positions(key, k)
            entry = self._entries[key]
            group = groups.setdefault(id(entry.source), (entry.source, [], []))
            group[1].append(i)
            group[2].append(entry.row_start + pos)
        for source, index, rows in groups.values():
            data, rows2d = source.load(), np.stack(rows)  # [R, V_all, d], [n, k]
            contiguous = index == list(range(index[0], index[0] + len(index)))
            for j, v in enumerate(vids):
                # np.take straight into the output view: one copy, no temporaries (mode="clip" avoids buffering;
                # the rows were bounds-checked by _positions)
                if contiguous:
                    np.take(data[:, v], rows2d, axis=0, out=out[index[0] : index[0] + len(index), j], mode="clip")
                else:
                    out[index, j] = np.take(data[:, v], rows2d, axis=0, mode="clip")
        return out, mask

    def iter_entries(self) -> Iterator[_Entry]:
        return iter(self._entries.values())

    def size_bytes(self) -> int:
        """Bytes on disk: main files plus staged parts."""
        total = 0
        for p in self.paths:
            if p.exists():
                total += p.stat().st_size
            parts = _parts_dir(p)
            if parts.is_dir():
                total += sum(f.stat().st_size for f in parts.iterdir() if f.is_file())
        return total

    def info(self) -> dict[str, Any]:
        """Summary for `arena cache info`."""
        rows = sum(e.row_count for e in self._entries.values())
        return {"paths": [str(p) for p in self.paths], "videos": len(self._entries), **self.counts(), "rows": rows,
                "size_bytes": self.size_bytes(), "staged": any(s.has_parts() for s in self._stores),
                "provenance": self.provenance.to_dict()}

    def close(self) -> None:
        for store in self._stores:
            store.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"FeatureCache({[str(p) for p in self.paths]}, {self.counts()}, backbone={self.provenance.backbone!r})"


def merge_shards(out: str | os.PathLike, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureCache:
    """Merge shard files (a list or a glob) into one compacted cache at ``out``.

    The result is byte-identical to the cache one process would have written for the same videos. Refuses to
    overwrite an existing ``out``. Returns the merged cache, opened.
    """
    out = Path(out)
    if out.exists() or _parts_dir(out).exists():
        raise CacheError(f"{out} already exists; merge into a new path or delete it first.")
    with FeatureCache.open(paths) as cache:
        lock = _WriteLock(out)
        try:
            tmp = out.with_name(out.name + ".tmp")
            _write_compacted(tmp, cache.provenance, cache.iter_entries())
            os.replace(tmp, out)
            _fsync_path(out.parent)
        finally:
            lock.release()
    return FeatureCache.open(out)
