"""Cached features of the split in memory: what the head is tuned and frame-tested on.

The cache holds backbone features for every video, TTA variant and frame count, so tuning only trains the small
head: the training part of the split is loaded into memory once per frame count (float16 ``[N, V, K, d]``) and
each epoch is a handful of batched tensor ops (see ``arena.head_train``) -- no per-video Python loop, no decoding.

The cache does not depend on the split: any split of the dataset (a new seed, a fold) reads the same cache. A
K-fold split is loaded once as `FoldData` (every video, with its fold), from which `arena.cv_heads` trains the K
fold heads together.
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
from arena.cache.layout import pseudo_source
from arena.data import load_dataset
from arena.errors import CacheError, DataError, OptionError
from arena.pseudo import pseudo_items
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
        pseudo: how many of the training rows are pseudo-fake items of the training reals (`arena.pseudo`).
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
    pseudo: int = 0

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
            self.__dict__["_stats"] = feature_stats(self.train_x, self.train_mask)
        return self.__dict__["_stats"]


def feature_stats(x: torch.Tensor, mask: torch.Tensor,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature over the real frames of the un-augmented view (variant 0) of ``x[rows]``.

    Accumulated in float64, 64 videos at a time in the order of ``rows`` (all of ``x`` when None), so a fold's
    statistics taken from every video's features equal, bit for bit, those of the fold's own `HeadData`.
    """
    rows = torch.arange(x.shape[0]) if rows is None else rows.cpu()
    d = int(x.shape[-1])
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros(d, dtype=torch.float64)
    count = 0
    for start in range(0, rows.shape[0], 64):  # chunks: no full float64 copy of the split
        idx = rows[start:start + 64].to(x.device)
        chunk = x[idx, 0].double().cpu()
        valid = chunk[mask[idx].cpu()]
        total += valid.sum(0)
        total_sq += (valid * valid).sum(0)
        count += valid.shape[0]
    if count == 0:
        raise DataError("no valid training frame to compute feature statistics from; the cache holds no frame "
                        "of the split's training videos -- rebuild it with `arena features`.")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


@dataclass
class FoldData:
    """In-memory features of one frame count for every video of a K-fold split, each with the fold that validates
    on it: the K fold heads of `arena.cv_heads` all read this one copy.

    Attributes:
        frames: frames per video ``K``; variants: names along ``V`` of ``x`` (index 0 is the un-augmented view).
        x: float16 ``[N, V, K, d]`` (the training views of every video); mask: bool ``[N, K]``; y: int64 ``[N]``.
        fold: int64 ``[N]``, the fold (0 .. folds-1) whose head validates on the video and does not train on it.
        folds: the number of folds.
        val_views: the indices along ``V`` of the views averaged on validation (``(0,)``: the original).
        keys: the videos along ``N``, sorted (the order of `arena.split.Split.fold`'s parts), then the pseudo-fake
            items.
        skipped: videos of the split left out (feature extraction failed) -> why.
        pseudo: the number of trailing rows that are pseudo-fake items (`arena.pseudo`, label 1): each carries its
            source video's fold, so it trains every head but that fold's and validates none; the out-of-fold
            predictions cover the ``videos`` rows before them.
    """

    frames: int
    variants: tuple[str, ...]
    x: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor
    fold: torch.Tensor
    folds: int
    val_views: tuple[int, ...] = (0,)
    keys: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    pseudo: int = 0

    def __post_init__(self) -> None:
        self.x = torch.as_tensor(self.x)
        self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
        self.y = torch.as_tensor(self.y, dtype=torch.int64)
        self.fold = torch.as_tensor(self.fold, dtype=torch.int64)
        if self.x.ndim != 4 or self.x.shape[2] != self.frames:
            raise DataError(f"x must be [N, V, {self.frames}, d]; got shape {tuple(self.x.shape)}.")
        n = self.x.shape[0]
        if tuple(self.mask.shape) != (n, self.frames) or self.y.shape != (n,) or self.fold.shape != (n,):
            raise DataError(f"mask {tuple(self.mask.shape)}, labels {tuple(self.y.shape)} and folds "
                            f"{tuple(self.fold.shape)} do not match features {tuple(self.x.shape)}.")
        if len(self.variants) != self.x.shape[1] or not self.val_views or \
                not all(0 <= v < len(self.variants) for v in self.val_views):
            raise DataError(f"{len(self.variants)} variant names and validation views {self.val_views} for "
                            f"{self.x.shape[1]} variants in x.")
        if not 0 <= self.pseudo < n or bool((self.y[self.videos:] != 1).any()):
            raise DataError(f"{self.pseudo} pseudo-fake rows of {n}: they must be fewer than the rows and fake.")
        if self.folds < 2 or bool(((self.fold < 0) | (self.fold >= self.folds)).any()):
            raise DataError(f"fold indices must be in 0..{self.folds - 1} with at least 2 folds.")
        for i in range(self.folds):
            for part, rows in (("training", self.train_rows(i)), ("validation", self.val_rows(i))):
                fakes = int(self.y[rows].sum())
                if fakes in (0, rows.shape[0]):
                    raise DataError(f"fold {i}: its {part} part needs both classes; got {fakes} fake of "
                                    f"{rows.shape[0]} videos. Make another split (`arena split --new-split`) with "
                                    "fewer folds.")

    def __repr__(self) -> str:
        return (f"FoldData(frames={self.frames}, folds={self.folds}, x={tuple(self.x.shape)}, "
                f"val_views={self.val_views}, pseudo={self.pseudo}, skipped={len(self.skipped)})")

    @property
    def videos(self) -> int:
        """The number of the split's videos: the rows before the pseudo-fake items."""
        return int(self.x.shape[0]) - self.pseudo

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.x.shape[-1])

    def train_rows(self, i: int) -> torch.Tensor:
        """Indices (CPU, int64, ascending) of the videos fold ``i``'s head trains on: those of the other folds."""
        return torch.nonzero(self.fold.cpu() != i).flatten()

    def val_rows(self, i: int) -> torch.Tensor:
        """Indices (CPU, int64, ascending) of fold ``i``'s videos: what its head is validated on (never a
        pseudo-fake item)."""
        return torch.nonzero(self.fold.cpu()[:self.videos] == i).flatten()

    def fold_stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`feature_stats` of fold ``i``'s training videos (memoised): the standardisation of its head."""
        memo = self.__dict__.setdefault("_stats", {})
        if i not in memo:
            memo[i] = feature_stats(self.x, self.mask, self.train_rows(i))
        return memo[i]

    def to(self, device: torch.device | str) -> FoldData:
        """Move the tensors (features stay float16) to ``device``."""
        return dataclasses.replace(self, x=self.x.to(device), mask=self.mask.to(device), y=self.y.to(device),
                                   fold=self.fold.to(device))

    def fold_data(self, i: int) -> HeadData:
        """Fold ``i`` as the `HeadData` of a holdout (a copy): what ``train_head`` alone would train it on."""
        tr, va = (r.to(self.x.device) for r in (self.train_rows(i), self.val_rows(i)))
        views = torch.tensor(self.val_views, device=self.x.device)
        return HeadData(frames=self.frames, variants=self.variants, train_x=self.x[tr], train_mask=self.mask[tr],
                        train_y=self.y[tr], val_x=self.x[va][:, views], val_mask=self.mask[va], val_y=self.y[va],
                        train_keys=[self.keys[j] for j in tr.tolist()] if self.keys else [],
                        val_keys=[self.keys[j] for j in va.tolist()] if self.keys else [], skipped=dict(self.skipped),
                        pseudo=int((tr >= self.videos).sum()))


def _cache_variants(cache: FeatureCache, frames: int, val_variants: Sequence[str]) -> tuple[str, ...]:
    """The training variants (original first) after checking ``frames`` and ``val_variants`` against the cache."""
    where = _where(cache)
    counts = tuple(int(c) for c in cache.provenance.frame_counts)
    if frames not in counts:
        raise CacheError(f"frames={frames} is not in {where} (it holds frame counts {counts}); pick one of those "
                         "or rebuild the cache with `arena features --frames ...`.")
    variants = tuple(cache.provenance.variants)
    if "original" not in variants:
        raise CacheError(f"{where} has no 'original' variant (variants {variants}); rebuild it with "
                         "`arena features`.")
    unknown = [v for v in val_variants if v not in variants]
    if unknown:
        raise CacheError(f"validation variants {unknown} are not in {where} (it holds {variants}).")
    return ("original",) + tuple(v for v in variants if v != "original")


def _where(cache: FeatureCache) -> str:
    return ", ".join(str(p) for p in cache.paths) or "the feature cache"


def _cached_part(cache: FeatureCache, items: Iterable[Any], name: str,
                 skipped: dict[str, str]) -> tuple[list[str], list[int]]:
    """Keys and labels of ``items`` that the cache holds; failed extractions go to ``skipped``.

    Raises:
        CacheError: videos missing from the cache, or labels that disagree with it.
    """
    where = _where(cache)
    cached = set(cache.keys)
    failures = cache.failures()
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
    return keys, labels


def _batch(cache: FeatureCache, keys: list[str], frames: int,
           variants: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = cache.batch(keys, frames, list(variants))
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16)),
            torch.from_numpy(np.asarray(mask, dtype=bool)))


def load_head_data(cache: FeatureCache, train_items: Iterable[Any], val_items: Iterable[Any], frames: int, *,
                   val_variants: Sequence[str] = ("original",), pseudo: bool = True) -> HeadData:
    """Read the split's features for ``frames`` frames per video from a feature cache into memory.

    Args:
        cache: an opened feature cache.
        train_items, val_items: objects with ``.key`` and ``.label`` (``arena.data.VideoItem``).
        frames: one of the cache's frame counts.
        val_variants: views evaluated on validation (probabilities averaged); "original" by default.
        pseudo: add the cache's pseudo-fake items (``arena features --pseudo-fakes``) of the training part's reals
            to the training part (label 1); those of validation videos are never read.

    Raises:
        CacheError: frame count or variant not in the cache, videos of the split missing from the cache, or labels
            that disagree with the cache.
    """
    train_variants = _cache_variants(cache, frames, val_variants)
    skipped: dict[str, str] = {}
    train_keys, train_y = _cached_part(cache, train_items, "train", skipped)
    val_keys, val_y = _cached_part(cache, val_items, "val", skipped)
    extra = [key for key, _ in pseudo_items(cache, train_keys)] if pseudo else []
    train_keys, train_y = train_keys + extra, train_y + [1] * len(extra)
    train_x, train_mask = _batch(cache, train_keys, frames, train_variants)
    val_x, val_mask = _batch(cache, val_keys, frames, val_variants)
    return HeadData(frames=frames, variants=train_variants, train_x=train_x, train_mask=train_mask,
                    train_y=torch.tensor(train_y), val_x=val_x, val_mask=val_mask, val_y=torch.tensor(val_y),
                    train_keys=train_keys, val_keys=val_keys, skipped=skipped, pseudo=len(extra))


def load_fold_data(cache: FeatureCache, split: Split, frames: int, *,
                   val_variants: Sequence[str] = ("original",), pseudo: bool = True) -> FoldData:
    """Every video of a K-fold ``split`` with its fold, for ``frames`` frames per video, read once; with
    ``pseudo``, then the cache's pseudo-fake items of the split's videos, each in its source's fold.

    Raises:
        CacheError: as `load_head_data`. DataError: a split of one fold, or a fold without both classes.
    """
    if split.folds < 2:
        raise DataError(f"{split.path} holds one holdout, not folds; make K folds with `arena split --folds K`.")
    train_variants = _cache_variants(cache, frames, val_variants)
    skipped: dict[str, str] = {}
    items = sorted(split.train + split.val, key=lambda it: it.key)  # the order of Split.fold's parts
    keys, labels = _cached_part(cache, items, "split", skipped)
    extra = pseudo_items(cache, keys) if pseudo else []
    folds = [split.fold_of[k] for k in keys] + [split.fold_of[pseudo_source(k)] for k, _ in extra]
    keys, labels = keys + [k for k, _ in extra], labels + [1] * len(extra)
    x, mask = _batch(cache, keys, frames, train_variants)
    return FoldData(frames=frames, variants=train_variants, x=x, mask=mask, y=torch.tensor(labels),
                    fold=torch.tensor(folds), folds=split.folds, pseudo=len(extra),
                    val_views=tuple(train_variants.index(v) for v in val_variants), keys=keys, skipped=skipped)


class HeadDataStore:
    """Loads :class:`HeadData` (the split's holdout: fold 0 of a K-fold split) and, for a K-fold split,
    :class:`FoldData` per frame count on first use, and keeps them (a 600-video cache fits in memory).

    Attributes:
        frame_counts: the frame counts that can be asked for.
        folds: the split's number of folds (1: a holdout, `get_folds` unavailable).
        device: where the tensors are kept.
        provenance: the cache's provenance as a JSON-able dict (goes into ``best_head.pt``).
    """

    def __init__(self, loader: Callable[[int], HeadData], frame_counts: Sequence[int], *,
                 device: torch.device | str = "cpu", provenance: dict[str, Any] | None = None,
                 fold_loader: Callable[[int], FoldData] | None = None, folds: int = 1,
                 views_loader: Callable[[int, list[str]], tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]
                 | None = None) -> None:
        self._loader = loader
        self._fold_loader = fold_loader
        self._views_loader = views_loader
        self.frame_counts = tuple(int(k) for k in frame_counts)
        self.folds = int(folds) if fold_loader is not None else 1
        self.device = torch.device(device)
        self.provenance = provenance or {}
        self._data: dict[int, HeadData] = {}
        self._fold_data: dict[int, FoldData] = {}

    @classmethod
    def from_arrays(cls, data: dict[int, HeadData], *, folds: dict[int, FoldData] | None = None,
                    **kwargs: Any) -> HeadDataStore:
        """A store over data already in memory (tests, benchmarks); ``folds`` adds the K-fold data."""
        counts = sorted(data or folds or {})
        n_folds = next(iter(folds.values())).folds if folds else 1
        return cls(lambda k: data[k], counts, fold_loader=(lambda k: folds[k]) if folds else None, folds=n_folds,
                   **kwargs)

    @classmethod
    def from_cache(cls, cache: FeatureCache, split: Split, *, device: torch.device | str = "cpu",
                   val_variants: Sequence[str] = ("original",), pseudo: bool = True) -> HeadDataStore:
        """A store reading ``split.train``/``split.val`` (and every fold, for a K-fold split) from a feature cache;
        ``pseudo``: with the cache's pseudo-fake items of the training videos (`load_head_data`)."""
        def folds(k: int) -> FoldData:
            return load_fold_data(cache, split, k, val_variants=val_variants, pseudo=pseudo)

        def views(k: int, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
            variants = _cache_variants(cache, k, ())
            return (*_batch(cache, keys, k, variants), variants)

        return cls(lambda k: load_head_data(cache, split.train, split.val, k, val_variants=val_variants,
                                            pseudo=pseudo),
                   cache.provenance.frame_counts, device=device, provenance=cache.provenance.to_dict(),
                   fold_loader=folds if split.folds > 1 else None, folds=split.folds, views_loader=views)

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

    def val_in_every_view(self, frames: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        """The holdout's validation videos (``get(frames)``'s, in its order) in every TTA view the cache holds --
        what ``submit`` averages, so the temperature is fitted on it: ``(x [M, V, K, d], mask [M, K], variant
        names)`` on the store's device. A store without a cache (`from_arrays`) gives its validation views."""
        data = self.get(frames)
        if self._views_loader is None or not data.val_keys:
            return data.val_x, data.val_mask, tuple(data.variants[:data.val_x.shape[1]])
        x, mask, variants = self._views_loader(frames, list(data.val_keys))
        return x.to(self.device), mask.to(self.device), variants

    def get_folds(self, frames: int) -> FoldData:
        """Every fold's data for ``frames`` frames per video (loaded on first use).

        Raises:
            OptionError: the split has one fold.
        """
        self.check_frames([frames])
        if self._fold_loader is None:
            raise OptionError("cross-validation needs a K-fold split; make one with `arena split --folds K "
                              "--new-split` (or pass --no-cv).")
        if frames not in self._fold_data:
            self._fold_data[frames] = self._fold_loader(frames).to(self.device)
        return self._fold_data[frames]


def open_head_data(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
                   device: str = "auto", pseudo: bool = True) -> tuple[HeadDataStore, Split]:
    """Open the feature cache and the split of ``models_dir``: the inputs of ``tune-head`` and ``frame-test``.

    The split is ``models_dir``'s split file (checked against the dataset), made with the defaults when missing.

    Any cache of the dataset's videos serves any split of it: the split only chooses which cached videos train
    and which validate. ``pseudo``: train on the cache's pseudo-fake items of the training videos too.

    Raises:
        OptionError: unknown device. CacheError: unusable cache. DataError: unusable dataset or split file.
    """
    dev = resolve_device(device)
    cache = FeatureCache.open(cache_path)
    dataset = load_dataset(data_root, require_test=False)
    split = ensure_split(dataset, models_dir)
    return HeadDataStore.from_cache(cache, split, device=dev, pseudo=pseudo), split
