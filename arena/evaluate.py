"""`arena evaluate`: video-level metrics with and without TTA on the validation split or a labelled test folder.

One pass of the full-video path (`arena.predict`) gives every TTA variant's P(fake), so the metrics with TTA
(mean over the variants) and without (``original`` alone) come from the same decoded frames. The same pass keeps
P(fake) at temperature 1 beside the calibrated one, so log loss, Brier score and calibration error are reported
before and after calibration (`arena.calibration`) with a reliability diagram (``reliability.png`` beside the
JSON). The result, and an optional attention report (`arena.attention`), go to ``evaluation.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

from arena._files import atomic_write_text
from arena.attention import attention_report
from arena.calibration import calibration_metrics, reliability_diagram
from arena.csvfile import parse_label, read_csv_rows
from arena.data import VIDEO_EXTENSIONS, Dataset, VideoItem, load_dataset
from arena.errors import DataError, OptionError
from arena.metrics import summary
from arena.models_folder import ATTENTION_DIR, EVALUATION_FILE
from arena.predict import ModelKind, VideoPrediction, load_model, predict_items
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


def calibration_report(predictions: Sequence[VideoPrediction], temperature: float) -> dict[str, Any]:
    """Log loss, Brier score and ECE of the TTA P(fake) before (T = 1) and after calibration (``temperature``)."""
    y = np.array([p.label for p in predictions], dtype=np.int64)
    before = np.array([p.p_uncalibrated for p in predictions])
    after = np.array([p.p_fake for p in predictions])
    return {"temperature": temperature, "before": calibration_metrics(y, before),
            "after": calibration_metrics(y, after)}


def evaluate(
    *,
    data: str | Path,
    models: str | Path,
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
) -> dict[str, Any]:
    """Metrics with and without TTA on the validation split or a labelled folder; writes ``evaluation.json``.

    Args:
        data: the data folder.
        models: the models folder (model, split file).
        split: ``val``: the persisted validation split (ignored when ``labels`` is given).
        labels: a CSV of test labels (e.g. the demo's ``test_labels.csv``): evaluate on the test videos instead.
        out: the JSON file (default ``<models>/evaluation.json``); attention PNGs go to ``<out folder>/attention``.
        attention: keys to report attention for; ``attention_first`` adds the first N evaluated videos.
        kind, frames: which model and how many frames per video (`arena.predict.load_model`).
        device, workers, frame_batch, precision: how the full-video path runs (`arena.predict.predict_items`).
        seed: seeds torch.
        crop, max_faces: the crop mode check and the face tracks scored per video (`arena.predict.load_model`).
        calibration: apply the model's temperature (False: T = 1; "before" and "after" are then equal).

    Raises:
        OptionError: neither a split nor labels, or ``attention`` keys that are not evaluated.
        DataError, ModelsError, PredictError: the data folder, split or model cannot be used.
    """
    torch.manual_seed(seed)
    dev = resolve_device(device)
    if labels is not None:
        dataset = load_dataset(data)
        items, where = labelled_items(dataset, labels), f"labelled test videos ({labels})"
    elif split == "val":
        dataset = load_dataset(data, require_test=False)
        items, where = load_split(dataset, models).val, "validation split"
    else:
        raise OptionError("evaluate needs --split val or --labels CSV.")
    unknown = [k for k in attention if k not in {it.key for it in items}]
    if unknown:
        raise OptionError(f"--attention keys not among the evaluated videos: {unknown[:5]} "
                          f"(e.g. {items[0].key!r}).")
    model = load_model(models, kind=kind, frames=frames, tta=True, device=dev, crop=crop, max_faces=max_faces,
                       calibration=calibration)
    run = predict_items(items, model, device=dev, workers=workers, frame_batch=frame_batch, precision=precision,
                        progress=progress, desc="evaluate")
    preds = run.predictions
    result: dict[str, Any] = {
        "data": str(data), "on": where, "n": len(preds), "model": model.info, "frames": model.frames,
        "frames_source": model.frames_source, "variants": list(model.variants),
        "failed": {p.key: p.error for p in preds if p.status == "failed"},
        "fallbacks": dict(run.fallbacks), "seconds": round(run.seconds, 3),
        "metrics": evaluation_metrics(preds),
        "calibration": calibration_report(preds, model.temperature),
        "videos": [{"key": p.key, "label": p.label, "p_fake": round(p.p_fake, 6),
                    "p_uncalibrated": round(p.p_uncalibrated, 6),
                    "p_original": round(p.variant_p.get("original", p.p_fake), 6), "status": p.status,
                    **({} if p.faces_found is None else {"faces_found": p.faces_found,
                                                          "p_tracks": [round(x, 6) for x in p.track_p]})}
                   for p in preds],
    }
    out = Path(out) if out is not None else Path(models) / EVALUATION_FILE
    result["calibration"]["png"] = str(reliability_diagram(
        [p.label for p in preds], [p.p_uncalibrated for p in preds], [p.p_fake for p in preds],
        out.parent / RELIABILITY_FILE, title=f"reliability: {len(preds)} videos, T = {model.temperature:.3f}"))
    chosen = list(dict.fromkeys([*attention, *[p.key for p in preds[: max(0, attention_first)]]]))
    if chosen:
        by_key = {p.key: p for p in preds}
        result["attention"] = attention_report([by_key[k] for k in chosen], items, model, out.parent / ATTENTION_DIR)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    result["path"] = str(out)
    return result


def metrics_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable table of `evaluate`'s metrics."""
    def fmt(x: float | None) -> str:
        return "  n/a " if x is None else f"{x:6.3f}"

    lines = [f"evaluated {result['n']} videos ({result['on']}), {result['frames']} frames, "
             f"model {result['model'].get('kind')}; {len(result['failed'])} failed"]
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
        lines.append(f"calibration (T = {cal['temperature']:.3f}): log loss {b['log_loss']:.4f} -> "
                     f"{a['log_loss']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}, "
                     f"ECE {b['ece']:.4f} -> {a['ece']:.4f}")
    for entry in result.get("attention", []):
        lines.append(f"attention {entry['key']}: {entry.get('png', entry.get('error', ''))}")
    lines.append(f"wrote {result['path']}")
    return lines
