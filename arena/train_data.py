"""Fine-tuning's data: the shared clip pipeline (`arena.clips.ClipDataset`) with the training augmentation hook,
a seeded class-balanced subset for quick runs, and the collation of `ClipViews` into batches.

Training and validation clips come from exactly the decode the cache and the submission use; training adds, from a
generator seeded by (seed, epoch, index), the ``--augment`` level's degradations (`arena.augment`; none by default)
and then one `arena.tta.train_augment` draw per clip; validation takes the ``original`` view. With
``--pseudo-fakes`` (`arena.pseudo`; off by default) a real's twin, its self-blend labelled fake, sits beside it in
the batch (`PseudoFakeSampler`). A video that cannot be decoded stays in its batch with weight 0 and is reported,
never replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from arena.augment import check_level, degrade
from arena.clips import ClipDataset, ClipViews
from arena.distributed import EpochSampler
from arena.errors import OptionError
from arena.faces.stage import FaceCropper
from arena.pseudo import PseudoFakes, blend_clip, face_box
from arena.tta import train_augment

TRAIN_ON = ("all", "real")


@dataclass(frozen=True)
class AugmentClip:
    """The training hook of `ClipDataset` (a dataclass: picklable for the decode workers).

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


class TrainClips(ClipDataset):
    """Training clips: the decoded clip (face crops of the main track first, with ``faces``), then ``hook``; with
    ``pseudo``, a real's twin is the same clip self-blended (`arena.pseudo`) and labelled fake.

    Keys are ``(epoch, index)`` (`arena.distributed.EpochSampler`) or ``(epoch, index, 1)`` for the twin of real
    ``index`` (`PseudoFakeSampler` asks for it, beside the real, in the epochs `is_twinned` says). Every draw comes
    from generators seeded by (seed, epoch, index): the hook from ``default_rng([seed, epoch, index])`` exactly as
    `ClipDataset` passes it, the blend from that generator's child 1 (`arena.pseudo.PseudoFakes.draw`). So a
    clip is the one `ClipDataset` with ``augment=hook`` gives, bit for bit, and a twin is its real with the blend
    inserted before the hook: the same flip, shift and degradations, only the blend differs. Only the main face
    track is blended (training reads no other). A twin's ``index`` is ``len(items) + index``.
    """

    def __init__(self, items: Sequence, *, frames: int, size: tuple[int, int], seed: int,
                 faces: FaceCropper | None = None, hook: AugmentClip | None = None,
                 pseudo: PseudoFakes | None = None) -> None:
        super().__init__(items, size=size, frames=frames, variants=("original",), seed=seed, faces=faces)
        self.hook = hook or AugmentClip()
        self.pseudo = pseudo

    def is_twinned(self, epoch: int, index: int) -> bool:
        """Whether real ``index`` has its pseudo-fake twin in ``epoch`` (probability ``pseudo.p``; fakes never)."""
        return (self.pseudo is not None and self.items[index].label == 0
                and self.pseudo.draw(self.seed, epoch, index)[0])

    def failed(self, key: int | tuple[int, ...], message: str) -> ClipViews:
        """The failed clip of ``key``: a twin's is labelled fake and indexed as the twin."""
        clip = super().failed(key, message)
        twin = isinstance(key, tuple) and len(key) > 2 and key[2]
        return dataclasses.replace(clip, label=1, index=len(self.items) + clip.index) if twin else clip

    def __getitem__(self, key: int | tuple[int, ...]) -> ClipViews:
        epoch, i, twin = (*key, 0)[:3] if isinstance(key, tuple) else (0, key, 0)
        clip = super().__getitem__((epoch, i))  # the original view of every track, un-augmented
        if not clip.ok:
            return self.failed(key, clip.message)
        tracks = [clip.views[0], *(v[0] for v in clip.track_views)]
        if twin:
            if self.pseudo is None or clip.label != 0:
                raise ValueError(f"clip {i} ({clip.key}) has no pseudo-fake twin: only reals do, with pseudo-fakes on")
            margin = self.faces.config.margin if self.faces is not None else None
            rng = self.pseudo.draw(self.seed, epoch, i)[1]
            tracks[0] = blend_clip(tracks[0], rng, box=face_box(self.size, margin, clip.faces_found),
                                   config=self.pseudo.config)
        views = [self.hook(t, np.random.default_rng([self.seed, epoch, i])).unsqueeze(0) for t in tracks]
        return dataclasses.replace(clip, views=views[0], track_views=tuple(views[1:]),
                                   label=1 if twin else clip.label, index=len(self.items) + i if twin else i)


def train_dataset(items: Sequence, *, frames: int, size: tuple[int, int], seed: int,
                  faces: FaceCropper | None = None, augment: str = "none",
                  pseudo: PseudoFakes | None = None) -> TrainClips:
    """Training clips with ``pseudo``'s pseudo-fakes (None: none), augmented at ``augment``
    (`arena.augment.LEVELS`); index with ``(epoch, index)`` keys (`arena.distributed.EpochSampler`)."""
    return TrainClips(items, size=size, frames=frames, seed=seed, faces=faces, hook=AugmentClip(augment),
                      pseudo=pseudo)


def training_items(items: Sequence, train_on: str) -> list:
    """The training part's videos ``--train-on`` trains on: ``all``, or ``real`` (the SBI protocol: the reals
    only, the fakes coming from ``--pseudo-fakes``)."""
    if train_on not in TRAIN_ON:
        raise OptionError(f"Invalid --train-on ({train_on}). Supported values are {', '.join(TRAIN_ON)}.")
    return list(items) if train_on == "all" else [it for it in items if it.label == 0]


class PseudoFakeSampler(EpochSampler):
    """The training order with pseudo-fakes: every twinned real (`TrainClips.is_twinned`) next to its twin, so a
    batch of an even size holds both; the other clips class-balanced as `EpochSampler` pairs them (``balanced``),
    else in pairs as they come. The pairs are shuffled together; under DDP each rank gets whole pairs.

    A real and its own blend differ only inside the mask: in one batch (train-mode BatchNorm normalises them
    together) the blend's trace is the only thing that tells them apart, which is what SBI trains on and what makes
    it learnable from a random-init backbone in few steps.
    """

    def __init__(self, dataset: TrainClips, *, world: int, rank: int, seed: int, balanced: bool = True) -> None:
        super().__init__(dataset, world=world, rank=rank, shuffle=True, seed=seed)
        self.dataset = dataset
        self.balanced = balanced

    def _keys(self) -> list[tuple[int, ...]]:
        ds, e = self.dataset, self.epoch
        g = np.random.default_rng([self.seed, e, 19])
        labels = np.array([it.label for it in ds.items], dtype=np.int64)
        twinned = [i for i in np.flatnonzero(labels == 0).tolist() if ds.is_twinned(e, i)]
        pairs: list[list[tuple[int, ...]]] = [[(e, i), (e, i, 1)] for i in twinned]
        rest = np.setdiff1d(np.arange(len(labels)), twinned)
        if self.balanced:
            real = g.permutation(rest[labels[rest] == 0]).tolist()
            fake = g.permutation(rest[labels[rest] == 1]).tolist()
            m = min(len(real), len(fake))
            singles = [i for pair in zip(real[:m], fake[:m], strict=True) for i in pair]
            singles += g.permutation(np.array(real[m:] + fake[m:], dtype=np.int64)).tolist()
        else:
            singles = g.permutation(rest).tolist()
        pairs += [[(e, i) for i in singles[j:j + 2]] for j in range(0, len(singles), 2)]
        # shuffled, a lone clip (an odd count) last: every pair then fills two places of one even-sized batch
        pairs = sorted((pairs[j] for j in g.permutation(len(pairs))), key=len, reverse=True)
        while len(pairs) % self.world:  # every rank the same number of steps (DDP)
            pairs.append(pairs[len(pairs) % max(1, len(twinned) or 1)])
        return [key for pair in pairs[self.rank::self.world] for key in pair]

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


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
        """Called by the decode supervisor (``pin_memory=True``) so the copy to the GPU can run asynchronously."""
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
