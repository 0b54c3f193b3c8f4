"""Fine-tuning's data: the shared clip pipeline (`arena.clips.ClipDataset`) with the training augmentation hook,
a seeded class-balanced subset for quick runs, and the collation of `ClipViews` into batches.

Training and validation clips come from exactly the decode the cache and the submission use; training adds, from a
generator seeded by (seed, epoch, index), the ``--augment`` level's degradations (`arena.augment`; none by default)
and then one `arena.tta.train_augment` draw per clip; validation takes the ``original`` view. A video that cannot
be decoded stays in its batch with weight 0 and is reported, never replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from arena.augment import check_level, degrade
from arena.clips import ClipDataset, ClipViews
from arena.faces.stage import FaceCropper
from arena.tta import train_augment


@dataclass(frozen=True)
class AugmentClip:
    """The training hook of `ClipDataset` (a dataclass: picklable for DataLoader workers).

    The ``level``'s degradations (`arena.augment.degrade`), then one `train_augment` draw. The degradations draw
    from a child of ``rng`` (``rng.spawn``), which leaves ``rng``'s own stream untouched: ``train_augment`` draws
    exactly what it drew before ``--augment`` existed, and level ``none`` gives the clips of earlier runs bit for bit.
    """

    level: str = "none"

    def __post_init__(self) -> None:
        check_level(self.level)

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.level != "none":
            frames = degrade(frames, self.level, rng.spawn(1)[0])
        return train_augment(frames, rng=rng)


def train_dataset(items: Sequence, *, frames: int, size: tuple[int, int], seed: int,
                  faces: FaceCropper | None = None, augment: str = "none") -> ClipDataset:
    """Training clips, augmented at ``augment`` (`arena.augment.LEVELS`; face crops of the main track first, with
    ``faces``); index with ``(epoch, index)`` keys (`arena.distributed.EpochSampler`)."""
    return ClipDataset(items, size=size, frames=frames, augment=AugmentClip(augment), seed=seed, faces=faces)


def eval_dataset(items: Sequence, *, frames: int, size: tuple[int, int],
                 faces: FaceCropper | None = None) -> ClipDataset:
    """Validation (or test) clips: the ``original`` view, as in the cache and the submission."""
    return ClipDataset(items, size=size, frames=frames, variants=("original",), faces=faces)


def limit_items(items: list, n: int | None, seed: int) -> list:
    """A seeded, class-balanced subset of at most ``n`` items (the split file is sorted by key, i.e. by class)."""
    if n is None or n >= len(items):
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    by_class = {c: [items[j] for j in order if items[j].label == c] for c in (0, 1)}
    picked: list = []
    while len(picked) < n and (by_class[0] or by_class[1]):
        for c in (0, 1):
            if by_class[c] and len(picked) < n:
                picked.append(by_class[c].pop(0))
    return sorted(picked, key=lambda it: it.key)


@dataclass
class ClipBatch:
    """A batch of clips for the model.

    Attributes:
        frames: uint8 ``[B, T, 3, H, W]`` (zeros for a clip that failed to decode).
        valid: bool ``[B, T]``, the attention mask (all True for a failed clip).
        label: int64 ``[B]``.
        index: int64 ``[B]``, each clip's position in its dataset.
        ok: bool ``[B]``: False where the video could not be decoded (its loss weighs 0).
        key: the videos' keys.
        message: why a clip failed (or is partial), "" otherwise.
    """

    frames: torch.Tensor
    valid: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    ok: torch.Tensor
    key: list[str]
    message: list[str]

    def __len__(self) -> int:
        return len(self.key)

    def pin_memory(self) -> ClipBatch:
        """Called by the DataLoader (``pin_memory=True``) so the copy to the GPU can run asynchronously."""
        return ClipBatch(self.frames.pin_memory(), self.valid.pin_memory(), self.label, self.index, self.ok,
                         self.key, self.message)


@dataclass(frozen=True)
class CollateClips:
    """``collate_fn`` of the training loaders: `ClipViews` (one view each) -> `ClipBatch`.

    ``frames`` and ``size`` give the shape of the zero clip that stands in for a failed decode, so a batch keeps its
    size (under DDP every rank must run the same steps).
    """

    frames: int
    size: tuple[int, int]

    def __call__(self, clips: list[ClipViews]) -> ClipBatch:
        h, w = self.size
        frames, valid = [], []
        for c in clips:
            if c.ok:
                frames.append(c.views[0])
                valid.append(torch.as_tensor(c.valid, dtype=torch.bool))
            else:
                frames.append(torch.zeros(self.frames, 3, h, w, dtype=torch.uint8))
                valid.append(torch.ones(self.frames, dtype=torch.bool))
        return ClipBatch(
            frames=torch.stack(frames),
            valid=torch.stack(valid),
            label=torch.tensor([int(c.label) for c in clips], dtype=torch.long),
            index=torch.tensor([c.index for c in clips], dtype=torch.long),
            ok=torch.tensor([c.ok for c in clips], dtype=torch.bool),
            key=[c.key for c in clips],
            message=[c.message for c in clips],
        )
