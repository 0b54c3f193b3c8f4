"""Binary classification metrics on P(fake), shared by tuning, training, evaluation and submission checks.

Labels are 0 (real) / 1 (fake); scores are probabilities of class 1. Everything is plain numpy in float64 so
the numbers do not depend on torch's thread count or device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Raises:
        ValueError: only one class present (AUC is undefined), or invalid inputs.
    """
    y_arr, p_arr = _check(y, p)
    n_pos = int(y_arr.sum())
    n_neg = y_arr.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} fake and {n_neg} real sample(s).")
    order = np.argsort(p_arr, kind="mergesort")
    sorted_p = p_arr[order]
    ranks = np.empty(p_arr.size, dtype=np.float64)
    # Average rank (1-based) within each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], sorted_p.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y_arr == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(y: Any, p: Any, *, eps: float = EPS) -> float:
    """Mean binary cross-entropy in nats, with probabilities clipped to ``[eps, 1 - eps]``."""
    y_arr, p_arr = _check(y, p)
    q = np.clip(p_arr, eps, 1.0 - eps)
    return float(-np.mean(y_arr * np.log(q) + (1 - y_arr) * np.log1p(-q)))


def confusion(y: Any, p: Any, *, threshold: float = 0.5) -> dict[str, int]:
    """Counts ``tn, fp, fn, tp`` with "fake" predicted when ``p >= threshold``."""
    y_arr, p_arr = _check(y, p)
    pred = p_arr >= threshold
    pos = y_arr == 1
    return {"tn": int((~pred & ~pos).sum()), "fp": int((pred & ~pos).sum()),
            "fn": int((~pred & pos).sum()), "tp": int((pred & pos).sum())}


def accuracy(y: Any, p: Any, *, threshold: float = 0.5) -> float:
    """Share of samples whose thresholded prediction equals the label."""
    c = confusion(y, p, threshold=threshold)
    return (c["tp"] + c["tn"]) / sum(c.values())


def f1(y: Any, p: Any, *, threshold: float = 0.5) -> float:
    """F1 of the fake class (1); 0.0 when there is no true positive (also when nothing is fake)."""
    c = confusion(y, p, threshold=threshold)
    if c["tp"] == 0:
        return 0.0
    return 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])


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
