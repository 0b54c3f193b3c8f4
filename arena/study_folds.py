"""What a cross-validated (K-fold) `arena tune-head` study leaves behind: the fold heads, one temperature fitted
out of fold, the out-of-fold predictions and their metrics.

* ``<models>/folds/fold_<i>/best_head.pt`` (`arena.models_folder.fold_dir`): fold i's head at its best epoch, as a
  `HeadCheckpoint` whose ``metrics`` are its own fold's, with ``fold`` and ``folds``; ``train-full --fold i`` starts
  from it, ``submit``/``evaluate`` average the fold heads (`arena.ensemble`).
* One temperature for all K heads, fitted on the out-of-fold logit differences in every TTA view of the cache
  (every video scored by the head that did not train on it, so no head's own training videos flatter it), stored
  in every fold head with ``fitted_on="out-of-fold"`` and the ``views``. The submission averages the views' P(fake),
  which is softer than one view's, so the temperature is fitted on that mean: fitted on the original view alone it
  sharpened or softened a quantity the submission never outputs (measured on the demo's recipe dataset,
  README: "Calibration").
* ``<models>/oof_predictions.csv``: key, label, fold, p_fake (uncalibrated), p_fake_calibrated, both the TTA mean
  (what ``submit`` would write for the video).
* The OOF metrics, returned for ``study_summary.json``: AUC, log loss and ECE of the TTA mean before and after the
  temperature (``objective_log_loss``: the study's objective, on the validation views), and every fold's AUC and
  log loss.

The parent folder gets no ``best_head.pt`` of its own: a K-fold models folder without a model is the fold ensemble
for ``submit``/``evaluate``. A parent head left there by an earlier holdout study is removed, since those commands
would otherwise use it instead of the fold heads just written, and so are the heads of folds ``>= K`` left by a
split with more folds (they would join the ensemble).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arena import metrics
from arena._files import atomic_write_text
from arena.calibration import apply_temperature, expected_calibration_error, fit_calibration
from arena.cv_heads import FoldsResult
from arena.head_data import FoldData
from arena.models_folder import BEST_HEAD_FILE, FOLD_PREFIX, OOF_FILE, HeadCheckpoint, fold_dir, fold_dirs

#: The ``objective`` of a study's summary and context: out-of-fold log loss (K folds) or holdout validation.
OOF_OBJECTIVE = "oof_log_loss"
HOLDOUT_OBJECTIVE = "val_log_loss"
OOF_COLUMNS = ("key", "label", "fold", "p_fake", "p_fake_calibrated")


@torch.no_grad()
def view_logits(head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
                views: tuple[int, ...] | None = None) -> np.ndarray:
    """Logit differences (fake - real) ``[M, W]`` of ``head`` on cached features ``x`` ``[M, V, K, d]`` (``mask``
    ``[M, K]``), per view (``views``: indices along ``V``; None: all), in float32 on raw features (the submission
    path), 256 videos at a time; float64 numpy, what `arena.calibration` fits a temperature on."""
    views = tuple(range(x.shape[1])) if views is None else views
    out = [torch.stack([head(x[i:i + 256, v], mask[i:i + 256])[0].float().diff(dim=-1)[:, 0] for v in views], dim=1)
           for i in range(0, x.shape[0], 256)]
    return torch.cat(out).double().cpu().numpy()


def fold_logits(ckpt: HeadCheckpoint, data: FoldData, fold: int,
                views: tuple[int, ...] | None = None) -> np.ndarray:
    """`view_logits` of fold ``fold``'s videos by its head (``views`` None: every TTA view, what the submission
    averages)."""
    rows = data.val_rows(fold).to(data.x.device)
    return view_logits(ckpt.build().to(data.x.device), data.x[rows], data.mask[rows], views)


def _oof_csv(data: FoldData, p: np.ndarray, p_cal: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(OOF_COLUMNS)
    v = data.videos  # the split's videos; the pseudo-fake rows after them are never validated
    for key, label, fold, a, b in zip(data.keys[:v], data.y[:v].tolist(), data.fold[:v].tolist(), p, p_cal,
                                      strict=True):
        writer.writerow([key, label, fold, f"{a:.8f}", f"{b:.8f}"])
    return buf.getvalue()


def write_fold_outputs(result: FoldsResult, data: FoldData, models: Path, *,
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """Write every fold's ``best_head.pt``, the OOF temperature and ``oof_predictions.csv``; return the OOF metrics
    (the ``cv`` section of ``study_summary.json``)."""
    ckpts, z = [], np.empty((data.videos, len(data.variants)))
    for i, fold in enumerate(result.folds):
        ckpts.append(HeadCheckpoint(config=fold.head_config, state_dict=fold.state_dict, frames=data.frames,
                                    params=result.params.to_dict(), provenance=provenance,
                                    metrics={**fold.metrics, "fold": i, "folds": data.folds,
                                             "oof_log_loss": result.value}))
        z[data.val_rows(i).numpy()] = fold_logits(ckpts[-1], data, i)
    y = data.y[:data.videos].cpu().numpy()
    calibration = {**fit_calibration(z, y, fitted_on="out-of-fold"), "views": list(data.variants)}
    p, p_cal = apply_temperature(z, 1.0), apply_temperature(z, calibration["temperature"])
    paths = []
    for i, ckpt in enumerate(ckpts):
        ckpt.calibration = calibration
        paths.append(str(ckpt.save(fold_dir(models, i) / BEST_HEAD_FILE)))
    atomic_write_text(models / OOF_FILE, _oof_csv(data, p, p_cal))
    stale = [models / BEST_HEAD_FILE] + [d / BEST_HEAD_FILE for d in fold_dirs(models)
                                          if int(d.name[len(FOLD_PREFIX):]) >= data.folds]
    removed = [str(path) for path in stale if path.is_file()]
    for path in removed:
        Path(path).unlink()
    oof = metrics.summary(y, p)
    return {
        "folds": data.folds,
        "oof": {"n": oof["n"], "auc": oof["auc"], "accuracy": oof["accuracy"], "f1": oof["f1"],
                "views": list(data.variants), "objective_log_loss": result.value,
                "log_loss": calibration["log_loss_before"], "log_loss_calibrated": calibration["log_loss_after"],
                "ece": expected_calibration_error(y, p), "ece_calibrated": expected_calibration_error(y, p_cal)},
        "per_fold": [{"fold": i, "n": r.metrics["n"], "auc": r.metrics["auc"], "log_loss": r.val_loss,
                      "best_epoch": r.best_epoch, "epochs_run": r.epochs_run} for i, r in enumerate(result.folds)],
        "calibration": calibration,
        "fold_heads": paths,
        "oof_file": str(models / OOF_FILE),
        "removed": removed,
    }
