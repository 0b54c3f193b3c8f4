"""Ensembles: several models (folds, seeds, backbones) score every video and their calibrated outputs are averaged.

Members come from models folders (``--models``: the folder's own model, or one member per fold of a K-fold study,
`arena.models_folder.fold_dirs`) and from checkpoint files named exactly (``--checkpoint``). Each member applies
its own temperature first; the ensemble is the mean of the members' calibrated probabilities (``prob``) or of
their calibrated logits (``logit``, then mapped back through the sigmoid).

The cost stays near one model's: members that decode alike (frames, TTA views, input size, crop) share one decode
per video, and members holding one encoder object share one backbone pass (`arena.predict.Predictor`). Heads tuned
on one cache -- the folds of a K-fold study -- recreate one encoder (`load_model`'s ``encoders``), so a 5-fold head
ensemble costs one decode, one backbone pass and five tiny heads per video. Fine-tuned members bring their own
backbone, and pay a pass each.

A single member is exactly that model: its predictions are passed through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import expit
from tqdm import tqdm

from arena.calibration import probs_to_logits
from arena.errors import ModelsError, OptionError
from arena.models_folder import BEST_HEAD_FILE, FINETUNED_SUFFIX, FOLD_PREFIX, FOLDS_DIR, fold_dirs
from arena.predict import (
    LoadedModel,
    ModelKind,
    Predictor,
    PredictRun,
    VideoPrediction,
    checkpoint_kind,
    decoded_clips,
    failed_prediction,
)
from arena.runtime import Precision
from arena.tta import VARIANTS

Combine = Literal["prob", "logit"]
PathsArg = str | os.PathLike | Sequence[str | os.PathLike] | None  # one path, several or none
COMBINE_MODES = ("prob", "logit")
#: Names a member may not take: ``p_<name>`` would clash with predictions_detail.csv's own ``p_*`` columns.
RESERVED_NAMES = frozenset({"fake", "tracks", *VARIANTS})


# ----------------------------------------------------------------------------------------------------------------
# Members


@dataclass(frozen=True)
class MemberSource:
    """Where one member comes from, before its model is loaded.

    Attributes:
        name: unique and readable: ``fold_<i>``, the models folder's name (a ``best_head.pt``'s folder's), a
            fine-tuned checkpoint's stem; ``p_<name>`` in ``predictions_detail.csv``.
        path: what `arena.predict.load_model` loads: a models folder or one checkpoint file.
        kind: the kind to load (``--model`` for a folder, the file's own kind for a checkpoint).
        fold: ``i`` for ``<models>/folds/fold_<i>`` (or a checkpoint in it), else None.
        split_root: the folder whose ``split.json`` the member was trained on (a fold's is its study's folder).
    """

    name: str
    path: Path
    kind: ModelKind
    fold: int | None
    split_root: Path


@dataclass
class Member:
    """A loaded member: its source and its model."""

    source: MemberSource
    model: LoadedModel

    @property
    def name(self) -> str:
        return self.source.name

    def line(self) -> str:
        """``name: kind (checkpoint), k frames (where from), temperature T``, plus the crop when it cuts faces."""
        m = self.model
        return (f"{self.name}: {m.kind} ({m.source}), {m.frames} frames ({m.frames_source}), "
                f"temperature {m.temperature:.3f}{_faces(m)}")


def _faces(model: LoadedModel) -> str:
    return "" if model.crop.get("mode") == "none" else f", face crops ({model.max_faces} track(s) per video)"


def _fold_index(folder: Path) -> int | None:
    """``i`` when ``folder`` is ``.../folds/fold_<i>``."""
    digits = folder.name[len(FOLD_PREFIX):]
    fold = folder.parent.name == FOLDS_DIR and folder.name.startswith(FOLD_PREFIX) and digits.isdigit()
    return int(digits) if fold else None


def _has_own_model(folder: Path, kind: ModelKind) -> bool:
    finetuned = any(folder.glob("*" + FINETUNED_SUFFIX))
    head = (folder / BEST_HEAD_FILE).is_file()
    return {"auto": finetuned or head, "finetuned": finetuned, "head-only": head}.get(kind, True)


def _entry(name: str, path: Path, kind: ModelKind, folder: Path, qualifier: str | None = None
           ) -> tuple[str, str, Path, ModelKind, int | None, Path]:
    """(name, the prefix that tells it apart, path, kind, fold, split root) of a member whose model is in ``folder``:
    a fold's split root and prefix are its study's folder, anything else's its own folder and its parent."""
    folder = folder.resolve()
    fold = _fold_index(folder)
    root = folder.parent.parent if fold is not None else folder
    return name, qualifier or (root.name if fold is not None else folder.parent.name), path, kind, fold, root


def as_paths(value: PathsArg) -> list[Path]:
    """One path, several or none, as a list."""
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]


def member_sources(
    models: PathsArg = None,
    checkpoints: PathsArg = None,
    *,
    kind: ModelKind = "auto",
    echo: Callable[[str], None] | None = None,
) -> list[MemberSource]:
    """The members ``--models`` and ``--checkpoint`` name, in that order, with unique names.

    A ``--models`` folder is one member (its fine-tuned or head-only model, by ``kind``), unless it is a ``folds``
    folder or a K-fold study's folder without a model of its own (said through ``echo``): then every ``fold_<i>``
    in it is a member. A ``--checkpoint`` is ``best_head.pt`` (head-only) or ``<backbone>_best.pt`` (fine-tuned).

    Raises:
        OptionError: nothing given.
        ModelsError: a folds folder without folds, a checkpoint that is missing or of neither kind.
    """
    found: list[tuple[str, str, Path, ModelKind, int | None, Path]] = []
    for folder in as_paths(models):
        if folder.name == FOLDS_DIR or (not _has_own_model(folder, kind) and fold_dirs(folder)):
            folds = fold_dirs(folder)
            if not folds:
                raise ModelsError(f"{folder}: no {FOLD_PREFIX}<i> folder in it; `arena tune-head` on a K-fold split "
                                  "(`arena split --folds K`) writes them.")
            if folder.name != FOLDS_DIR and echo is not None:
                echo(f"{folder}: no model of its own; its {len(folds)} fold models are the members "
                     f"({', '.join(f.name for f in folds)})")
            found += [_entry(f.name, f, kind, f) for f in folds]
        else:
            found.append(_entry(folder.resolve().name, folder, kind, folder))
    for path in as_paths(checkpoints):
        # best_head.pt says nothing: its folder names the head, as it would name a --models member
        head = path.name == BEST_HEAD_FILE
        found.append(_entry(path.parent.resolve().name if head else path.stem, path, checkpoint_kind(path),
                            path.parent, qualifier=None if head else path.parent.resolve().name))
    if not found:
        raise OptionError("no model given: pass --models DIR (repeatable) or --checkpoint FILE (repeatable).")
    names = unique_names([(name, qualifier) for name, qualifier, *_ in found])
    return [MemberSource(name, path, k, fold, root) for name, (_, _, path, k, fold, root) in zip(names, found,
                                                                                                 strict=True)]


def unique_names(candidates: Sequence[tuple[str, str]]) -> list[str]:
    """Readable unique names from ``(name, qualifier)`` (a folder's name): a name that repeats (or is reserved, see
    `RESERVED_NAMES`) takes its qualifier as a prefix, then a number if it still repeats."""
    bases = [name or "model" for name, _ in candidates]
    names = [f"{parent}_{name}" if bases.count(name) > 1 or name in RESERVED_NAMES else name
             for name, (_, parent) in zip(bases, candidates, strict=True)]
    out: list[str] = []
    for name in names:
        n, unique = 1, name
        while unique in out or unique in RESERVED_NAMES:
            n += 1
            unique = f"{name}_{n}"
        out.append(unique)
    return out


def describe(members: Sequence[Member], combine: Combine, *, device: Any) -> list[str]:
    """What `arena submit`/`evaluate` print about the members: one model as it always was, or the ensemble with one
    line per member and what it shares."""
    if len(members) == 1:
        m = members[0].model
        return [f"model: {m.kind} ({m.source}), {m.frames} frames ({m.frames_source}), TTA {len(m.variants)} "
                f"variant(s){_faces(m)}, temperature {m.temperature:.3f}, device {device}"]
    groups = decode_groups(members)
    passes = sum(len(encoder_groups(g)) for g in groups)
    what = "probabilities" if combine == "prob" else "logits"
    return [f"ensemble of {len(members)} members (mean of calibrated {what}), TTA "
            f"{len(members[0].model.variants)} variant(s), device {device}; {len(groups)} decode(s) and {passes} "
            "backbone pass(es) per video:", *[f"  {m.line()}" for m in members]]


# ----------------------------------------------------------------------------------------------------------------
# Sharing


def decode_settings(model: LoadedModel) -> tuple:
    """What a model's decoded views depend on: models with equal settings share one decode per video."""
    return (model.frames, tuple(model.variants), tuple(model.encoder.input_size),
            json.dumps(model.crop, sort_keys=True), model.max_faces)


def decode_groups(members: Sequence[Member]) -> list[list[Member]]:
    """Members grouped by `decode_settings`, in member order."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        groups.setdefault(decode_settings(m.model), []).append(m)
    return list(groups.values())


def encoder_groups(members: Sequence[Member]) -> list[list[Member]]:
    """Members grouped by encoder object (one backbone pass each), in member order."""
    groups: dict[int, list[Member]] = {}
    for m in members:
        groups.setdefault(id(m.model.encoder), []).append(m)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Combining


def mean_probability(p: Sequence[float], combine: Combine = "prob") -> float:
    """The mean of calibrated probabilities (``prob``), or the sigmoid of the mean of their logits (``logit``)."""
    if combine not in COMBINE_MODES:
        raise OptionError(f"Invalid ensemble mode ({combine}). Supported values are {', '.join(COMBINE_MODES)}.")
    x = np.asarray(p, dtype=np.float64)
    mean = x.mean() if combine == "prob" else expit(probs_to_logits(x).mean())
    return float(np.clip(mean, 0.0, 1.0))


def combine_predictions(by_member: Mapping[str, VideoPrediction], combine: Combine = "prob") -> VideoPrediction:
    """One video's ensemble prediction from its members' (one member: its prediction, unchanged).

    P(fake), P(fake) at T = 1 and each TTA variant's P(fake) are combined over the members that predicted the
    video; a member that failed on it (its 0.5 is no prediction) is left out and its error kept. The frames,
    attention and face boxes are the first such member's; per-track P(fake) are left to the members.
    """
    preds = list(by_member.values())
    if len(preds) == 1:
        return preds[0]
    errors = {name: p.error for name, p in by_member.items() if p.error}
    error = next(iter(errors.values())) if len(set(errors.values())) == 1 else "; ".join(
        f"{name}: {e}" for name, e in errors.items())
    ok = [p for p in preds if p.status != "failed"]
    if not ok:
        return failed_prediction(preds[0].key, label=preds[0].label, frames=preds[0].frames_requested,
                                 fallback=preds[0].fallback, error=error)
    base = ok[0]
    return dataclasses.replace(
        base,
        p_fake=mean_probability([p.p_fake for p in ok], combine),
        p_uncalibrated=mean_probability([p.p_uncalibrated for p in ok], combine),
        variant_p={v: mean_probability([p.variant_p[v] for p in ok], combine)
                   for v in base.variant_p if all(v in p.variant_p for p in ok)},
        fallback=next((p.fallback for p in preds if p.fallback != "none"), "none"),
        status="partial" if any(p.status == "partial" for p in ok) else "ok",
        error=error, features=None, track_p=[])


# ----------------------------------------------------------------------------------------------------------------
# Predicting


@dataclass
class EnsembleRun(PredictRun):
    """`PredictRun` of the ensemble's predictions, plus every member's and what was shared.

    Attributes:
        members: the members, in order. by_member: each member's predictions (input order).
        decodes / passes: decodes and backbone passes per video.
    """

    members: list[Member] = field(default_factory=list)
    by_member: dict[str, list[VideoPrediction]] = field(default_factory=dict)
    decodes: int = 1
    passes: int = 1

    def summary_lines(self) -> list[str]:
        lines = super().summary_lines()
        if len(self.members) > 1:
            lines.insert(1, f"  {len(self.members)} members: {self.decodes} decode(s) and {self.passes} backbone "
                            "pass(es) per video")
        return lines


def predict_members(
    items: Sequence,
    members: Sequence[Member],
    *,
    combine: Combine = "prob",
    device: torch.device | str = "cpu",
    workers: int = 2,
    frame_batch: int = 64,
    precision: Precision = "auto",
    keep_features: Sequence[str] = (),
    progress: bool = True,
    desc: str = "predict",
    decoder: str = "cpu",
    views_on: str = "cpu",
) -> EnsembleRun:
    """Every member's prediction of every item, and the ensemble's (`combine_predictions`), sharing decodes and
    backbone passes (`decode_groups`, `encoder_groups`).

    Args:
        items, device, workers, frame_batch, precision, progress, desc: as `arena.predict.predict_items`.
        members: from `member_sources` + `arena.predict.load_model`.
        combine: ``prob`` or ``logit`` (`mean_probability`).
        keep_features: names of the members whose features are kept (verification of a fine-tuned member).
        decoder, views_on: how every member's videos are decoded and where the TTA views are made
            (`arena.predict.decoded_clips`).
    """
    if combine not in COMBINE_MODES:
        raise OptionError(f"Invalid ensemble mode ({combine}). Supported values are {', '.join(COMBINE_MODES)}.")
    if not members:
        raise OptionError("an ensemble needs at least one member.")
    dev, items = torch.device(device) if isinstance(device, str) else device, list(items)
    by_member: dict[str, list[VideoPrediction]] = {m.name: [] for m in members}
    groups = decode_groups(members)
    decoding = {"decoder": decoder, "views_on": views_on}
    plans = [[(g, Predictor([m.model for m in g], device=dev, frame_batch=frame_batch, precision=precision,
                            keep_features=[m.name in keep_features for m in g], **decoding))
              for g in encoder_groups(group)] for group in groups]
    t0 = time.perf_counter()
    bar = tqdm(total=len(items) * len(groups), desc=desc, unit="video", dynamic_ncols=True, disable=not progress)
    for group, plan in zip(groups, plans, strict=True):
        for item, clip in decoded_clips(items, group[0].model, device=dev, workers=workers, **decoding):
            for g, predictor in plan:
                for m, pred in zip(g, predictor(clip, item), strict=True):
                    by_member[m.name].append(pred)
            bar.update(1)
    bar.close()
    combined = [combine_predictions({m.name: by_member[m.name][i] for m in members}, combine)
                for i in range(len(items))]
    return EnsembleRun(combined, time.perf_counter() - t0, sum(p.frames_encoded for plan in plans for _, p in plan),
                       members=list(members), by_member=by_member, decodes=len(groups),
                       passes=sum(len(plan) for plan in plans))
