"""Binary classification metrics on P(fake), shared by tuning, training, evaluation and submission checks.

Labels are 0 (real) / 1 (fake); scores are probabilities of class 1. The numbers are scikit-learn's (as in the seed
project), computed on float64 numpy arrays so they do not depend on torch's thread count or device; this module
adds the input checks, the log-loss clipping and AUC's one-class rule (None in `summary`, an error in `auc`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

# Probabilities are clipped to [EPS, 1 - EPS] before the log: one confident mistake then costs ~16 nats
# instead of inf, which keeps an Optuna objective finite (the same convention as common leaderboard scorers).
EPS = 1e-7


def _check(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y)
    p_arr = np.asarray(p, dtype=np.float64)
    if y_arr.ndim != 1 or p_arr.ndim != 1:
        raise ValueError(f"labels and probabilities must be 1-D; got shapes {y_arr.shape} and {p_arr.shape}.")
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"labels ({y_arr.shape[0]}) and probabilities ({p_arr.shape[0]}) differ in length.")
    if y_arr.size == 0:
        raise ValueError("metrics need at least one sample; got empty arrays.")
    if not np.isin(y_arr, (0, 1)).all():
        bad = np.unique(y_arr[~np.isin(y_arr, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (real) or 1 (fake); got {bad.tolist()}.")
    if not np.isfinite(p_arr).all():
        raise ValueError(f"probabilities contain {int((~np.isfinite(p_arr)).sum())} NaN/inf value(s).")
    if (p_arr < 0).any() or (p_arr > 1).any():
        raise ValueError(f"probabilities must lie in [0, 1]; got min {p_arr.min():.4g}, max {p_arr.max():.4g}.")
    return y_arr.astype(np.int64), p_arr


def auc(y: Any, p: Any) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; tied scores count one half).

    Raises:
        ValueError: only one class present (AUC is undefined), or invalid inputs.
    """
    y_arr, p_arr = _check(y, p)
    n_pos = int(y_arr.sum())
    n_neg = y_arr.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} fake and {n_neg} real sample(s).")
    return float(roc_auc_score(y_arr, p_arr))


def log_loss(y: Any, p: Any, *, eps: float = EPS) -> float:
    """Mean binary cross-entropy in nats (scikit-learn's ``log_loss``), probabilities clipped to ``[eps, 1 - eps]``."""
    y_arr, p_arr = _check(y, p)
    return float(sk_log_loss(y_arr, np.clip(p_arr, eps, 1.0 - eps), labels=[0, 1]))


def _predicted(p_arr: np.ndarray, threshold: float) -> np.ndarray:
    return (p_arr >= threshold).astype(np.int64)  # "fake" when p >= threshold


def confusion(y: Any, p: Any, *, threshold: float = 0.5) -> dict[str, int]:
    """Counts ``tn, fp, fn, tp`` (scikit-learn's ``confusion_matrix``) with "fake" predicted when ``p >= threshold``."""
    y_arr, p_arr = _check(y, p)
    tn, fp, fn, tp = confusion_matrix(y_arr, _predicted(p_arr, threshold), labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def accuracy(y: Any, p: Any, *, threshold: float = 0.5) -> float:
    """Share of samples whose thresholded prediction equals the label (scikit-learn's ``accuracy_score``)."""
    y_arr, p_arr = _check(y, p)
    return float(accuracy_score(y_arr, _predicted(p_arr, threshold)))


def f1(y: Any, p: Any, *, threshold: float = 0.5) -> float:
    """F1 of the fake class (scikit-learn's ``f1_score``); 0.0 when there is no true positive (also when nothing is
    fake)."""
    y_arr, p_arr = _check(y, p)
    return float(f1_score(y_arr, _predicted(p_arr, threshold), labels=[0, 1], pos_label=1, zero_division=0.0))


def mean_confidence(p: Any) -> float:
    """The seed's frame-count criterion: mean probability of the predicted class, ``mean(max(p, 1 - p))``.

    It needs no labels and rewards confident predictions whether right or wrong, which is why tuning and the
    frame-count test decide by validation log loss instead and only report this for comparison.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    _check(np.zeros(p_arr.shape, dtype=np.int64), p_arr)
    return float(np.mean(np.maximum(p_arr, 1.0 - p_arr)))


def summary(y: Any, p: Any, *, threshold: float = 0.5) -> dict[str, Any]:
    """All metrics in one JSON-able dict; ``auc`` is None when only one class is present."""
    y_arr, p_arr = _check(y, p)
    both = 0 < int(y_arr.sum()) < y_arr.size
    return {
        "n": int(y_arr.size),
        "auc": auc(y_arr, p_arr) if both else None,
        "log_loss": log_loss(y_arr, p_arr),
        "accuracy": accuracy(y_arr, p_arr, threshold=threshold),
        "f1": f1(y_arr, p_arr, threshold=threshold),
        "mean_confidence": mean_confidence(p_arr),
        "confusion": confusion(y_arr, p_arr, threshold=threshold),
    }
