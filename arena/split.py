"""The train/validation split: stratified by label, grouped by source, seeded, written once to ``split.json`` and
reused by every stage.

A fake and the real it was made from share a group (`arena.groups`: from the data's ``original``/``source``/
``group`` column or ``metadata.json``, else detected near-duplicates), and a group never straddles train and
validation: otherwise validation rewards remembered scenes. Groups are found with ``groups="auto"`` by default.

* ``folds=1`` (default): a 70:30 holdout. When no two videos share a group (``groups="none"``, or nothing found)
  it is the seed project's split, scikit-learn's ``train_test_split(keys, test_size=val_fraction, stratify=labels,
  random_state=seed)`` (420/180 for 300 real + 300 fake). With groups it is ``StratifiedGroupKFold(n, shuffle=True,
  random_state=seed)`` with ``m`` of its folds as validation, ``m/n`` the fraction closest to ``val_fraction`` with
  ``n <= 10`` (3 of 10 folds for 0.3, so the share stays 30 % rather than the 33 % of one fold in three); of the
  ways to take m folds, the one closest to ``val_fraction`` of each class (the first such in fold order).
* ``folds=K > 1``: ``StratifiedGroupKFold(K, shuffle=True, random_state=seed)``; fold i validates on its part and
  trains on the rest. `Split.train`/`Split.val` are fold 0 (what every stage uses by default), `Split.fold(i)`
  gives fold i.

The file stores the keys and labels of each part (and each video's fold), the groups mode and the pairs that made
the groups, so a later stage sees the same split even if scikit-learn changed its shuffling; a dataset that no
longer matches the file is refused with the difference named. A file written before groups existed (format v1)
loads as ``groups="none"``, one fold.

Cached features do not depend on the split: after a new split (another seed, fraction, folds, groups or dataset),
the cache stays valid, while everything measured on the old split (``tune-head``, ``frame-test``, ``train-full``)
must be rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from arena._files import atomic_write_text
from arena.data import Dataset, VideoItem
from arena.errors import DataError, OptionError
from arena.groups import Groups, GroupsMode, find_groups

__all__ = ["AFTER_NEW_SPLIT", "SPLIT_FILE", "Split", "ensure_split", "load_split", "make_split", "stored_parts"]

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "arena-split-v2"
_FORMATS = ("arena-split-v1", SPLIT_FORMAT)  # v1: before groups and folds
#: Most folds a grouped holdout is cut into (its validation share is a whole number of them).
MAX_HOLDOUT_FOLDS = 10
#: What a new split keeps and what it invalidates (printed by ``arena split --new-split`` and in mismatch errors).
AFTER_NEW_SPLIT = ("cached features stay valid (the cache does not depend on the split); rerun tune-head, "
                   "frame-test and train-full, whose heads, scores and checkpoints were made on the old split")


@dataclass
class Split:
    """The train/validation split of a dataset, as stored in ``path`` (sha256 of that file).

    ``train``/``val`` are fold ``fold_index`` (0 unless made by :meth:`fold`). ``val_fraction`` is None for
    ``folds > 1`` (each fold validates on about 1/K). ``pairs`` are the key pairs that made the groups;
    ``fold_of`` maps every key to the fold that validates on it (empty for one fold).
    """

    train: list[VideoItem]
    val: list[VideoItem]
    path: Path
    sha256: str
    seed: int = 42
    val_fraction: float | None = 0.3
    folds: int = 1
    groups: str = "none"
    group_source: str = "none"
    pairs: list[tuple[str, str]] = field(default_factory=list)
    fold_of: dict[str, int] = field(default_factory=dict)
    fold_index: int = 0

    def __repr__(self) -> str:
        fold = f"fold={self.fold_index}/{self.folds}, " if self.folds > 1 else ""
        return (f"Split(train={len(self.train)}, val={len(self.val)}, {fold}seed={self.seed}, "
                f"val_fraction={self.val_fraction}, groups={self.groups!r}, pairs={len(self.pairs)}, "
                f"path={str(self.path)!r}, sha256={self.sha256[:12]}...)")

    def counts(self) -> dict[str, int]:
        """Videos per part and class: train_real, train_fake, val_real, val_fake."""
        return {f"{part}_{cls}": sum(i.label == lab for i in items)
                for part, items in (("train", self.train), ("val", self.val))
                for cls, lab in (("real", 0), ("fake", 1))}

    def fold(self, i: int) -> Split:
        """Fold ``i`` (0 .. folds-1): the same split file, training on the other folds and validating on fold i.

        Raises:
            OptionError: no such fold.
        """
        if not (isinstance(i, int) and 0 <= i < self.folds):
            raise OptionError(f"fold {i!r} does not exist: {self.path} has {self.folds} fold(s), numbered 0 to "
                              f"{self.folds - 1}; make more with `arena split --folds K --new-split`")
        if i == self.fold_index:
            return self
        items = sorted(self.train + self.val, key=lambda it: it.key)
        return dataclasses.replace(
            self, fold_index=i,
            train=[dataclasses.replace(it, split="train") for it in items if self.fold_of[it.key] != i],
            val=[dataclasses.replace(it, split="val") for it in items if self.fold_of[it.key] == i])

    def fold_counts(self) -> list[dict[str, int]]:
        """`counts` of every fold, in fold order."""
        return [self.fold(i).counts() for i in range(self.folds)]


def _check_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; try 0.3")


def _check_classes(labels: list[int]) -> None:
    for label in (0, 1):
        n = labels.count(label)
        if n < 2:
            raise DataError(f"cannot split: {n} {'fake' if label else 'real'} train video(s); each class needs at "
                            "least 2")


def _stratified(keys: list[str], labels: list[int], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Sorted train and validation keys from scikit-learn's stratified ``train_test_split`` (the seed's split)."""
    try:
        train_keys, val_keys = train_test_split(keys, test_size=val_fraction, stratify=labels, random_state=seed,
                                                shuffle=True)
    except ValueError as e:  # e.g. a fraction that leaves fewer validation videos than classes
        raise DataError(f"cannot split {len(keys)} videos with val_fraction={val_fraction}: {e}; choose a "
                        "fraction that leaves at least one video of each class on both sides") from e
    return sorted(train_keys), sorted(val_keys)


def _group_folds(labels: list[int], group_ids: list[str], n_splits: int, seed: int) -> np.ndarray:
    """The validation fold of every video from ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``."""
    fold = np.full(len(labels), -1)
    try:
        with warnings.catch_warnings():  # "least populated class ... less than n_splits": checked by _check_sides
            warnings.simplefilter("ignore", UserWarning)
            cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            for i, (_, val_idx) in enumerate(cv.split(np.zeros(len(labels)), labels, group_ids)):
                fold[val_idx] = i
    except ValueError as e:  # more folds than groups or than videos of each class
        raise DataError(f"cannot cut {len(labels)} videos in {len(set(group_ids))} groups into {n_splits} "
                        f"stratified grouped folds: {e}; use fewer folds (or --groups none)") from e
    return fold


def _check_sides(labels: list[int], val: np.ndarray, what: str) -> None:
    """Both classes on both sides of ``val`` (a boolean mask), else a DataError naming ``what``."""
    y = np.asarray(labels)
    for side, mask in (("training", ~val), ("validation", val)):
        for label, cls in ((0, "real"), (1, "fake")):
            if not np.any(y[mask] == label):
                raise DataError(f"{what}: {side} would hold no {cls} video (groups keep a fake with its source, so "
                                "small data leave few ways to cut); use fewer folds or another val_fraction, or "
                                "--groups none")


def _holdout_shape(val_fraction: float, n_groups: int) -> tuple[int, int]:
    """``(n, m)``: cut into n grouped folds and validate on m, m/n closest to ``val_fraction`` (smallest n wins)."""
    def taken(n: int) -> int:
        return min(n - 1, max(1, round(val_fraction * n)))

    n = min(range(2, MAX_HOLDOUT_FOLDS + 1), key=lambda n: (abs(val_fraction * n - taken(n)), n))
    n = max(2, min(n, n_groups))
    return n, taken(n)


def _assign(dataset: Dataset, groups: Groups, *, folds: int, val_fraction: float, seed: int
            ) -> tuple[list[str], list[str], dict[str, int]]:
    """Train keys, validation keys (fold 0) and, for ``folds > 1``, every key's fold."""
    items = sorted(dataset.train, key=lambda i: i.key)  # the input order must not depend on how the folder was listed
    keys = [i.key for i in items]
    labels = [i.label for i in items]
    group_ids = groups.ids(keys)
    n_groups = len(set(group_ids))
    if folds == 1 and not groups.any_shared:
        train_keys, val_keys = _stratified(keys, labels, val_fraction, seed)
        return train_keys, val_keys, {}
    if folds == 1:
        n, m = _holdout_shape(val_fraction, n_groups)
        fold = _group_folds(labels, group_ids, n, seed)
        y = np.asarray(labels)
        per_fold = np.array([[np.sum((fold == i) & (y == c)) for c in (0, 1)] for i in range(n)])
        target = val_fraction * per_fold.sum(axis=0)
        taken = min(itertools.combinations(range(n), m),  # at most C(10, 5) = 252 ways
                    key=lambda folds: float(np.abs(per_fold[list(folds)].sum(axis=0) - target).sum()))
        val = np.isin(fold, taken)
        _check_sides(labels, val, f"cannot hold out {val_fraction:g} of {len(keys)} videos in {n_groups} groups")
        return sorted(np.asarray(keys)[~val].tolist()), sorted(np.asarray(keys)[val].tolist()), {}
    fold = _group_folds(labels, group_ids, folds, seed)
    for i in range(folds):
        _check_sides(labels, fold == i, f"cannot cut {len(keys)} videos in {n_groups} groups into {folds} folds "
                     f"(fold {i})")
    fold_of = {k: int(f) for k, f in zip(keys, fold, strict=True)}
    return [k for k in keys if fold_of[k] != 0], [k for k in keys if fold_of[k] == 0], fold_of


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_split(dataset: Dataset, out_dir: str | os.PathLike, *, val_fraction: float = 0.3, seed: int = 42,
               folds: int = 1, groups: GroupsMode | Groups = "auto", new: bool = False) -> Split:
    """Stratified, grouped train/validation split (or K folds), written once to ``out_dir/split.json`` and reused.

    Args:
        dataset: from :func:`arena.data.load_dataset`.
        out_dir: folder of the split file (created if needed).
        val_fraction: share of the videos that goes to validation when ``folds == 1`` (0.3 -> 420/180 for 300+300
            without groups); ignored for ``folds > 1``.
        seed: ``random_state`` of the split; the same dataset and seed give the same file, byte for byte.
        folds: 1 for one holdout, K > 1 for K stratified grouped folds.
        groups: ``auto``/``column``/``none`` (see :func:`arena.groups.find_groups`), or groups already found.
        new: overwrite an existing split file (``--new-split``).

    Raises:
        DataError: an existing split file that does not match the dataset or the settings asked for, or data
            that cannot be split so (too few videos or groups per class).
        OptionError: ``folds < 1`` or an unknown groups mode.
    """
    _check_fraction(val_fraction)
    if not (isinstance(folds, int) and folds >= 1):
        raise OptionError(f"folds must be an integer >= 1, got {folds!r}; 1 keeps a holdout, try 5 for 5 folds")
    mode = groups.mode if isinstance(groups, Groups) else groups
    path = Path(out_dir) / SPLIT_FILE
    if path.exists() and not new:
        split = load_split(dataset, out_dir)
        same = (split.seed, split.folds, split.groups) == (seed, folds, mode) and (
            folds > 1 or math.isclose(split.val_fraction or 0.0, val_fraction))
        if not same:
            made = _settings(split.seed, split.val_fraction, split.folds, split.groups)
            raise DataError(f"{path} was made with {made}, but {_settings(seed, val_fraction, folds, mode)} was "
                            "asked; use the stored values, or delete the file (or pass --new-split) to regenerate it")
        return split
    _check_classes([i.label for i in dataset.train])  # before groups: detection decodes every video
    found = groups if isinstance(groups, Groups) else find_groups(dataset, groups)
    train_keys, val_keys, fold_of = _assign(dataset, found, folds=folds, val_fraction=val_fraction, seed=seed)
    labels = {i.key: i.label for i in dataset.train}
    doc = {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "val_fraction": val_fraction if folds == 1 else None,
        "folds": folds,
        "groups": mode,
        "group_source": found.source,
        "pairs": [[p.a, p.b] for p in found.pairs],
        "train": {k: labels[k] for k in train_keys},
        "val": {k: labels[k] for k in val_keys},
    }
    if folds > 1:
        doc["fold"] = fold_of
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")  # a crash leaves old or new, never half
    return load_split(dataset, out_dir)


def _settings(seed: int, val_fraction: float | None, folds: int, groups: str) -> str:
    holdout = f"val_fraction={val_fraction}" if folds == 1 else f"folds={folds}"
    return f"seed={seed}, {holdout}, groups={groups}"


def ensure_split(dataset: Dataset, out_dir: str | os.PathLike) -> Split:
    """The split a stage trains and validates on: ``out_dir/split.json`` whatever made it, else a new one.

    ``arena split`` chooses the seed, fraction, folds and groups; a stage that finds no split file makes the
    default one (seed 42, 70:30, groups auto: from the data, else detected) rather than fail, as every stage of
    the seed project did.
    """
    if (Path(out_dir) / SPLIT_FILE).exists():
        return load_split(dataset, out_dir)
    return make_split(dataset, out_dir)


def _read_doc(path: Path) -> dict:
    """The parsed split file, its fields checked; raises ValueError/KeyError/TypeError for a bad one."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    fmt = doc.get("format", "arena-split-v1")
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r} (this arena reads {', '.join(_FORMATS)})")
    folds = int(doc.get("folds", 1))
    parts = {**{k: ("train", int(v)) for k, v in doc["train"].items()},
             **{k: ("val", int(v)) for k, v in doc["val"].items()}}
    fold_of = {k: int(v) for k, v in doc.get("fold", {}).items()} if folds > 1 else {}
    if folds > 1 and (set(fold_of) != set(parts) or set(fold_of.values()) - set(range(folds))
                      or {k for k, f in fold_of.items() if f == 0} != set(doc["val"])):
        raise ValueError(f"'fold' must give every video a fold 0..{folds - 1}, fold 0 being 'val'")
    return {"seed": int(doc["seed"]),
            "val_fraction": None if doc["val_fraction"] is None else float(doc["val_fraction"]),
            "folds": folds, "groups": str(doc.get("groups", "none")),
            "group_source": str(doc.get("group_source", "none")),
            "pairs": [(str(a), str(b)) for a, b in doc.get("pairs", [])], "parts": parts, "fold_of": fold_of}


def stored_parts(out_dir: str | os.PathLike) -> dict[str, object] | None:
    """Where an existing split file puts each key (``train``/``val``, or its fold when it has several), read
    without checking it against a dataset; None when there is no readable split file."""
    path = Path(out_dir) / SPLIT_FILE
    try:
        doc = _read_doc(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(doc["fold_of"]) if doc["folds"] > 1 else {k: part for k, (part, _) in doc["parts"].items()}


def load_split(dataset: Dataset, out_dir: str | os.PathLike) -> Split:
    """Read ``out_dir/split.json`` and check it still matches the dataset (same train keys and labels).

    Raises:
        DataError: file missing or unreadable, or the dataset changed since the split was made.
    """
    path = Path(out_dir) / SPLIT_FILE
    regenerate = f"delete {path} (or pass --new-split) to regenerate it"
    if not path.is_file():
        raise DataError(f"no split file at {path}; create it with `arena split --data {dataset.root} --out {out_dir}`")
    try:
        doc = _read_doc(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid split file ({type(e).__name__}: {e}); {regenerate}") from e
    stored = doc["parts"]
    current = {i.key: i for i in dataset.train}
    gone = sorted(set(stored) - set(current))
    new = sorted(set(current) - set(stored))
    relabelled = sorted(k for k in set(stored) & set(current) if stored[k][1] != current[k].label)
    problems = []
    for what, keys in (("in the split but no longer in the dataset", gone),
                       ("in the dataset but not in the split", new), ("with a changed label", relabelled)):
        if keys:
            problems.append(f"{len(keys)} video(s) {what} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise DataError(f"{path} no longer matches the dataset in {dataset.root}: {'; '.join(problems)}. "
                        f"The dataset changed since the split was made; {regenerate}: {AFTER_NEW_SPLIT}")
    train = [dataclasses.replace(current[k], split="train") for k in sorted(stored) if stored[k][0] == "train"]
    val = [dataclasses.replace(current[k], split="val") for k in sorted(stored) if stored[k][0] == "val"]
    return Split(train=train, val=val, path=path, sha256=_sha256(path), seed=doc["seed"],
                 val_fraction=doc["val_fraction"], folds=doc["folds"], groups=doc["groups"],
                 group_source=doc["group_source"], pairs=doc["pairs"], fold_of=doc["fold_of"])
