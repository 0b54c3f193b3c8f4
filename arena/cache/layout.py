"""The cache on disk: the compacted HDF5 file, the staged parts beside it, and how both are read and written.

Layout of a compacted cache file (``format = "arena-feature-cache"``, ``format_version = 2``)::

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
    boxes              [R, 4]    float32, face crops only: the main face track's crop box (x1, y1, x2, y2, source
                                 pixels) of each row, NaN where the video had no face (whole frame, letterboxed)

Format 1 has the same datasets; only its provenance has other fields (`arena.cache.provenance`), so it is read.

Pseudo-fake items (``arena features --pseudo-fakes``) are entries like any other, keyed ``<source key>#<method><i>``
(`pseudo_key`): a dataset key always ends with a video extension, so such a key never names a dataset video.

Staged parts: ``<cache>.parts/provenance.json`` (written first) and one ``<sha256(key)[:40]>.npz`` per finished
video (features [U, V, d], frame_indices, valid, boxes [U, 4] with face crops, and a JSON ``meta`` with the
provenance fingerprint). Readers see the main file plus the staged parts as one cache; a part is newer than the
main file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from arena.cache.provenance import Provenance
from arena.errors import CacheError

FORMAT = "arena-feature-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "partial", "failed")
PART_SUFFIX = ".npz"
PROVENANCE_FILE = "provenance.json"


#: A pseudo-fake item's key: its source video's key, ``#``, the method and the copy's number (``a.mp4#sbi0``).
_PSEUDO_KEY = re.compile(r"^(?P<source>.+)#(?P<method>[a-z]+)(?P<index>[0-9]+)$", re.DOTALL)


def pseudo_key(source: str, method: str, index: int) -> str:
    """The cache key of pseudo-fake copy ``index`` of the video ``source`` (`pseudo_source` inverts it)."""
    if not re.fullmatch("[a-z]+", method) or int(index) < 0:
        raise ValueError(f"pseudo-fake method must be lowercase letters and index >= 0, got {method!r}, {index!r}")
    return f"{source}#{method}{int(index)}"


def pseudo_source(key: str) -> str | None:
    """The source video's key of a pseudo-fake item's key; None for a dataset video's key."""
    match = _PSEUDO_KEY.match(key)
    return None if match is None else match["source"]


def rebuild_hint(path: str | os.PathLike) -> str:
    """The sentence every refusal ends with: how to rebuild the cache at ``path``."""
    return (
        f"Rebuild it with `arena features --cache {path}` (or `make features`), "
        f"or delete {path} and {path}.parts/ to start afresh."
    )


def parts_dir(path: Path) -> Path:
    """``cache.h5`` -> ``cache.h5.parts``: the folder of staged videos."""
    return path.with_name(path.name + ".parts")


def part_name(key: str) -> str:
    """File name of a video's staged part (the key hashed: keys contain slashes)."""
    return hashlib.sha256(key.encode()).hexdigest()[:40] + PART_SUFFIX


def cache_exists(path: Path) -> bool:
    """A cache is there: a main file, or staged parts (which start with provenance.json)."""
    return path.exists() or (parts_dir(path) / PROVENANCE_FILE).exists()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Source:
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
            raise CacheError(f"Cannot read features from {self.label}: {exc}. {rebuild_hint(self.label)}") from exc

    def rows(self, start: int, count: int) -> np.ndarray:
        """Rows ``[start, start + count)`` as ``[count, V, d]``."""
        if self._array is not None:
            return self._array[start : start + count]
        if self._part is not None:
            return self._read()[start : start + count]
        try:
            return self._dataset[start : start + count]
        except Exception as exc:  # noqa: BLE001 - any h5py read failure means a damaged file
            raise CacheError(f"Cannot read features from {self.label}: {exc}. {rebuild_hint(self.label)}") from exc

    def load(self) -> np.ndarray:
        """All rows as one array (a read-only memory map of a main file, kept): batch() gathers from here."""
        if self._array is None:
            self._array = self._read()
        return self._array


@dataclass
class Entry:
    """One video of a cache: its record and where its feature rows are."""

    key: str
    status: str
    label: int | None
    num_source_frames: int
    message: str
    frame_indices: np.ndarray
    valid: np.ndarray
    source: Source
    row_start: int
    boxes: np.ndarray | None = None  # float32 [U, 4], face crops only

    @property
    def row_count(self) -> int:
        return int(self.frame_indices.shape[0])

    def features(self) -> np.ndarray:
        return self.source.rows(self.row_start, self.row_count)

    def same_data(self, other: Entry) -> bool:
        return (
            (self.status, self.label, self.num_source_frames, self.message)
            == (other.status, other.label, other.num_source_frames, other.message)
            and np.array_equal(self.frame_indices, other.frame_indices)
            and np.array_equal(self.valid, other.valid)
            and (self.boxes is None) == (other.boxes is None)
            and (self.boxes is None or np.array_equal(self.boxes, other.boxes, equal_nan=True))
            and np.array_equal(self.features().view(np.uint16), other.features().view(np.uint16))
        )


def read_main(path: Path) -> tuple[Provenance, str, dict[str, Entry], Any]:
    """Open a compacted cache file.

    Returns:
        provenance, sha256 of the provenance JSON as stored (staged parts of the same writer carry it), entries
        and the open h5py file (the caller closes it).
    """
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError with a cryptic text for garbage/truncation
        raise CacheError(
            f"{path} is not a readable HDF5 feature cache (damaged, truncated or not HDF5: {exc}). "
            + rebuild_hint(path)
        ) from exc
    try:
        if fh.attrs.get("format") != FORMAT:
            raise CacheError(f"{path} is an HDF5 file but not an arena feature cache. {rebuild_hint(path)}")
        version = int(fh.attrs.get("format_version", -1))
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"{path} has cache format version {version}; this arena reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. {rebuild_hint(path)}"
            )
        stored = fh.attrs["provenance"]
        prov = Provenance.from_json(stored)
        keys = [k.decode() for k in fh["key"][...]]
        status = [s.decode() for s in fh["status"][...]]
        message = [m.decode() for m in fh["message"][...]]
        label = fh["label"][...]
        nsrc = fh["num_source_frames"][...]
        start, count = fh["row_start"][...], fh["row_count"][...]
        frame_indices, valid = fh["frame_indices"][...], fh["valid"][...]
        feats = fh["features"]
        boxes = fh["boxes"][...] if "boxes" in fh else None
        n, rows = len(keys), frame_indices.shape[0]
        shapes_ok = (
            all(len(a) == n for a in (status, message, label, nsrc, start, count))
            and valid.shape == (rows,)
            and (boxes is None or boxes.shape == (rows, 4))
            and feats.shape == (rows, len(prov.variants), prov.feature_dim)
            and feats.dtype == np.float16
            and len(set(keys)) == n
            and set(status) <= set(STATUSES)
            and bool(np.all(start >= 0))
            and bool(np.all(start + count <= rows))
        )
        if not shapes_ok:
            raise CacheError(f"{path} has inconsistent cache datasets (damaged file). {rebuild_hint(path)}")
        source = Source(str(path), dataset=feats)
        entries = {}
        for i, key in enumerate(keys):
            s, c = int(start[i]), int(count[i])
            entries[key] = Entry(
                key=key, status=status[i], label=None if label[i] < 0 else int(label[i]),
                num_source_frames=int(nsrc[i]), message=message[i], frame_indices=frame_indices[s : s + c],
                valid=valid[s : s + c], source=source, row_start=s,
                boxes=None if boxes is None else boxes[s : s + c],
            )
        return prov, _sha256(stored), entries, fh
    except CacheError:
        fh.close()
        raise
    except Exception as exc:  # noqa: BLE001 - KeyError/ValueError from a file that is HDF5 but not ours or damaged
        fh.close()
        raise CacheError(f"{path} is damaged or not an arena feature cache ({exc!r}). {rebuild_hint(path)}") from exc


def read_part(file: Path, cache_path: Path) -> tuple[str, Entry]:
    """Load one staged video (small, fully in memory); returns its provenance fingerprint and entry."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            fi, valid = z["frame_indices"], z["valid"]
            boxes = z["boxes"].astype(np.float32) if "boxes" in z.files else None
        entry = Entry(
            key=meta["key"], status=meta["status"], label=meta["label"],
            num_source_frames=int(meta["num_source_frames"]), message=meta["message"],
            frame_indices=fi.astype(np.int64), valid=valid.astype(bool),
            source=Source(str(file), part=file), row_start=0, boxes=boxes,
        )
        if (meta.get("format_version") not in READABLE_VERSIONS or entry.status not in STATUSES
                or valid.shape != fi.shape or (boxes is not None and boxes.shape != (fi.shape[0], 4))):
            raise ValueError("unexpected contents")
        return meta["provenance_sha256"], entry
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CacheError(
            f"Staged cache part {file} of {cache_path} is damaged ({exc}). Delete that part (its video will be "
            f"recomputed) and rerun `arena features --cache {cache_path}`."
        ) from exc


class Store:
    """One cache path as the reader sees it: the compacted main file plus any staged parts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.provenance: Provenance | None = None
        self.entries: dict[str, Entry] = {}
        self._h5: Any = None
        fingerprints: set[str] = set()  # of the provenance as stored: a format-1 writer's parts carry its own
        parts = parts_dir(path)
        if path.exists():
            self.provenance, stored_fp, self.entries, self._h5 = read_main(path)
            fingerprints.add(stored_fp)
        prov_file = parts / PROVENANCE_FILE
        if prov_file.exists():
            try:
                text = prov_file.read_text()
                staged = Provenance.from_json(text)
            except (OSError, ValueError, TypeError) as exc:
                self.close()
                raise CacheError(f"{prov_file} is damaged ({exc}). {rebuild_hint(path)}") from exc
            fingerprints.add(_sha256(text))
            if self.provenance is None:
                self.provenance = staged
            elif staged != self.provenance:
                self.close()
                raise CacheError(
                    f"Staged parts in {parts} were written with another configuration than {path}: "
                    + "; ".join(self.provenance.diff(staged)) + f". {rebuild_hint(path)}"
                )
        if self.provenance is None:
            raise CacheError(f"No feature cache at {path}. Build it with `arena features --cache {path}` "
                             "(or `make features`).")
        fingerprints.add(self.provenance.fingerprint())
        for file in sorted(parts.glob("*" + PART_SUFFIX)) if parts.is_dir() else []:
            if file.name.startswith("."):
                continue
            try:
                fp, entry = read_part(file, path)
            except FileNotFoundError:  # removed by a writer's compaction meanwhile: its video is in the main file
                continue
            except CacheError:
                self.close()
                raise
            if fp not in fingerprints:
                self.close()
                raise CacheError(f"Staged part {file} was written with another configuration than {path}. "
                                 f"{rebuild_hint(path)}")
            self.entries[entry.key] = entry  # a staged part is newer than the main file (e.g. a retried failure)

    def has_parts(self) -> bool:
        parts = parts_dir(self.path)
        return parts.is_dir() and any(not p.name.startswith(".") for p in parts.glob("*" + PART_SUFFIX))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def write_compacted(out: Path, provenance: Provenance, entries: Iterable[Entry]) -> None:
    """Write a compacted cache file to ``out`` (sorted keys, no timestamps): same videos -> same bytes.

    ``out`` is a temporary file of `arena._files.atomic_write`, which syncs it and puts it in place.
    """
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
        if provenance.crop_mode != "none":  # whole-frame caches keep the layout (and bytes) they always had
            put("boxes", np.concatenate([_boxes(e) for e in items] or [np.zeros((0, 4))]).astype(np.float32))
        feats = fh.create_dataset(
            "features", shape=(rows, len(provenance.variants), provenance.feature_dim), dtype=np.float16,
            track_times=False,
        )
        for entry, start in zip(items, starts, strict=True):  # streamed video by video: memory stays bounded
            if entry.row_count:
                feats[int(start) : int(start) + entry.row_count] = entry.features()


def _boxes(entry: Entry) -> np.ndarray:
    """An entry's crop boxes, NaN rows for an entry that has none (a failed video has no rows at all)."""
    if entry.boxes is not None:
        return entry.boxes
    return np.full((entry.row_count, 4), np.nan, dtype=np.float32)


def drop_parts(path: Path) -> None:
    """Delete the staged parts folder (its videos are in the main file); provenance.json goes last."""
    parts = parts_dir(path)
    if parts.is_dir():
        for file in parts.iterdir():
            if file.name != PROVENANCE_FILE:
                file.unlink(missing_ok=True)
        (parts / PROVENANCE_FILE).unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass
