"""The train/validation split: stratified by label, seeded, written once to ``split.json`` and reused by every stage.

The split is scikit-learn's ``train_test_split(keys, test_size=val_fraction, stratify=labels, random_state=seed)``,
as the seed project made it (70:30 by default: 420/180 for 300 real + 300 fake). The file stores the keys and
labels of each part, so a later stage sees the same split even if scikit-learn changed its shuffling; a dataset
that no longer matches the file is refused with the difference named.

Cached features do not depend on the split: after a new split (another seed, fraction or dataset), the cache stays
valid, while everything measured on the old split (``tune-head``, ``frame-test``, ``train-full``) must be rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import train_test_split

from arena._files import atomic_write_text
from arena.data import Dataset, VideoItem
from arena.errors import DataError

__all__ = ["AFTER_NEW_SPLIT", "SPLIT_FILE", "Split", "load_split", "make_split"]

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "arena-split-v1"
#: What a new split keeps and what it invalidates (printed by ``arena split --new-split`` and in mismatch errors).
AFTER_NEW_SPLIT = ("cached features stay valid (the cache does not depend on the split); rerun tune-head, "
                   "frame-test and train-full, whose heads, scores and checkpoints were made on the old split")


@dataclass
class Split:
    """The train/validation split of a dataset, as stored in ``path`` (sha256 of that file)."""

    train: list[VideoItem]
    val: list[VideoItem]
    path: Path
    sha256: str
    seed: int = 42
    val_fraction: float = 0.3

    def __repr__(self) -> str:
        return (f"Split(train={len(self.train)}, val={len(self.val)}, seed={self.seed}, "
                f"val_fraction={self.val_fraction}, path={str(self.path)!r}, sha256={self.sha256[:12]}...)")

    def counts(self) -> dict[str, int]:
        """Videos per part and class: train_real, train_fake, val_real, val_fake."""
        return {f"{part}_{cls}": sum(i.label == lab for i in items)
                for part, items in (("train", self.train), ("val", self.val))
                for cls, lab in (("real", 0), ("fake", 1))}


def _check_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; try 0.3")


def _stratified(items: list[VideoItem], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Sorted train and validation keys from scikit-learn's stratified ``train_test_split``."""
    ordered = sorted(items, key=lambda i: i.key)  # the input order must not depend on how the folder was listed
    keys = [i.key for i in ordered]
    labels = [i.label for i in ordered]
    for label in (0, 1):
        n = labels.count(label)
        if n < 2:
            raise DataError(f"cannot split: {n} {'fake' if label else 'real'} train video(s); each class needs at "
                            "least 2")
    try:
        train_keys, val_keys = train_test_split(keys, test_size=val_fraction, stratify=labels, random_state=seed,
                                                shuffle=True)
    except ValueError as e:  # e.g. a fraction that leaves fewer validation videos than classes
        raise DataError(f"cannot split {len(keys)} videos with val_fraction={val_fraction}: {e}; choose a "
                        "fraction that leaves at least one video of each class on both sides") from e
    return sorted(train_keys), sorted(val_keys)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_split(dataset: Dataset, out_dir: str | os.PathLike, *, val_fraction: float = 0.3, seed: int = 42,
               new: bool = False) -> Split:
    """Stratified train/validation split, written once to ``out_dir/split.json`` and reused afterwards.

    Args:
        dataset: from :func:`arena.data.load_dataset`.
        out_dir: folder of the split file (created if needed).
        val_fraction: share of the videos that goes to validation, stratified by label (0.3 -> 420/180 for 300+300).
        seed: ``random_state`` of the split; the same dataset and seed give the same split.
        new: overwrite an existing split file (``--new-split``).

    Raises:
        DataError: when an existing split file does not match the dataset, seed or fraction.
    """
    _check_fraction(val_fraction)
    path = Path(out_dir) / SPLIT_FILE
    if path.exists() and not new:
        split = load_split(dataset, out_dir)
        if split.seed != seed or not math.isclose(split.val_fraction, val_fraction):
            raise DataError(f"{path} was made with seed={split.seed}, val_fraction={split.val_fraction}, but "
                            f"seed={seed}, val_fraction={val_fraction} was asked; use the stored values, or delete "
                            "the file (or pass --new-split) to regenerate it")
        return split
    train_keys, val_keys = _stratified(dataset.train, val_fraction, seed)
    labels = {i.key: i.label for i in dataset.train}
    doc = {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "val_fraction": val_fraction,
        "train": {k: labels[k] for k in train_keys},
        "val": {k: labels[k] for k in val_keys},
    }
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")  # a crash leaves old or new, never half
    return load_split(dataset, out_dir)


def ensure_split(dataset: Dataset, out_dir: str | os.PathLike) -> Split:
    """The split a stage trains and validates on: ``out_dir/split.json`` whatever seed made it, else a new one.

    ``arena split`` chooses the seed and fraction; a stage that finds no split file makes the default one
    (seed 42, 70:30) rather than fail, as every stage of the seed project did.
    """
    if (Path(out_dir) / SPLIT_FILE).exists():
        return load_split(dataset, out_dir)
    return make_split(dataset, out_dir)


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
        doc = json.loads(path.read_text(encoding="utf-8"))
        seed, fraction = int(doc["seed"]), float(doc["val_fraction"])
        stored = {**{k: ("train", int(v)) for k, v in doc["train"].items()},
                  **{k: ("val", int(v)) for k, v in doc["val"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid split file ({type(e).__name__}: {e}); {regenerate}") from e
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
    return Split(train=train, val=val, path=path, sha256=_sha256(path), seed=seed, val_fraction=fraction)
