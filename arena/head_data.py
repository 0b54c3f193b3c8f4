"""Cached features of the split in memory: what the head is tuned and frame-tested on.

The cache holds backbone features for every video, TTA variant and frame count, so tuning only trains the small
head: the training part of the split is loaded into memory once per frame count (float16 ``[N, V, K, d]``) and
each epoch is a handful of batched tensor ops (see ``arena.head_train``) -- no per-video Python loop, no decoding.

The cache does not depend on the split: any split of the dataset (a new seed, a fold) reads the same cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from arena.cache import FeatureCache
from arena.data import load_dataset
from arena.errors import CacheError, DataError, OptionError
from arena.runtime import resolve_device
from arena.split import Split, ensure_split


@dataclass
class HeadData:
    """In-memory features of one frame count for the train and validation parts of the split.

    Attributes:
        frames: frames per video ``K``.
        variants: names of the TTA variants along ``V`` of ``train_x``; index 0 is the un-augmented view.
        train_x: float16 ``[N, V, K, d]``; train_mask: bool ``[N, K]`` (True = real frame); train_y: int64 ``[N]``.
        val_x: float16 ``[M, W, K, d]`` (W validation views whose probabilities are averaged); val_mask, val_y.
        train_keys, val_keys: the videos along ``N`` and ``M``.
        skipped: videos of the split left out (feature extraction failed) -> why.
    """

    frames: int
    variants: tuple[str, ...]
    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_mask: torch.Tensor
    val_y: torch.Tensor
    train_keys: list[str] = field(default_factory=list)
    val_keys: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_x = torch.as_tensor(self.train_x)
        self.val_x = torch.as_tensor(self.val_x)
        self.train_mask = torch.as_tensor(self.train_mask, dtype=torch.bool)
        self.val_mask = torch.as_tensor(self.val_mask, dtype=torch.bool)
        self.train_y = torch.as_tensor(self.train_y, dtype=torch.int64)
        self.val_y = torch.as_tensor(self.val_y, dtype=torch.int64)
        for name in ("train", "val"):
            x, mask, y = (getattr(self, f"{name}_{s}") for s in ("x", "mask", "y"))
            if x.ndim != 4:
                raise DataError(f"{name}_x must be [N, V, K, d]; got shape {tuple(x.shape)}.")
            n, _, k, _ = x.shape
            if k != self.frames:
                raise DataError(f"{name}_x has {k} frames per video but frames={self.frames}.")
            if tuple(mask.shape) != (n, k) or tuple(y.shape) != (n,):
                raise DataError(f"{name}: mask {tuple(mask.shape)} / labels {tuple(y.shape)} do not match "
                                f"features {tuple(x.shape)}; expected mask ({n}, {k}) and labels ({n},).")
            if not bool(((y == 0) | (y == 1)).all()):
                raise DataError(f"{name} labels must be 0 (real) or 1 (fake).")
            if int(y.sum()) in (0, n):
                raise DataError(f"the {name} part needs both classes; got {int(y.sum())} fake of {n} videos. "
                                "Add videos of the missing class or make another split (`arena split --new-split`).")
        if self.train_x.shape[-1] != self.val_x.shape[-1]:
            raise DataError(f"train features are {self.train_x.shape[-1]}-d but validation features are "
                            f"{self.val_x.shape[-1]}-d.")
        if len(self.variants) != self.train_x.shape[1]:
            raise DataError(f"{len(self.variants)} variant names for {self.train_x.shape[1]} variants in train_x.")

    def __repr__(self) -> str:
        return (f"HeadData(frames={self.frames}, variants={self.variants}, train_x={tuple(self.train_x.shape)}, "
                f"val_x={tuple(self.val_x.shape)}, skipped={len(self.skipped)})")

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device | str) -> HeadData:
        """Move the tensors (features stay float16) to ``device``."""
        moved = {f: getattr(self, f).to(device) for f in
                 ("train_x", "train_mask", "train_y", "val_x", "val_mask", "val_y")}
        return dataclasses.replace(self, **moved)

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per feature over the real frames of the training videos' un-augmented view (memoised)."""
        if "_stats" not in self.__dict__:
            self.__dict__["_stats"] = self._compute_stats()
        return self.__dict__["_stats"]

    def _compute_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        total = torch.zeros(d, dtype=torch.float64)
        total_sq = torch.zeros(d, dtype=torch.float64)
        count = 0
        for start in range(0, self.train_x.shape[0], 64):  # chunks: no full float64 copy of the split
            x = self.train_x[start:start + 64, 0].double().cpu()
            m = self.train_mask[start:start + 64].cpu()
            rows = x[m]
            total += rows.sum(0)
            total_sq += (rows * rows).sum(0)
            count += rows.shape[0]
        if count == 0:
            raise DataError("no valid training frame to compute feature statistics from; the cache holds no frame "
                            "of the split's training videos -- rebuild it with `arena features`.")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()


def load_head_data(cache: FeatureCache, train_items: Iterable[Any], val_items: Iterable[Any], frames: int, *,
                   val_variants: Sequence[str] = ("original",)) -> HeadData:
    """Read the split's features for ``frames`` frames per video from a feature cache into memory.

    Args:
        cache: an opened feature cache.
        train_items, val_items: objects with ``.key`` and ``.label`` (``arena.data.VideoItem``).
        frames: one of the cache's frame counts.
        val_variants: views evaluated on validation (probabilities averaged); "original" by default.

    Raises:
        CacheError: frame count or variant not in the cache, videos of the split missing from the cache, or labels
            that disagree with the cache.
    """
    where = ", ".join(str(p) for p in cache.paths) or "the feature cache"
    prov = cache.provenance
    counts = tuple(int(c) for c in prov.frame_counts)
    if frames not in counts:
        raise CacheError(f"frames={frames} is not in {where} (it holds frame counts {counts}); pick one of those "
                         "or rebuild the cache with `arena features --frames ...`.")
    variants = tuple(prov.variants)
    if "original" not in variants:
        raise CacheError(f"{where} has no 'original' variant (variants {variants}); rebuild it with "
                         "`arena features`.")
    train_variants = ("original",) + tuple(v for v in variants if v != "original")
    unknown = [v for v in val_variants if v not in variants]
    if unknown:
        raise CacheError(f"validation variants {unknown} are not in {where} (it holds {variants}).")
    cached = set(cache.keys)
    failures = cache.failures()
    skipped: dict[str, str] = {}
    parts: dict[str, tuple[list[str], list[int]]] = {}
    for name, items in (("train", train_items), ("val", val_items)):
        keys, labels, missing = [], [], []
        for item in items:
            if item.key in failures:  # feature extraction failed: leave it out and report it
                skipped[item.key] = f"feature extraction failed: {failures[item.key]}"
                continue
            if item.key not in cached:
                missing.append(item.key)
                continue
            cached_label = cache.label(item.key)
            if cached_label is not None and item.label is not None and int(cached_label) != int(item.label):
                raise CacheError(f"{item.key}: the split says label {item.label} but {where} says {cached_label}; "
                                 "the dataset changed since the cache was built -- rebuild it with `arena features`.")
            keys.append(item.key)
            labels.append(int(item.label))
        if missing:
            raise CacheError(f"{len(missing)} {name} video(s) of the split are not in {where} "
                             f"(e.g. {', '.join(missing[:3])}); run `arena features` again to complete it.")
        parts[name] = (keys, labels)
    train_x, train_mask = cache.batch(parts["train"][0], frames, list(train_variants))
    val_x, val_mask = cache.batch(parts["val"][0], frames, list(val_variants))
    return HeadData(frames=frames, variants=train_variants,
                    train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float16)),
                    train_mask=torch.from_numpy(np.asarray(train_mask, dtype=bool)),
                    train_y=torch.tensor(parts["train"][1]),
                    val_x=torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float16)),
                    val_mask=torch.from_numpy(np.asarray(val_mask, dtype=bool)),
                    val_y=torch.tensor(parts["val"][1]),
                    train_keys=parts["train"][0], val_keys=parts["val"][0], skipped=skipped)


class HeadDataStore:
    """Loads :class:`HeadData` per frame count on first use and keeps it (a 600-video cache fits in memory).

    Attributes:
        frame_counts: the frame counts that can be asked for.
        device: where the tensors are kept.
        provenance: the cache's provenance as a JSON-able dict (goes into ``best_head.pt``).
    """

    def __init__(self, loader: Callable[[int], HeadData], frame_counts: Sequence[int], *,
                 device: torch.device | str = "cpu", provenance: dict[str, Any] | None = None) -> None:
        self._loader = loader
        self.frame_counts = tuple(int(k) for k in frame_counts)
        self.device = torch.device(device)
        self.provenance = provenance or {}
        self._data: dict[int, HeadData] = {}

    @classmethod
    def from_arrays(cls, data: dict[int, HeadData], **kwargs: Any) -> HeadDataStore:
        """A store over data already in memory (tests, benchmarks)."""
        return cls(lambda k: data[k], sorted(data), **kwargs)

    @classmethod
    def from_cache(cls, cache: FeatureCache, split: Split, *, device: torch.device | str = "cpu",
                   val_variants: Sequence[str] = ("original",)) -> HeadDataStore:
        """A store reading ``split.train``/``split.val`` from an opened feature cache."""
        return cls(lambda k: load_head_data(cache, split.train, split.val, k, val_variants=val_variants),
                   cache.provenance.frame_counts, device=device, provenance=cache.provenance.to_dict())

    def check_frames(self, frames: Sequence[int]) -> tuple[int, ...]:
        """``frames`` as a tuple when every count is available, else `OptionError` naming ``--frames``."""
        missing = [int(k) for k in frames if int(k) not in self.frame_counts]
        if missing:
            raise OptionError(f"--frames: frame counts {missing} are not in the cache (it holds {self.frame_counts}); "
                              "pick among those or rebuild the cache with `arena features --frames ...`.")
        return tuple(int(k) for k in frames)

    def get(self, frames: int) -> HeadData:
        """The data for ``frames`` frames per video (loaded on first use)."""
        self.check_frames([frames])
        if frames not in self._data:
            self._data[frames] = self._loader(frames).to(self.device)
        return self._data[frames]


def open_head_data(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
                   device: str = "auto") -> tuple[HeadDataStore, Split]:
    """Open the feature cache and the split of ``models_dir``: the inputs of ``tune-head`` and ``frame-test``.

    The split is ``models_dir``'s split file (checked against the dataset), made with the defaults when missing.

    Any cache of the dataset's videos serves any split of it: the split only chooses which cached videos train
    and which validate.

    Raises:
        OptionError: unknown device. CacheError: unusable cache. DataError: unusable dataset or split file.
    """
    dev = resolve_device(device)
    cache = FeatureCache.open(cache_path)
    dataset = load_dataset(data_root, require_test=False)
    split = ensure_split(dataset, models_dir)
    return HeadDataStore.from_cache(cache, split, device=dev), split
