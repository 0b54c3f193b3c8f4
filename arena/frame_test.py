"""`arena frame-test`: which frame count to use, judged by the tuned head's validation log loss.

One head per cached frame count is trained with the tuned parameters and the study's seed and training settings,
so the counts differ only in the frames the head sees. ``frame_test.json`` then feeds every later stage's frame
count (``arena.models_folder.resolve_frames``).

On a K-fold split (when the study was cross-validated, or with ``cv=True``) each frame count is judged by the
out-of-fold log loss of its K fold heads (trained together, `arena.cv_heads`), and the result goes into the parent
folder's ``frame_test.json`` and every fold folder's, so every member of the fold ensemble reads the same count.
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
from arena.cv_heads import train_folds
from arena.errors import ModelsError, OptionError
from arena.head_data import HeadDataStore, open_head_data
from arena.head_train import HeadParams, HeadTrainConfig, train_head
from arena.models_folder import BEST_PARAMS_FILE, FRAME_TEST_FILE, STUDY_SUMMARY_FILE, fold_dir
from arena.study_folds import HOLDOUT_OBJECTIVE, OOF_OBJECTIVE


def run_frame_test(store: HeadDataStore, params: HeadParams, *, config: HeadTrainConfig = HeadTrainConfig(),
                   frames: Sequence[int] | None = None, progress: bool = True, cv: bool = False) -> dict[str, Any]:
    """Train a head per frame count with ``params`` (same seed) and compare them on the validation split, or, with
    ``cv``, the K fold heads per frame count compared by their out-of-fold log loss.

    Returns:
        ``recommended_frames`` (lowest validation or OOF log loss; ties go to fewer frames, cheaper at submission),
        the per-count ``results``, and ``seed_criterion_pick`` (the seed notebook's highest mean confidence).
    """
    counts = store.check_frames(frames or store.frame_counts)
    results: dict[str, Any] = {}
    for k in tqdm(counts, desc="frame-test", unit="k", disable=not progress):
        at_k = dataclasses.replace(params, frames=k)
        if cv:
            folds = train_folds(at_k, store.get_folds(k), config=config)
            m, extra = folds.metrics, {"best_epochs": folds.best_epochs,
                                       "fold_log_loss": [r.val_loss for r in folds.folds]}
        else:
            res = train_head(at_k, store.get(k), config=config)
            m, extra = res.metrics, {"best_epoch": res.best_epoch}
        results[str(k)] = {"auc": m["auc"], "log_loss": m["log_loss"], "accuracy": m["accuracy"], "f1": m["f1"],
                           "mean_confidence": m["mean_confidence"], **extra, "n_val": m["n"]}
    best = min(counts, key=lambda k: (results[str(k)]["log_loss"], k))
    by_conf = max(counts, key=lambda k: (results[str(k)]["mean_confidence"], -k))
    return {"recommended_frames": int(best), "criterion": OOF_OBJECTIVE if cv else HOLDOUT_OBJECTIVE,
            "results": results, "seed_criterion_pick": int(by_conf), "params": params.to_dict(),
            "train_config": dataclasses.asdict(config), **({"folds": store.folds} if cv else {})}


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
    stored = _study_summary(models).get("train_config", {})
    try:
        config = HeadTrainConfig.from_dict(stored)
    except (ValueError, TypeError) as exc:
        raise ModelsError(f"{models / STUDY_SUMMARY_FILE}: train_config is not valid ({exc}); rerun "
                          "`arena tune-head`.") from exc
    return params, config


def _study_summary(models: Path) -> dict[str, Any]:
    path = models / STUDY_SUMMARY_FILE
    return _read_json(path) if path.is_file() else {}


def frame_test(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
               frames: Sequence[int] | None = None, seed: int | None = None, epochs: int | None = None,
               patience: int | None = None, device: str = "auto", progress: bool = True,
               cv: bool | None = None) -> dict[str, Any]:
    """``arena frame-test``: compare the cache's frame counts with the tuned head parameters; write frame_test.json.

    The training settings default to those of the study (``study_summary.json``); ``seed``, ``epochs`` and
    ``patience`` override them. ``cv`` (None: when the split has K > 1 folds and the study was not a holdout study)
    compares the counts by the out-of-fold log loss and writes ``frame_test.json`` into every fold folder too.
    The heads train on the cache's pseudo-fake items when the study's did (``study_summary.json``).

    Raises:
        OptionError: ``cv=True`` on a split of one fold.
    """
    models = Path(models_dir)
    params, base = study_settings(models)
    config = dataclasses.replace(base, **{k: v for k, v in (("seed", seed), ("max_epochs", epochs),
                                                          ("patience", patience)) if v is not None})
    pseudo = bool(_study_summary(models).get("pseudo_fakes"))
    store, split = open_head_data(cache_path, data_root, models, device=device, pseudo=pseudo)
    if cv and split.folds == 1:
        raise OptionError(f"--cv: {split.path} holds one holdout, not folds; make K folds with `arena split "
                          "--folds K --new-split`, or drop --cv.")
    if cv is None:
        cv = split.folds > 1 and _study_summary(models).get("objective") != HOLDOUT_OBJECTIVE
    out = run_frame_test(store, params, config=config, frames=frames, progress=progress, cv=cv)
    out.update({"cache": str(cache_path), "split_sha256": split.sha256, "pseudo_fakes": pseudo})
    targets = [(models, out)] + [(fold_dir(models, i), {**out, "fold": i}) for i in range(split.folds if cv else 0)]
    for folder, doc in targets:
        try:
            atomic_write_text(folder / FRAME_TEST_FILE, json.dumps(doc, indent=1))
        except OSError as exc:
            raise ModelsError(f"{folder / FRAME_TEST_FILE}: cannot be written ({exc}); fix the folder and "
                              "rerun.") from exc
    out["written"] = [str(folder / FRAME_TEST_FILE) for folder, _ in targets]
    return out
