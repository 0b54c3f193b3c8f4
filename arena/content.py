"""Identical files under different names: the same video listed twice is a leak (train/val or train/test) or,
with two labels, a contradiction.

Only files of equal size are hashed (SHA-256, 1 MiB reads), so a data folder of distinct videos costs one
``stat`` per file. Files under `MIN_BYTES` are left out: no video that decodes is that small (the layout
tests' one-byte placeholders would all match each other).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MIN_BYTES", "identical_groups"]

MIN_BYTES = 1024
_CHUNK = 1 << 20


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None  # unreadable: the decoder reports it with the file named
    return digest.hexdigest()


def identical_groups(paths: Sequence[str | os.PathLike]) -> list[list[int]]:
    """Indices into ``paths`` of files with identical bytes, one list per content (each sorted, 2 or more long).

    The same file reached twice (hard link, or one path given twice) counts as identical too: it is one video
    under two names all the same.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for n, p in enumerate(paths):
        try:
            size = os.stat(p).st_size
        except OSError:
            continue
        if size >= MIN_BYTES:
            by_size[size].append(n)
    out = []
    for members in by_size.values():
        if len(members) < 2:
            continue
        by_hash: dict[str, list[int]] = defaultdict(list)
        for n in members:
            h = _sha256(Path(paths[n]))
            if h is not None:
                by_hash[h].append(n)
        out += [sorted(g) for g in by_hash.values() if len(g) > 1]
    return sorted(out)
