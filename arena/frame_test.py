"""`arena frame-test`: which frame count to use, judged by the tuned head's validation log loss.

One head per cached frame count is trained with the tuned parameters and the study's seed and training settings,
so the counts differ only in the frames the head sees. ``frame_test.json`` then feeds every later stage's frame
count (``arena.models_folder.resolve_frames``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from arena._files import atomic_write_text
from arena.errors import ModelsError
from arena.head_data import HeadDataStore, open_head_data
from arena.head_train import HeadParams, HeadTrainConfig, train_head
from arena.models_folder import BEST_PARAMS_FILE, FRAME_TEST_FILE, STUDY_SUMMARY_FILE


def run_frame_test(store: HeadDataStore, params: HeadParams, *, config: HeadTrainConfig = HeadTrainConfig(),
                   frames: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a head per frame count with ``params`` (same seed) and compare them on the validation split.

    Returns:
        ``recommended_frames`` (lowest validation log loss; ties go to fewer frames, cheaper at submission),
        the per-count ``results``, and ``seed_criterion_pick`` (the seed notebook's highest mean confidence).
    """
    counts = store.check_frames(frames or store.frame_counts)
    results: dict[str, Any] = {}
    for k in tqdm(counts, desc="frame-test", unit="k", disable=not progress):
        res = train_head(dataclasses.replace(params, frames=k), store.get(k), config=config)
        m = res.metrics
        results[str(k)] = {"auc": m["auc"], "log_loss": m["log_loss"], "accuracy": m["accuracy"], "f1": m["f1"],
                           "mean_confidence": m["mean_confidence"], "best_epoch": res.best_epoch, "n_val": m["n"]}
    best = min(counts, key=lambda k: (results[str(k)]["log_loss"], k))
    by_conf = max(counts, key=lambda k: (results[str(k)]["mean_confidence"], -k))
    return {"recommended_frames": int(best), "criterion": "val_log_loss", "results": results,
            "seed_criterion_pick": int(by_conf), "params": params.to_dict(), "train_config": dataclasses.asdict(config)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelsError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); rerun `arena tune-head`.") from exc
    if not isinstance(doc, dict):
        raise ModelsError(f"{path}: expected a JSON object, got {type(doc).__name__}; rerun `arena tune-head`.")
    return doc


def study_settings(models: Path) -> tuple[HeadParams, HeadTrainConfig]:
    """The tuned parameters (``best_head_params.json``) and the study's training settings (``study_summary.json``,
    defaults when it is absent).

    Raises:
        ModelsError: no parameter file, or a file that cannot be read as what tune-head writes.
    """
    params_path = models / BEST_PARAMS_FILE
    if not params_path.is_file():
        raise ModelsError(f"{params_path} does not exist; run `arena tune-head --models {models}` first.")
    try:
        params = HeadParams.from_dict(_read_json(params_path))
    except (ValueError, TypeError) as exc:
        raise ModelsError(f"{params_path}: not a valid parameter file ({exc}); rerun `arena tune-head`.") from exc
    summary_path = models / STUDY_SUMMARY_FILE
    stored = _read_json(summary_path).get("train_config", {}) if summary_path.is_file() else {}
    try:
        config = HeadTrainConfig.from_dict(stored)
    except (ValueError, TypeError) as exc:
        raise ModelsError(f"{summary_path}: train_config is not valid ({exc}); rerun `arena tune-head`.") from exc
    return params, config


def frame_test(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
               frames: Sequence[int] | None = None, seed: int | None = None, epochs: int | None = None,
               patience: int | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """``arena frame-test``: compare the cache's frame counts with the tuned head parameters; write frame_test.json.

    The training settings default to those of the study (``study_summary.json``); ``seed``, ``epochs`` and
    ``patience`` override them.
    """
    models = Path(models_dir)
    params, base = study_settings(models)
    config = dataclasses.replace(base, **{k: v for k, v in (("seed", seed), ("max_epochs", epochs),
                                                          ("patience", patience)) if v is not None})
    store, split = open_head_data(cache_path, data_root, models, device=device)
    out = run_frame_test(store, params, config=config, frames=frames, progress=progress)
    out.update({"cache": str(cache_path), "split_sha256": split.sha256})
    try:
        atomic_write_text(models / FRAME_TEST_FILE, json.dumps(out, indent=1))
    except OSError as exc:
        raise ModelsError(f"{models / FRAME_TEST_FILE}: cannot be written ({exc}); fix the folder and rerun.") from exc
    return out
