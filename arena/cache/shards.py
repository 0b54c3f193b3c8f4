"""Shards: several processes each write every n-th video to their own file; readers see the set as one cache.

``cache.h5`` -> ``cache.shard-0-of-4.h5`` ... ``cache.shard-3-of-4.h5``. A path given to the reader may be one
file, a list, a glob, or a missing ``cache.h5`` whose complete shard set exists.
"""

from __future__ import annotations

import glob
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from arena.cache.layout import cache_exists
from arena.errors import CacheError, OptionError

T = TypeVar("T")
_SHARD_RE = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)(?P<suffix>\.[^.]*)?$")


def _check(index: int, count: int) -> tuple[int, int]:
    index, count = operator.index(index), operator.index(count)
    if count < 1 or not 0 <= index < count:
        raise OptionError(f"Invalid shard {index}/{count}: shard must satisfy 0 <= index < count, e.g. 0/4.")
    return index, count


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """Path of shard ``index`` (0-based) of ``count``: ``cache.h5`` -> ``cache.shard-0-of-4.h5``."""
    index, count = _check(index, count)
    p = Path(path)
    return p.with_name(f"{p.stem}.shard-{index}-of-{count}{p.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse a ``--shard i/n`` option (i is 0-based) into ``(i, n)``; `OptionError` names what is allowed."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise OptionError(f"Invalid shard {text!r}. Expected i/n with 0 <= i < n, e.g. 0/4.")
    return _check(int(m.group(1)), int(m.group(2)))


def shard_items(items: Sequence[T], index: int, count: int) -> list[T]:
    """What shard ``index`` of ``count`` processes: every count-th item, starting at ``index``, in the given order."""
    index, count = _check(index, count)
    return list(items)[index::count]


def expand_paths(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The cache files a reader opens for a path, a list of paths or a glob (in that order, without repeats)."""
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not items:
        raise CacheError("No cache paths given. Build a cache with `arena features --cache PATH` (or `make features`).")
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if glob.has_magic(text):
            found = sorted({_base_of(Path(p)) for p in glob.glob(text)})
            if not found:
                raise CacheError(f"No cache files match {text}. Build them with `arena features --cache PATH`.")
            paths.extend(found)
        elif not cache_exists(Path(text)):
            paths.extend(_find_shards(Path(text)))
        else:
            paths.append(Path(text))
    return list(dict.fromkeys(paths))


def _base_of(path: Path) -> Path:
    """``x.h5.parts`` / ``x.h5.lock`` / ``x.h5.tmp`` -> ``x.h5`` (so that a glob like ``cache.shard-*`` works)."""
    for suffix in (".parts", ".lock", ".tmp"):  # .tmp: a compaction of an earlier release killed midway
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _shard_indices(path: Path) -> dict[int, set[int]]:
    """The shards of ``path`` on disk (compacted or only staged), as ``{count: {index, ...}}``."""
    pattern = f"{glob.escape(path.stem)}.shard-*-of-*{path.suffix}"
    found = set(path.parent.glob(pattern)) | {_base_of(p) for p in path.parent.glob(pattern + ".parts")}
    shards: dict[int, set[int]] = {}
    for p in found:
        m = _SHARD_RE.match(p.name)
        if m and m.group("stem") == path.stem:
            shards.setdefault(int(m.group("n")), set()).add(int(m.group("i")))
    return shards


def shard_files(path: str | os.PathLike) -> list[Path]:
    """Every shard of the cache ``path`` on disk, of any shard count (compacted or only staged), by count and index.

    A run that merges its shards into ``path`` takes these too: a killed run with another number of processes left
    them, and their videos need not be computed again.
    """
    path = Path(path)
    return [shard_path(path, i, n) for n, have in sorted(_shard_indices(path).items()) for i in sorted(have)]


def _find_shards(path: Path) -> list[Path]:
    """A missing ``cache.h5`` whose shards exist: return the complete shard set, or say which are missing."""
    shards = _shard_indices(path)
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
