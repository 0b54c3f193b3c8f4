"""`arena evaluate`: video-level metrics with and without TTA on the validation split or a labelled test folder.

One pass of the full-video path (`arena.predict`) gives every TTA variant's P(fake), so the metrics with TTA
(mean over the variants) and without (``original`` alone) come from the same decoded frames. The same pass keeps
P(fake) at temperature 1 beside the calibrated one, so log loss, Brier score and calibration error are reported
before and after calibration (`arena.calibration`) with a reliability diagram (``reliability.png`` beside the
JSON). The result, and an optional attention report (`arena.attention`), go to ``evaluation.json``.

Several members (`arena.ensemble`): the metrics of the ensemble and of each member, and the mean of the members'
(the README's "fold ensemble vs single folds"). Fold members on ``--split val`` are scored out of fold: each fold's
validation videos by that fold's member only (the others trained on them), pooled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

from arena._files import atomic_write_text
from arena.attention import attention_report
from arena.calibration import calibration_metrics, reliability_diagram
from arena.csvfile import parse_label, read_csv_rows
from arena.data import VIDEO_EXTENSIONS, Dataset, VideoItem, load_dataset
from arena.ensemble import (
    COMBINE_MODES,
    Combine,
    Member,
    MemberSource,
    PathsArg,
    as_paths,
    describe,
    member_sources,
    predict_members,
)
from arena.errors import DataError, OptionError
from arena.metrics import summary
from arena.models_folder import ATTENTION_DIR, EVALUATION_FILE, FOLDS_DIR
from arena.predict import ModelKind, VideoPrediction, load_model
from arena.runtime import Precision, resolve_device
from arena.split import load_split

log = logging.getLogger(__name__)

RELIABILITY_FILE = "reliability.png"

def _name_to_key(name: str, known: set[str]) -> str | None:
    """The data layer's resolution of a CSV name to a key under ``test/`` (bare or relative, extension optional)."""
    norm = name.strip().replace("\\", "/")
    if not norm:
        return None
    norm = str(PurePosixPath(norm))
    candidates = [norm] if "/" in norm else [f"test/{norm}"]
    if not PurePosixPath(norm).suffix:
        candidates += [c + ext for c in candidates for ext in VIDEO_EXTENSIONS]
    return next((c for c in candidates if c in known), None)


def labelled_items(dataset: Dataset, labels_csv: str | Path) -> list[VideoItem]:
    """Test items with labels from a CSV such as the demo's ``test_labels.csv`` (evaluation only).

    Rows with an unknown label or a name that is not a usable test video are skipped with a warning.

    Raises:
        DataError: the CSV is missing or gives no usable labelled test video.
    """
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise DataError(f"{labels_csv}: labels file not found (the demo writes test_labels.csv beside test/).")
    by_key = {it.key: it for it in dataset.test}
    out, problems = [], []
    for line_no, name, raw in read_csv_rows(labels_csv, need_label=True):
        label = parse_label(raw)
        key = _name_to_key(name, set(by_key))
        if label is None:
            problems.append(f"row {line_no}: label {raw!r} is not 0/1/REAL/FAKE")
        elif key is None:
            problems.append(f"row {line_no}: {name!r} is not a usable test video")
        else:
            out.append(dataclasses.replace(by_key[key], label=label))
    if problems:
        log.warning("%s: %d rows skipped: %s", labels_csv, len(problems), "; ".join(problems[:5]))
    if not out:
        raise DataError(f"{labels_csv}: no labelled test video found ({'; '.join(problems[:3])}).")
    return out


def evaluation_metrics(predictions: Sequence[VideoPrediction]) -> dict[str, Any]:
    """Video-level metrics with TTA (mean over variants) and without (``original`` only), from one pass."""
    y = np.array([p.label for p in predictions], dtype=np.int64)
    p_tta = np.array([p.p_fake for p in predictions])
    p_orig = np.array([p.variant_p.get("original", p.p_fake) for p in predictions])
    out: dict[str, Any] = {"tta": summary(y, p_tta), "no_tta": summary(y, p_orig)}
    gain = {}
    for name in ("auc", "log_loss", "accuracy", "f1"):
        a, b = out["tta"][name], out["no_tta"][name]
        gain[name] = None if a is None or b is None else a - b
    out["tta_minus_no_tta"] = gain
    return out


def calibration_report(predictions: Sequence[VideoPrediction], temperature: float | dict[str, float]
                       ) -> dict[str, Any]:
    """Log loss, Brier score and ECE of the TTA P(fake) before (T = 1) and after calibration (``temperature``; an
    ensemble's: each member's, by name)."""
    y = np.array([p.label for p in predictions], dtype=np.int64)
    before = np.array([p.p_uncalibrated for p in predictions])
    after = np.array([p.p_fake for p in predictions])
    return {"temperature": temperature, "before": calibration_metrics(y, before),
            "after": calibration_metrics(y, after)}


def evaluate(
    *,
    data: str | Path,
    models: PathsArg = None,
    checkpoints: PathsArg = None,
    ensemble: Combine = "prob",
    split: Literal["val"] | None = "val",
    labels: str | Path | None = None,
    out: str | Path | None = None,
    attention: Sequence[str] = (),
    attention_first: int = 0,
    kind: ModelKind = "auto",
    frames: int | None = None,
    device: str = "auto",
    workers: int = 2,
    frame_batch: int = 64,
    precision: Precision = "auto",
    seed: int = 0,
    progress: bool = True,
    crop: str | None = None,
    max_faces: int | None = None,
    calibration: bool = True,
    echo: Callable[[str], None] | None = None,
    decoder: str = "cpu",
    views_on: str = "cpu",
) -> dict[str, Any]:
    """Metrics with and without TTA on the validation split or a labelled folder; writes ``evaluation.json``.

    Args:
        data: the data folder.
        models, checkpoints: the members (`arena.ensemble.member_sources`): models folder(s) (model, split file)
            and checkpoint file(s). Several: the ensemble's metrics, each member's and their mean.
        ensemble: how members are averaged (``prob`` or ``logit``).
        split: ``val``: the persisted validation split of the first member's folder (ignored when ``labels`` is
            given); fold members: out of fold, each fold's validation videos scored by its own member.
        labels: a CSV of test labels (e.g. the demo's ``test_labels.csv``): evaluate on the test videos instead.
        out: the JSON file (default ``evaluation.json`` in the first models folder, a ``folds`` folder's parent,
            else in the first checkpoint's folder); attention PNGs go to ``<out folder>/attention``.
        attention: keys to report attention for; ``attention_first`` adds the first N evaluated videos. An
            ensemble reports the attention of the member that scored the video (the first member, out of fold the
            fold's).
        kind, frames: which model and how many frames per video (`arena.predict.load_model`).
        device, workers, frame_batch, precision: how the full-video path runs (`arena.predict.predict_items`).
        seed: seeds torch.
        crop, max_faces: the crop mode check and the face tracks scored per video (`arena.predict.load_model`).
        calibration: apply each model's temperature (False: T = 1; "before" and "after" are then equal).
        echo: where an ensemble's member lines go (None: silent).
        decoder, views_on: how the videos are decoded and where the TTA views are made (`arena.clips.ClipDataset`).

    Raises:
        OptionError: neither a split nor labels, ``attention`` keys that are not evaluated, or fold members mixed
            with others on ``--split val``.
        DataError, ModelsError, PredictError: the data folder, split or a model cannot be used.
    """
    torch.manual_seed(seed)
    dev = resolve_device(device)
    if ensemble not in COMBINE_MODES:
        raise OptionError(f"Invalid ensemble mode ({ensemble}). Supported values are {', '.join(COMBINE_MODES)}.")
    sources = member_sources(models, checkpoints, kind=kind, echo=echo)
    owner: dict[str, str] | None = None  # out of fold: the member that scores each video
    if labels is not None:
        dataset = load_dataset(data)
        items, where = labelled_items(dataset, labels), f"labelled test videos ({labels})"
    elif split == "val":
        dataset = load_dataset(data, require_test=False)
        items, where, owner = _validation_items(dataset, sources)
    else:
        raise OptionError("evaluate needs --split val or --labels CSV.")
    unknown = [k for k in attention if k not in {it.key for it in items}]
    if unknown:
        raise OptionError(f"--attention keys not among the evaluated videos: {unknown[:5]} "
                          f"(e.g. {items[0].key!r}).")
    encoders: dict = {}  # heads tuned on one cache share its encoder
    members = [Member(s, load_model(s.path, kind=s.kind, frames=frames, tta=True, device=dev, crop=crop,
                                    max_faces=max_faces, calibration=calibration, encoders=encoders))
               for s in sources]
    single = len(members) == 1
    for line in [] if single or echo is None else describe(members, ensemble, device=dev):
        echo(line)
    opts = dict(combine=ensemble, device=dev, workers=workers, frame_batch=frame_batch, precision=precision,
                progress=progress, desc="evaluate", decoder=decoder, views_on=views_on)
    if owner is None:
        run = predict_members(items, members, **opts)
        preds, by_member, seconds = run.predictions, run.by_member, run.seconds
    else:  # items are the folds' videos in member order: each member predicts its own fold only
        runs = [predict_members([it for it in items if owner[it.key] == m.name], [m], **opts) for m in members]
        by_member = {m.name: r.predictions for m, r in zip(members, runs, strict=True)}
        preds, seconds = [p for r in runs for p in r.predictions], sum(r.seconds for r in runs)
    first = members[0].model
    temperature = first.temperature if single else {m.name: m.model.temperature for m in members}
    frame_counts = sorted({m.model.frames for m in members})
    result: dict[str, Any] = {
        "data": str(data), "on": where, "n": len(preds),
        "model": first.info if single else {"kind": "ensemble", "members": {m.name: m.model.info for m in members}},
        "frames": frame_counts[0] if len(frame_counts) == 1 else frame_counts,
        "frames_source": first.frames_source if single else {m.name: m.model.frames_source for m in members},
        "variants": list(first.variants),
        "failed": {p.key: p.error for p in preds if p.status == "failed"},
        "fallbacks": dict(Counter(p.fallback for p in preds if p.fallback != "none")), "seconds": round(seconds, 3),
        "metrics": evaluation_metrics(preds),
        "calibration": calibration_report(preds, temperature),
        "videos": [{"key": p.key, "label": p.label, "p_fake": round(p.p_fake, 6),
                    "p_uncalibrated": round(p.p_uncalibrated, 6),
                    "p_original": round(p.variant_p.get("original", p.p_fake), 6), "status": p.status,
                    **({} if p.faces_found is None else {"faces_found": p.faces_found,
                                                          "p_tracks": [round(x, 6) for x in p.track_p]})}
                   for p in preds],
    }
    if not single:
        result["ensemble"] = ensemble_report(members, by_member, result["metrics"]["tta"],
                                             combine="out-of-fold" if owner is not None else ensemble)
        for i, video in enumerate(result["videos"]):
            if owner is not None:
                video["member"] = owner[video["key"]]
            else:
                video["p_members"] = {name: round(ps[i].p_fake, 6) for name, ps in by_member.items()}
    out = Path(out) if out is not None else _default_out(models, checkpoints) / EVALUATION_FILE
    t_text = f"T = {first.temperature:.3f}" if single else f"ensemble of {len(members)}, each member's own T"
    result["calibration"]["png"] = str(reliability_diagram(
        [p.label for p in preds], [p.p_uncalibrated for p in preds], [p.p_fake for p in preds],
        out.parent / RELIABILITY_FILE, title=f"reliability: {len(preds)} videos, {t_text}"))
    chosen = list(dict.fromkeys([*attention, *[p.key for p in preds[: max(0, attention_first)]]]))
    if chosen:
        entries = {}
        for m in members:  # the member that scored each chosen video: the first one, out of fold the fold's own
            mine = {p.key: p for p in by_member[m.name]}
            keys = [k for k in chosen if (owner[k] == m.name if owner is not None else m is members[0])]
            if keys:
                report = attention_report([mine[k] for k in keys], items, m.model, out.parent / ATTENTION_DIR)
                entries.update({e["key"]: e if single else {**e, "member": m.name} for e in report})
        result["attention"] = [entries[k] for k in chosen]
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    result["path"] = str(out)
    return result


def _validation_items(dataset: Dataset, sources: Sequence[MemberSource]
                      ) -> tuple[list[VideoItem], str, dict[str, str] | None]:
    """The validation videos, where they come from and, for fold members, the member scoring each (out of fold)."""
    folds = [s.fold for s in sources]
    if all(f is None for f in folds):
        return load_split(dataset, sources[0].split_root).val, "validation split", None
    if any(f is None for f in folds):
        raise OptionError("--split val with fold members and other members: a fold member validates on its own "
                          "fold, the others on the split's validation videos, which fold members trained on. "
                          "Evaluate them apart, or all together with --labels CSV.")
    if len({s.split_root.resolve() for s in sources}) > 1:
        raise OptionError("--split val with the folds of different studies: out-of-fold evaluation needs one split "
                          f"({', '.join(sorted({str(s.split_root) for s in sources}))}); use --labels CSV.")
    repeated = sorted({f for f in folds if folds.count(f) > 1})
    if repeated:
        raise OptionError(f"--split val: several members are fold {repeated[0]}; out-of-fold evaluation scores each "
                          "fold's validation videos with that fold's one member.")
    split = load_split(dataset, sources[0].split_root)
    items, owner = [], {}
    for s in sources:
        val = split.fold(s.fold).val
        items += val
        owner.update({it.key: s.name for it in val})
    return items, f"out-of-fold validation ({len(sources)} of {split.folds} folds of {split.path})", owner


def _default_out(models: PathsArg, checkpoints: PathsArg) -> Path:
    """The folder of ``evaluation.json``: the first models folder (a ``folds`` folder's parent), else the first
    checkpoint's folder."""
    folders = as_paths(models)
    if folders:
        return folders[0].parent if folders[0].name == FOLDS_DIR else folders[0]
    return as_paths(checkpoints)[0].parent


def ensemble_report(members: Sequence[Member], by_member: dict[str, list[VideoPrediction]],
                    ensemble_tta: dict[str, Any], *, combine: str) -> dict[str, Any]:
    """Each member's metrics (on the videos it scored) and calibration, their mean, and the ensemble minus it."""
    rows = [{"name": m.name, "kind": m.model.kind, "source": str(m.model.source), "fold": m.source.fold,
             "frames": m.model.frames, "temperature": m.model.temperature, "n": len(by_member[m.name]),
             "metrics": evaluation_metrics(by_member[m.name]),
             "calibration": calibration_report(by_member[m.name], m.model.temperature)} for m in members]
    mean: dict[str, float | None] = {}
    for name in ("auc", "log_loss", "accuracy", "f1"):
        values = [r["metrics"]["tta"][name] for r in rows if r["metrics"]["tta"][name] is not None]
        mean[name] = float(np.mean(values)) if values else None
    gain = {name: None if mean[name] is None or ensemble_tta[name] is None else ensemble_tta[name] - mean[name]
            for name in mean}
    return {"combine": combine, "members": rows, "mean_member": mean, "ensemble_minus_mean_member": gain}


def metrics_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable table of `evaluate`'s metrics."""
    def fmt(x: float | None) -> str:
        return "  n/a " if x is None else f"{x:6.3f}"

    model = result["model"].get("kind")
    if model == "ensemble":
        combine = result["ensemble"]["combine"]
        model = f"ensemble of {len(result['ensemble']['members'])} ({combine})"
    lines = [f"evaluated {result['n']} videos ({result['on']}), {result['frames']} frames, "
             f"model {model}; {len(result['failed'])} failed"]
    lines.append(f"{'':8} {'AUC':>6} {'logloss':>7} {'acc':>6} {'F1':>6}  confusion (tn fp fn tp)")
    for name in ("tta", "no_tta"):
        m = result["metrics"][name]
        c = m["confusion"]
        lines.append(f"{name:8} {fmt(m['auc'])} {fmt(m['log_loss']):>7} {fmt(m['accuracy'])} {fmt(m['f1'])}  "
                     f"{c['tn']} {c['fp']} {c['fn']} {c['tp']}")
    g = result["metrics"]["tta_minus_no_tta"]
    lines.append(f"TTA gain: AUC {fmt(g['auc'])}, log loss {fmt(g['log_loss'])} (negative is better)")
    cal = result.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        t = cal["temperature"]
        lines.append(f"calibration ({'each member its own T' if isinstance(t, dict) else f'T = {t:.3f}'}): log loss "
                     f"{b['log_loss']:.4f} -> {a['log_loss']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}, "
                     f"ECE {b['ece']:.4f} -> {a['ece']:.4f}")
    ens = result.get("ensemble")
    if ens:
        pooled = "out-of-fold" if ens["combine"] == "out-of-fold" else "ensemble"
        lines.append(f"members (TTA)        {'AUC':>6} {'logloss':>7} {'acc':>6}  videos  T")
        for r in ens["members"]:
            m = r["metrics"]["tta"]
            lines.append(f"  {r['name'][:18]:18} {fmt(m['auc'])} {fmt(m['log_loss']):>7} {fmt(m['accuracy'])}  "
                         f"{r['n']:6}  {r['temperature']:.3f}")
        mean, whole, gain = ens["mean_member"], result["metrics"]["tta"], ens["ensemble_minus_mean_member"]
        lines.append(f"  {'mean of members':18} {fmt(mean['auc'])} {fmt(mean['log_loss']):>7} {fmt(mean['accuracy'])}")
        lines.append(f"  {pooled:18} {fmt(whole['auc'])} {fmt(whole['log_loss']):>7} {fmt(whole['accuracy'])}  "
                     f"({pooled} - mean: AUC {fmt(gain['auc']).strip()}, log loss {fmt(gain['log_loss']).strip()})")
    for entry in result.get("attention", []):
        lines.append(f"attention {entry['key']}: {entry.get('png', entry.get('error', ''))}")
    lines.append(f"wrote {result['path']}")
    return lines
