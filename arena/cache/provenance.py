"""The cache's identity: everything that determines the cached numbers, and nothing else.

A cache is refused when its provenance differs from what the current code and options would produce, with one
``field: stored -> current`` line per differing field. The split, the folds and arena's version string are not
part of it: features do not depend on them, so one cache serves every split and every fold.

Caches written before face crops existed have no ``crop`` field: they were built from whole frames, so they are
read as ``{"mode": "none"}`` (`NO_CROP`).

Caches with pseudo-fake items (``arena features --pseudo-fakes``) record how they were made in ``pseudo_fakes``; a
cache without them stores no such field, so its bytes are those of a cache written before the field existed.

Caches of format version 1 stored two more fields (``split_sha256``, ``arena_version``) and lacked the newer ones
(``decoder``, ``sampling``, ``feature_format``; their ``interpolation`` was the backbone's nominal value, not the
one applied). They are read as built with `V1_BUILT_WITH`: the values the code of that release applied, which are
also today's. Should the code change one of them, such a cache is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Version of what a feature row means (pooled pre-logit float16 per frame and view). Bump it when that changes
#: in a way no other field captures.
FEATURE_FORMAT = 1

#: Fields that format-1 caches stored although they never determined the features; ignored when read.
DROPPED_V1_FIELDS = ("arena_version", "split_sha256")

#: What every format-1 cache was built with, for the fields it did not store (or stored differently).
V1_BUILT_WITH: dict[str, Any] = {
    "interpolation": "bilinear-antialias",  # arena.video.resize_frames (torchvision), the "tensor" resize backend
    "decoder": {"device": "cpu", "resize": "tensor"},
    "sampling": {"formula": "np.linspace(0, n - 1, k).astype(int64)", "rule": "uniform",
                 "union": "sorted unique over k"},
    "feature_format": 1,
}


#: The crop field of a cache built from whole frames (and of every cache written before the field existed).
NO_CROP: dict[str, Any] = {"mode": "none"}


@dataclass(frozen=True)
class Provenance:
    """Everything that determines the cached numbers; a cache built with other values is refused.

    ``frame_counts`` and ``variants`` say what was extracted; a reader may ask for any k whose frames are
    covered and any subset of the variants.

    Attributes:
        backbone: timm model name.
        weights_source: ``hub:<name>``, ``file:<path>`` or ``random:<name>:seed=<s>``.
        weights_hash: sha256 of the backbone's state dict.
        input_size: (height, width) the frames are resized to.
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        interpolation: the resize actually applied to the decoded frames (e.g. ``bilinear-antialias``).
        decoder: decoder settings that change pixels (resize backend, decode device).
        tta: the TTA spec (`arena.tta.tta_spec`).
        variants: the TTA variants stored, in order.
        sampling: how frame indices are chosen (`arena.sampling.sampling_spec`).
        frame_counts: the k values whose frames were extracted.
        feature_dim: d, the feature size.
        feature_format: `FEATURE_FORMAT` of the code that wrote the features.
        crop: ``{"mode": "none"}`` (whole frames) or ``{"mode": "faces", ...}`` with every face-crop setting and the
            detector's package version (`arena.faces.FaceCropConfig.to_dict`).
        pseudo_fakes: None (no pseudo-fake items), or how the cache's pseudo-fake items were made (method, copies
            per labelled real, seed, the draw's settings: `arena.pseudo.CachePseudoFakes.provenance`).
    """

    backbone: str
    weights_source: str
    weights_hash: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    decoder: dict
    tta: dict
    variants: tuple[str, ...]
    sampling: dict
    frame_counts: tuple[int, ...]
    feature_dim: int
    feature_format: int
    crop: dict = dataclasses.field(default_factory=lambda: dict(NO_CROP))
    pseudo_fakes: dict | None = None

    def __post_init__(self) -> None:
        def norm(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("backbone", "weights_source", "weights_hash", "interpolation"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Provenance.{name} must be a str, got {getattr(self, name)!r}")
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Provenance.input_size must be (height, width) > 0, got {self.input_size!r}")
        norm("input_size", size)
        norm("mean", tuple(float(v) for v in self.mean))
        norm("std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"Provenance.mean and std must have the same non-zero length, got {self.mean}, {self.std}")
        variants = tuple(self.variants)
        if not variants or len(set(variants)) != len(variants) or not all(isinstance(v, str) for v in variants):
            raise ValueError(f"Provenance.variants must be distinct names, got {self.variants!r}")
        norm("variants", variants)
        counts = tuple(sorted({operator.index(k) for k in self.frame_counts}))
        if not counts or counts[0] < 1:
            raise ValueError(f"Provenance.frame_counts must be positive ints, got {self.frame_counts!r}")
        norm("frame_counts", counts)
        for name in ("feature_dim", "feature_format"):
            if operator.index(getattr(self, name)) < 1:
                raise ValueError(f"Provenance.{name} must be >= 1, got {getattr(self, name)!r}")
            norm(name, operator.index(getattr(self, name)))
        if not isinstance(self.crop, dict) or self.crop.get("mode") not in ("none", "faces"):
            raise ValueError(f"Provenance.crop must be a dict with mode none or faces, got {self.crop!r}")
        if self.pseudo_fakes is not None and not isinstance(self.pseudo_fakes, dict):
            raise ValueError(f"Provenance.pseudo_fakes must be None or a dict, got {self.pseudo_fakes!r}")
        for name in ("decoder", "tta", "sampling", "crop", *(("pseudo_fakes",) if self.pseudo_fakes else ())):
            try:  # a JSON round trip makes tuples lists and keys strings: the stored and the live spec compare equal
                norm(name, json.loads(json.dumps(dict(getattr(self, name)), sort_keys=True)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"Provenance.{name} must be a JSON-serialisable dict, got "
                                 f"{getattr(self, name)!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON: the same provenance always gives the same string (stored in the file)."""
        return json.dumps(_fields(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Inverse of :meth:`to_dict`; refuses missing or unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(data) - {"pseudo_fakes"}), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"provenance fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        """Parse stored provenance, reading a format-1 provenance as described in the module docstring."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"provenance must be a JSON object, got {type(data).__name__}")
        if "feature_format" not in data:  # written by format 1
            data = {k: v for k, v in data.items() if k not in DROPPED_V1_FIELDS} | V1_BUILT_WITH
        data.setdefault("crop", dict(NO_CROP))  # written before face crops: whole frames
        return cls.from_dict(data)

    @property
    def crop_mode(self) -> str:
        """``none`` or ``faces``."""
        return str(self.crop["mode"])

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def diff(self, other: Provenance, *, ignore: Iterable[str] = ()) -> list[str]:
        """Human-readable differences, one ``"field: self -> other"`` line per differing field."""
        a, b, skip = _plain(self), _plain(other), set(ignore)
        return [
            f"{name}: {_short(a[name])} -> {_short(b[name])}"
            for name in a
            if name not in skip and a[name] != b[name]
        ]


def _fields(provenance: Provenance) -> dict[str, Any]:
    """The stored fields: all of them, less ``pseudo_fakes`` when there are none (the bytes of earlier caches)."""
    fields = dataclasses.asdict(provenance)
    if fields["pseudo_fakes"] is None:
        del fields["pseudo_fakes"]
    return fields


def _plain(provenance: Provenance) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(provenance), sort_keys=True))


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
