"""Pseudo-fakes: real clips self-blended (`arena.sbi`) and labelled fake, for fine-tuning and for the feature cache.

Self-Blended Images trains a detector on the traces every face swap leaves (a blending boundary, a region whose
colour or frequency content disagrees with its surround) instead of one generator's fingerprint; the fakes are made
from the training reals alone, so they need no fake of the test's family. Two paths use them:

* ``train-full --pseudo-fakes sbi[:P]`` (`PseudoFakes`): each training real gets, with probability P per epoch
  (default 1), a twin: a fresh self-blend of itself labelled fake, in the same batch (`arena.train_data`). The
  blend draws from a child of the clip's (seed, epoch, index) generator that nothing else draws from, so the reals,
  the ``--augment`` degradations and ``train_augment`` draw exactly what they drew without pseudo-fakes, and a
  twin gets its real's flip, shift and degradations. ``--train-on real`` is the SBI protocol: the training reals
  and their twins only.
* ``features --pseudo-fakes sbi:K`` (`CachePseudoFakes`): K self-blends of every labelled real become extra cache
  items ``<key>#sbi<i>`` (label 1) with the source's frame indices and boxes; every TTA view is made from the
  blended frames. The cache does not depend on the split, so every labelled real gets them; `pseudo_items` picks
  those whose source is in a training part.

A pseudo-fake's mask comes from the face box: under face crops the crop is face-centred, so the box is
`arena.sbi.face_square` of the crop; without crops (or when no face was found) `arena.sbi.self_blend` draws a
random face-sized region.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time; never do network I/O behind the user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402

from arena.cache import FeatureCache  # noqa: E402
from arena.cache.layout import pseudo_key, pseudo_source  # noqa: E402
from arena.errors import OptionError  # noqa: E402
from arena.sbi import SbiConfig, face_square, self_blend  # noqa: E402

__all__ = ["DEFAULT_P", "METHODS", "CachePseudoFakes", "PseudoFakes", "blend_clip", "face_box",
           "parse_cache_spec", "parse_train_spec", "pseudo_items", "pseudo_sources"]

METHODS = ("sbi",)
#: Default probability that a real has its twin in an epoch: every real with its own blend, every epoch, as SBI trains
#: (and, under ``--train-on real``, as many fakes as reals).
DEFAULT_P = 1.0


def _split_spec(text: str, option: str, what: str) -> tuple[str, str | None]:
    method, sep, value = str(text).strip().partition(":")
    if method not in METHODS:
        raise OptionError(f"Invalid {option} ({text!r}): the method must be one of {', '.join(METHODS)}, "
                          f"as in sbi or sbi:{what}.")
    if sep and not value:
        raise OptionError(f"Invalid {option} ({text!r}): give a number after the colon (sbi:{what}) or none (sbi).")
    return method, (value if sep else None)


def parse_train_spec(text: str) -> PseudoFakes:
    """``sbi`` or ``sbi:P`` (``train-full --pseudo-fakes``): P in (0, 1], default `DEFAULT_P`.

    Raises:
        OptionError: another method, P not a number or outside (0, 1].
    """
    method, value = _split_spec(text, "--pseudo-fakes", "P")
    if value is None:
        return PseudoFakes(method)
    try:
        p = float(value)
    except ValueError:
        raise OptionError(f"Invalid --pseudo-fakes ({text!r}): P must be a probability in (0, 1], e.g. sbi:0.5.") \
            from None
    return PseudoFakes(method, p)


def parse_cache_spec(text: str) -> CachePseudoFakes:
    """``sbi`` (one copy) or ``sbi:K`` (``features --pseudo-fakes``): K copies per labelled real, K >= 1.

    Raises:
        OptionError: another method, K not a whole number or below 1.
    """
    method, value = _split_spec(text, "--pseudo-fakes", "K")
    if value is None:
        return CachePseudoFakes(method)
    try:
        k = int(value)
    except ValueError:
        raise OptionError(f"Invalid --pseudo-fakes ({text!r}): K must be a whole number of copies per real >= 1, "
                          "e.g. sbi:2.") from None
    return CachePseudoFakes(method, k)


def _sbi_record(config: SbiConfig) -> dict[str, Any]:
    """The draw's settings as JSON-able data (tuples as lists, so a stored record compares equal to a fresh one)."""
    return {"sbi": json.loads(json.dumps(dataclasses.asdict(config))), "library": f"albumentations=={A.__version__}"}


@dataclass(frozen=True)
class PseudoFakes:
    """``train-full --pseudo-fakes``: with probability ``p`` per epoch, a training real is joined in its batch by
    a self-blend of itself labelled fake (its twin).

    Attributes:
        method: ``sbi``.
        p: the probability per real clip and epoch, in (0, 1].
        config: the self-blend's ranges.
    """

    method: str = "sbi"
    p: float = DEFAULT_P
    config: SbiConfig = dataclasses.field(default_factory=SbiConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"Invalid pseudo-fake method ({self.method}). Supported values are {', '.join(METHODS)}.")
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise OptionError(f"--pseudo-fakes sbi:P needs P in (0, 1] (a probability per real clip), got {self.p!r}.")

    @property
    def spec(self) -> str:
        """The option's value, normalised: ``sbi:0.5``."""
        return f"{self.method}:{self.p:g}"

    def record(self) -> dict[str, Any]:
        """What the run config stores: method, p, the draw's settings and the library that applies them."""
        return {"method": self.method, "p": float(self.p), **_sbi_record(self.config),
                "pairing": "each twin in its real's batch", "order": "blend, then the real's --augment draw and "
                "train_augment draw", "mask": "face box under --crop faces, else a random face-sized region"}

    def draw(self, seed: int, epoch: int, index: int) -> tuple[bool, np.random.Generator]:
        """Whether real ``index`` has its twin in ``epoch``, and the generator the twin's blend then draws from.

        The stream is child 1 of the clip's ``default_rng([seed, epoch, index])`` (`AugmentClip`'s degradations
        take child 0 and ``train_augment`` the parent's own stream), so it changes none of their draws.
        """
        rng = np.random.default_rng([seed, epoch, index]).spawn(2)[1]
        return bool(rng.random() < self.p), rng


@dataclass(frozen=True)
class CachePseudoFakes:
    """``features --pseudo-fakes sbi:K``: K self-blended copies of every labelled real as extra cache items.

    Attributes:
        method: ``sbi``.
        k: copies per labelled real, >= 1.
        config: the self-blend's ranges.
    """

    method: str = "sbi"
    k: int = 1
    config: SbiConfig = dataclasses.field(default_factory=SbiConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"Invalid pseudo-fake method ({self.method}). Supported values are {', '.join(METHODS)}.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise OptionError(f"--pseudo-fakes sbi:K needs K >= 1 (copies per labelled real), got {self.k!r}.")

    def keys(self, source: str) -> list[str]:
        """The cache keys of ``source``'s copies: ``<source>#sbi0`` ... ``<source>#sbi<K-1>``."""
        return [pseudo_key(source, self.method, i) for i in range(self.k)]

    def rng(self, seed: int, source: str, index: int) -> np.random.Generator:
        """Copy ``index`` of ``source``'s generator: a function of (seed, key, index) alone, so a copy is the same
        whichever shard, order or ``--limit`` made it."""
        digest = hashlib.sha256(f"arena-pseudo-fakes\0{seed}\0{source}\0{index}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "big"))

    def provenance(self, seed: int) -> dict[str, Any]:
        """The cache provenance's ``pseudo_fakes`` field."""
        return {"method": self.method, "copies": int(self.k), "seed": int(seed), **_sbi_record(self.config),
                "sources": "every labelled real (label 0)", "key": f"<source key>#{self.method}<i>", "label": 1}


def face_box(size: tuple[int, int], margin: float | None,
             found: bool | None) -> tuple[float, float, float, float] | None:
    """The face box of a clip for its blend mask: `face_square` of a face crop of ``size`` (the crop is centred on
    the face, ``margin`` times its larger side); None (a random face-sized region) for whole frames (``margin``
    None) or a video where no face was found (the letterboxed frame)."""
    if margin is None or not found:
        return None
    return face_square(size, margin)


def blend_clip(frames: torch.Tensor, rng: np.random.Generator, *, box: tuple[float, ...] | None,
               config: SbiConfig | None = None) -> torch.Tensor:
    """`arena.sbi.self_blend` of a torch clip: uint8 ``[T, 3, H, W]`` in and out (one draw for every frame)."""
    images = np.ascontiguousarray(frames.detach().cpu().permute(0, 2, 3, 1).numpy())
    blended = self_blend(images, rng=rng, box=box, config=config).frames
    return torch.from_numpy(blended).permute(0, 3, 1, 2).contiguous().to(frames.device)


def pseudo_sources(cache: FeatureCache) -> dict[str, str]:
    """Every usable pseudo-fake item of the cache -> its source video's key (in key order)."""
    return {key: pseudo_source(key) for key in cache.pseudo_keys}


def pseudo_items(cache: FeatureCache, train_keys: Iterable[str]) -> list[tuple[str, int]]:
    """``(key, 1)`` for each cached pseudo-fake item whose source video is one of ``train_keys``, in key order.

    What a head trains on besides its training videos: the copies of the training part's reals only, never those
    of a validation video (they would leak it). Failed items are not listed; a cache without pseudo-fakes gives [].
    """
    train = set(train_keys)
    return [(key, 1) for key, source in pseudo_sources(cache).items() if source in train]
