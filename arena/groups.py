"""Which training videos share a source: a fake and the real it was made from belong to one group.

Deepfake sets make most fakes from a real video that keeps its scene (FaceForensics++ names a fake
``target_source``, DFDC's ``metadata.json`` gives each fake its ``original``; ``arena demo-data`` renders fake i
from real i's scene). A split that puts a fake and its source on different sides lets validation reward memorised
scenes, so `arena.split` keeps every group on one side.

Groups come from the data when it says so, else they are detected:

* ``train_labels.csv`` with a column ``original`` or ``source`` (the file name of the video a fake was made from,
  as the CSV writes names or just its base name) or ``group`` (any id), case-insensitive; an empty cell leaves the
  video in a group of its own. Fakes of a source that is not in the data still join each other.
* a DFDC-style ``metadata.json`` (``{"name.mp4": {"label": "FAKE", "original": "src.mp4"}}``) in the data folder,
  ``train/`` or next to the videos (``train/real``, ``train/fake``). When both exist their pairs are merged.
* otherwise, near-duplicates: 4 uniformly spaced frames of every video decoded at 32x32 (`arena.video`), each
  frame's per-channel mean removed (so a global colour or brightness change does not matter), the whole vector
  normalised; two videos whose vectors correlate at ``threshold`` or more are a pair, and pairs chain into groups
  (connected components). ``DEFAULT_THRESHOLD`` = 0.9 was measured: on the demo preset's 240 videos (120 true
  pairs) true pairs correlate 0.987 or more and the other 28,560 pairs at most 0.53 (every threshold from 0.6 to
  0.98 finds all 120 pairs and no other); among the shared real-world face clips unrelated ones reach 0.51, while
  the real and fake "May" clips (the fake re-renders the real's footage: same background, the real's head poses
  frame for frame, a new mouth) correlate 0.95 and are joined. 0.9 keeps 0.09 below the weakest true pair (a
  re-encode or a face swap lowers the correlation a little) and 0.37 above the closest unrelated pair (real sets
  hold more look-alikes: one studio, one speaker). Cost: 0.03-0.05 s of CPU per 112x112 demo video, 0.06 s per
  640x360 10 s clip, 0.4 s per real-world 720p-1080p clip.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torchcodec.decoders import VideoDecoder

from arena.csvfile import GROUP_COLUMNS
from arena.data import TRAIN_CSV, Dataset, VideoItem
from arena.errors import ArenaError, DataError, OptionError
from arena.video import decode_uniform

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLD", "GROUPS_MODES", "METADATA_FILE", "Groups", "GroupsMode", "Pair", "find_groups",
           "groups_from_data", "similar_pairs", "thumbnail_vectors"]

GroupsMode = Literal["auto", "column", "none"]
Origin = Literal["column", "metadata", "detected", "content"]
GROUPS_MODES: tuple[str, ...] = ("auto", "column", "none")
METADATA_FILE = "metadata.json"
#: Correlation of two videos' thumbnail vectors at or above which they are judged to share a source (measured,
#: see the module docstring).
DEFAULT_THRESHOLD = 0.9
THUMB_FRAMES = 4
THUMB_SIZE = (32, 32)
_ROWS_PER_BLOCK = 1024  # similarity rows computed at once: bounds memory at 1024 x N floats


@dataclass(frozen=True)
class Pair:
    """Two training videos (keys) judged to share a source, where the judgement came from, and the thumbnail
    correlation when it was detected."""

    a: str
    b: str
    origin: Origin
    similarity: float | None = None


@dataclass
class Groups:
    """The groups of a dataset's training videos.

    Attributes:
        mode: the mode asked for (``auto``, ``column`` or ``none``).
        source: what the groups were taken from, in words (printed and stored in ``split.json``).
        group: every training key -> its group id (the smallest key of the group); a lone video is its own group.
        pairs: the pairs that made the groups, sorted.
        undecodable: keys whose thumbnails could not be decoded (detection only); each stays in its own group.
    """

    mode: GroupsMode
    source: str
    group: dict[str, str]
    pairs: list[Pair] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Groups(mode={self.mode!r}, source={self.source!r}, videos={len(self.group)}, pairs={len(self.pairs)})"

    def ids(self, keys: Iterable[str]) -> list[str]:
        """The group id of each key (a key not in the groups is its own group)."""
        return [self.group.get(k, k) for k in keys]

    @property
    def any_shared(self) -> bool:
        """Whether any two videos share a group (if not, a grouped split equals an ungrouped one)."""
        return len(set(self.group.values())) < len(self.group)

    def summary(self) -> str:
        """One line: how many groups of which size, from where."""
        sizes = Counter(Counter(self.group.values()).values())
        shared = ", ".join(f"{n} of {size} videos" for size, n in sorted(sizes.items()) if size > 1)
        text = (f"groups: {self.source}: {len(self.pairs)} pair(s); {len(self.group)} videos in "
                f"{len(set(self.group.values()))} groups ({shared or 'every video alone'})")
        if self.undecodable:
            text += f"; {len(self.undecodable)} video(s) without thumbnails stay alone (e.g. {self.undecodable[0]})"
        return text

    def across(self, part: Mapping[str, object]) -> list[Pair]:
        """The pairs whose two videos ``part`` (key -> side or fold) puts apart; keys it does not hold are ignored."""
        return [p for p in self.pairs if p.a in part and p.b in part and part[p.a] != part[p.b]]


def _groups_from_pairs(keys: list[str], pairs: list[Pair], *, mode: GroupsMode, source: str,
                       undecodable: list[str] | None = None) -> Groups:
    """Connected components of ``pairs`` over ``keys``; each group is named by its smallest key. A pair stated
    twice (by the CSV and by ``metadata.json``) is kept once."""
    unique: dict[frozenset[str], Pair] = {}
    for p in sorted(pairs, key=lambda p: (p.a, p.b, p.origin)):
        unique.setdefault(frozenset((p.a, p.b)), p)
    pairs = list(unique.values())
    keys = sorted(keys)
    index = {k: i for i, k in enumerate(keys)}
    rows = [index[p.a] for p in pairs]
    cols = [index[p.b] for p in pairs]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(keys), len(keys)))
    _, component = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for k, c in zip(keys, component, strict=True):  # keys are sorted: the first seen is the smallest
        first.setdefault(int(c), k)
    return Groups(mode=mode, source=source, group={k: first[int(c)] for k, c in zip(keys, component, strict=True)},
                  pairs=sorted(pairs, key=lambda p: (p.a, p.b)), undecodable=sorted(undecodable or []))


# ------------------------------------------------------------------------------------------- from the data


def _name_resolver(dataset: Dataset) -> Callable[[str], str | None]:
    """Maps a file name as the data writes it (key, CSV name, base name, or base name without extension) to a
    training key; None when it names no training video or is ambiguous."""
    keys = {i.key for i in dataset.train}
    listed = {name.replace("\\", "/"): key for key, name in dataset.listed_names.items()}
    by_name: dict[str, list[str]] = defaultdict(list)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        by_name[PurePosixPath(k).name].append(k)
        by_stem[PurePosixPath(k).stem].append(k)

    def resolve(value: str) -> str | None:
        v = value.strip().replace("\\", "/")
        if v in keys:
            return v
        if v in listed:
            return listed[v]
        name = PurePosixPath(v).name
        hits = by_name.get(name) or (by_stem.get(name) if not PurePosixPath(name).suffix else None) or []
        return hits[0] if len(hits) == 1 else None

    return resolve


def _source_pairs(links: list[tuple[str, str]], resolve: Callable[[str], str | None], origin: Origin) -> list[Pair]:
    """Pairs from ``(key, source name)`` links: [source, video] when the source is a training video; videos whose
    source is not in the data are chained to each other (they share it all the same)."""
    pairs, outside = [], defaultdict(list)
    for key, value in links:
        src = resolve(value)
        if src is None:
            outside[PurePosixPath(value.strip().replace("\\", "/")).name].append(key)
        elif src != key:
            pairs.append(Pair(src, key, origin))
    for members in outside.values():
        members = sorted(set(members))
        pairs += [Pair(members[0], k, origin) for k in members[1:]]
    return pairs


def _column_pairs(dataset: Dataset, resolve: Callable[[str], str | None]) -> list[Pair]:
    """Pairs from ``train_labels.csv``'s group column."""
    if dataset.group_column == "group":
        members: dict[str, list[str]] = defaultdict(list)
        for item in dataset.train:
            if item.group:
                members[item.group].append(item.key)
        return [Pair(min(m), k, "column") for m in members.values() for k in sorted(m) if k != min(m)]
    return _source_pairs([(i.key, i.group) for i in dataset.train if i.group], resolve, "column")


def _metadata_files(dataset: Dataset) -> list[Path]:
    """``metadata.json`` in the data folder, ``train/`` and every folder holding training videos."""
    folders = {dataset.root, dataset.root / "train"} | {dataset.root / PurePosixPath(i.key).parent
                                                         for i in dataset.train}
    return sorted(f / METADATA_FILE for f in folders if (f / METADATA_FILE).is_file())


def _metadata_pairs(dataset: Dataset, files: list[Path], resolve: Callable[[str], str | None]) -> list[Pair]:
    """Pairs from DFDC-style ``metadata.json`` files: a name is looked up next to the file first, then anywhere."""
    keys = {i.key for i in dataset.train}
    links = []
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise TypeError(f"the top level is a {type(doc).__name__}, not an object")
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a readable DFDC-style metadata file ({e}); expected "
                            '{"name.mp4": {"label": "FAKE", "original": "source.mp4"}, ...}; fix or remove it, '
                            "or pass --groups none") from e
        rel = path.parent.relative_to(dataset.root).as_posix()

        def here(name: str, rel: str = rel) -> str | None:
            key = name if rel == "." else f"{rel}/{name}"
            return key if key in keys else resolve(name)

        for name, entry in doc.items():
            original = entry.get("original") if isinstance(entry, dict) else None
            key = here(str(name))
            if key is None or not isinstance(original, str) or not original.strip():
                continue
            links.append((key, here(original.strip()) or original))
    return _source_pairs(links, resolve, "metadata")


def groups_from_data(dataset: Dataset, mode: GroupsMode = "column") -> Groups | None:
    """The groups the data states (CSV group column and/or ``metadata.json``), or None when it states none.

    Raises:
        DataError: a ``metadata.json`` that cannot be read.
    """
    resolve = _name_resolver(dataset)
    pairs, sources = [], []
    if dataset.group_column is not None:
        pairs += _column_pairs(dataset, resolve)
        sources.append(f"{TRAIN_CSV} column {dataset.group_column!r}")
    files = _metadata_files(dataset)
    if files:
        pairs += _metadata_pairs(dataset, files, resolve)
        sources.append(", ".join(f.relative_to(dataset.root).as_posix() for f in files))
    if not sources:
        return None
    return _groups_from_pairs([i.key for i in dataset.train], pairs, mode=mode, source=" + ".join(sources))


# ------------------------------------------------------------------------------------------- detection


def _thumbnail(path: Path) -> np.ndarray | None:
    """The normalised thumbnail vector of one video, or None when it cannot be decoded or is blank."""
    try:
        # A file torchcodec cannot even open (0.5 ms to find out) gets no thumbnail, rather than paying for
        # arena.video's FFmpeg fallback (an ffprobe run, ~80 ms): every shared real-world video opens (1-20 ms),
        # while a data folder of placeholders or broken files would otherwise take seconds.
        VideoDecoder(str(path), seek_mode="exact")
        clip = decode_uniform(path, THUMB_FRAMES, size=THUMB_SIZE)
    except (ArenaError, OSError, RuntimeError, ValueError) as e:
        log.info("no thumbnail for %s: %s", path, e)
        return None
    x = clip.frames.numpy().astype(np.float32)  # [k, 3, h, w]
    x -= x.mean(axis=(2, 3), keepdims=True)  # per frame and channel: colour/brightness shifts do not count
    x = x.ravel()
    norm = float(np.linalg.norm(x))
    return x / norm if norm > 1e-3 * np.sqrt(x.size) else None  # a blank video matches everything: leave it out


def thumbnail_vectors(paths: list[Path], *, workers: int | None = None) -> list[np.ndarray | None]:
    """Normalised thumbnail vectors (see the module docstring), None for a video that gives none.

    Args:
        paths: the videos.
        workers: decoding threads (default: CPU count, at most 8).
    """
    workers = max(1, min(8, workers or os.cpu_count() or 1))
    if workers == 1:
        return [_thumbnail(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_thumbnail, paths))


def similar_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """``(i, j, correlation)`` for every i < j whose rows of ``vectors`` (unit length) correlate >= ``threshold``."""
    out = []
    for start in range(0, len(vectors), _ROWS_PER_BLOCK):
        block = vectors[start:start + _ROWS_PER_BLOCK] @ vectors.T
        for i, j in zip(*np.nonzero(block >= threshold), strict=True):
            if start + i < j:
                out.append((int(start + i), int(j), float(block[i, j])))
    return out


def _detect(dataset: Dataset, *, threshold: float, workers: int | None) -> Groups:
    items: list[VideoItem] = sorted(dataset.train, key=lambda i: i.key)
    vectors = thumbnail_vectors([i.path for i in items], workers=workers)
    usable = [n for n, v in enumerate(vectors) if v is not None]
    undecodable = [items[n].key for n, v in enumerate(vectors) if v is None]
    if undecodable:
        log.warning("near-duplicate detection: %d of %d videos gave no thumbnail (e.g. %s); each stays in a group "
                    "of its own", len(undecodable), len(items), undecodable[0])
    pairs = []
    if usable:
        matrix = np.stack([vectors[n] for n in usable])
        for i, j, s in similar_pairs(matrix, threshold):
            a, b = sorted((items[usable[i]], items[usable[j]]), key=lambda it: (it.label, it.key))  # real first
            pairs.append(Pair(a.key, b.key, "detected", round(s, 4)))
    source = (f"near-duplicate detection ({THUMB_FRAMES} frames at {THUMB_SIZE[0]}x{THUMB_SIZE[1]} per video, "
              f"correlation >= {threshold:g})")
    return _groups_from_pairs([i.key for i in items], pairs, mode="auto", source=source, undecodable=undecodable)


def find_groups(dataset: Dataset, mode: GroupsMode = "auto", *, threshold: float = DEFAULT_THRESHOLD,
                workers: int | None = None) -> Groups:
    """The groups of the dataset's training videos.

    Args:
        dataset: from :func:`arena.data.load_dataset`.
        mode: ``column``: from the data (a CSV column ``original``/``source``/``group`` or ``metadata.json``);
            ``auto``: from the data when it has them, else detected near-duplicates; ``none``: every video alone.
        threshold: correlation of thumbnail vectors at or above which two videos are a pair (detection only).
        workers: decoding threads for detection (default: CPU count).

    Raises:
        OptionError: unknown mode or a threshold outside (0, 1].
        DataError: ``column`` and the data states no groups, or a ``metadata.json`` cannot be read.
    """
    if mode not in GROUPS_MODES:
        raise OptionError(f"Invalid groups mode ({mode}). Supported values are {', '.join(GROUPS_MODES)}.")
    if not 0.0 < threshold <= 1.0:
        raise OptionError(f"threshold must be in (0, 1], got {threshold!r}; the measured default is "
                          f"{DEFAULT_THRESHOLD}")
    keys = [i.key for i in dataset.train]
    if mode == "none":
        return _groups_from_pairs(keys, [], mode="none", source="none")
    stated = groups_from_data(dataset, mode)
    if stated is not None:
        return _with_identical(stated, dataset)
    if mode == "column":
        raise DataError(f"--groups column: {dataset.root / TRAIN_CSV} has no group column (accepted: "
                        f"{', '.join(GROUP_COLUMNS)}, case-insensitive) and there is no {METADATA_FILE} in "
                        f"{dataset.root}, train/ or the video folders; add one, or use --groups auto to detect "
                        "near-duplicate videos (or --groups none)")
    return _with_identical(_detect(dataset, threshold=threshold, workers=workers), dataset)


def _with_identical(groups: Groups, dataset: Dataset) -> Groups:
    """``groups`` joined with the byte-identical train videos `arena.data` found (one video under two names is
    one source whatever the column or the thumbnails say)."""
    extra = [Pair(a, b, "content", 1.0) for a, b in dataset.same_content]
    if not extra:
        return groups
    return _groups_from_pairs(list(groups.group), [*groups.pairs, *extra], mode=groups.mode,
                              source=groups.source + " + identical files", undecodable=groups.undecodable)
