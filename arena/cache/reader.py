"""Reading a cache: `FeatureCache` over one file or a shard set, checked against the provenance the code expects.

The index is loaded at open; the features block is contiguous and memory-mapped on first use, so a batch gathers
only the rows it needs and the OS page cache serves repeated reads (tools/bench_cache.py).

``keys`` are the dataset's videos only: the pseudo-fake items a cache may also hold (``arena features
--pseudo-fakes``, keys ``<source>#sbi<i>``) are listed apart in ``pseudo_keys``, so a consumer that enumerates the
cache's videos never mistakes one for a video of the dataset; `arena.pseudo.pseudo_items` picks the ones to train on.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from arena.cache.layout import STATUSES, Entry, Source, Store, parts_dir, pseudo_source, rebuild_hint
from arena.cache.provenance import Provenance
from arena.cache.shards import expand_paths
from arena.errors import CacheError
from arena.sampling import first_occurrence, uniform_indices


class FeatureCache:
    """Reader over one cache file or a set of shards, seen as one cache. Use :meth:`open`."""

    def __init__(self, stores: list[Store], entries: dict[str, Entry], provenance: Provenance) -> None:
        self._stores = stores
        self._entries = dict(sorted(entries.items()))
        self.provenance = provenance
        self.paths: list[Path] = [s.path for s in stores]
        usable = [k for k, e in self._entries.items() if e.status != "failed"]
        self.keys = [k for k in usable if pseudo_source(k) is None]  # the dataset's videos
        self.pseudo_keys = [k for k in usable if pseudo_source(k) is not None]  # pseudo-fake items, apart
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
        paths = expand_paths(path_or_paths)
        stores: list[Store] = []
        try:
            for p in paths:
                stores.append(Store(p))
            provenance = stores[0].provenance
            entries: dict[str, Entry] = {}
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
        # Pseudo-fake items are extra entries: the videos' features are the same with or without them.
        differences = self.provenance.diff(expect, ignore=("frame_counts", "variants", "pseudo_fakes"))
        if differences:
            raise CacheError(
                f"Feature cache {where} does not match the current configuration ("
                + "; ".join(differences) + f"). {rebuild_hint(self.paths[0])}"
            )
        missing = [v for v in expect.variants if v not in self._variant_index]
        if missing:
            raise CacheError(f"Feature cache {where} has variants {list(self.provenance.variants)}, not {missing}. "
                             f"{rebuild_hint(self.paths[0])}")
        for k in expect.frame_counts:
            if k not in self.provenance.frame_counts:
                for key in (*self.keys, *self.pseudo_keys):
                    self._positions(key, k)  # raises CacheError naming the first uncovered video

    # -- per video ---------------------------------------------------------------------------------------------------

    def _entry(self, key: str) -> Entry:
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
        """Why the video is partial or failed ("" when ok)."""
        return self._entry(key).message

    def num_source_frames(self, key: str) -> int:
        """n, the frames the video yields (the n of ``uniform_indices(n, k)``)."""
        return self._entry(key).num_source_frames

    def failures(self) -> dict[str, str]:
        """Failed videos and why: ``{key: message}``."""
        return {k: e.message for k, e in self._entries.items() if e.status == "failed"}

    def partials(self) -> dict[str, str]:
        """Partial videos and why: ``{key: message}``."""
        return {k: e.message for k, e in self._entries.items() if e.status == "partial"}

    def counts(self) -> dict[str, int]:
        """Number of videos per status."""
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
        want = uniform_indices(entry.num_source_frames, k)
        pos = np.searchsorted(entry.frame_indices, want)
        pos_clipped = np.minimum(pos, entry.row_count - 1)
        if np.any(entry.frame_indices[pos_clipped] != want):
            lacking = sorted(set(want.tolist()) - set(entry.frame_indices.tolist()))
            raise CacheError(
                f"Feature cache {entry.source.label} cannot serve k={k} for {key} (n={entry.num_source_frames}): "
                f"frames {lacking[:10]}{'...' if len(lacking) > 10 else ''} were not extracted (built for frame counts "
                f"{list(self.provenance.frame_counts)}). Rebuild with `arena features --frames ...` including {k}."
            )
        first = first_occurrence(want)
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

    def boxes(self, key: str, k: int) -> np.ndarray | None:
        """The main face track's crop boxes (float32 [k, 4], x1, y1, x2, y2 in source pixels; NaN where the video had
        no face) of the k frames at ``uniform_indices(n, k)``; None for a cache built from whole frames."""
        entry = self._entry(key)
        if entry.boxes is None:
            return None
        pos, _ = self._positions(key, k)
        return entry.boxes[pos]

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
        groups: dict[int, tuple[Source, list[int], list[np.ndarray]]] = {}
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

    def iter_entries(self) -> Iterator[Entry]:
        """Every video's entry, in key order (failed ones too)."""
        return iter(self._entries.values())

    def size_bytes(self) -> int:
        """Bytes on disk: main files plus staged parts."""
        total = 0
        for p in self.paths:
            if p.exists():
                total += p.stat().st_size
            parts = parts_dir(p)
            if parts.is_dir():
                total += sum(f.stat().st_size for f in parts.iterdir() if f.is_file())
        return total

    def info(self) -> dict[str, Any]:
        """Summary for `arena cache info`."""
        rows = sum(e.row_count for e in self._entries.values())
        return {"paths": [str(p) for p in self.paths], "videos": len(self._entries), **self.counts(),
                "pseudo_fakes": len(self.pseudo_keys), "rows": rows,
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
