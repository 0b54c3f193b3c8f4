"""Calibration: temperature scaling of the head's 2-class logits, and the numbers that say whether it helped.

The head outputs two logits; P(fake) is their softmax, i.e. ``sigmoid(z)`` of the logit difference
``z = logit_fake - logit_real``. Temperature scaling divides the logits by one number ``T`` fitted on validation
predictions (Guo et al., 2017): ``T > 1`` softens an over-confident model, ``T < 1`` sharpens a timid one, and the
ranking (AUC, accuracy at 0.5) does not change. Only the log loss, the Brier score and the calibration error do.

Logits here are logit *differences* ``z``, shape ``[N]`` or ``[N, V]`` (V TTA views): with views, the calibrated
P(fake) is the mean over views of ``sigmoid(z / T)``, exactly what the submission computes, so ``T`` is fitted on
the quantity it will be applied to.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import brier_score_loss

from arena._files import atomic_write
from arena.metrics import EPS, log_loss

#: The search range of ``log T``: T in [e^-4, e^4] ~ [0.018, 55], wide enough for any head, bounded so that a
#: separable validation set cannot drive T to 0.
LOG_T_BOUNDS = (-4.0, 4.0)
ECE_BINS = 15


def clip_probabilities(p: Any, eps: float) -> np.ndarray:
    """``p`` clipped to ``[eps, 1 - eps]``: one confident mistake then costs at most ``-log(eps)`` on a log-loss
    leaderboard.

    Raises:
        ValueError: ``eps`` outside ``[0, 0.5)``.
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"the clip epsilon must be in [0, 0.5), got {eps}.")
    return np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)


def probs_to_logits(p: Any) -> np.ndarray:
    """The logit difference ``log(p / (1 - p))`` of a 2-class softmax's P(fake) (clipped to ``[EPS, 1 - EPS]``)."""
    q = clip_probabilities(p, EPS)
    return np.log(q) - np.log1p(-q)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """P(fake) of logit differences ``[N]`` or ``[N, V]`` scaled by ``1 / temperature`` (mean over the V views)."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be > 0, got {temperature}.")
    z = np.asarray(logits, dtype=np.float64)
    p = expit(z / float(temperature))
    return p.mean(axis=1) if p.ndim == 2 else p


def fit_temperature(logits: Any, y: Any) -> float:
    """The temperature minimising the log loss of ``apply_temperature(logits, T)`` against ``y``.

    A bounded 1-D search on ``log T`` (scipy's ``minimize_scalar``): the log loss is smooth in ``log T`` and the
    bounds keep T finite on separable data.

    Raises:
        ValueError: no sample, a label other than 0/1, only one class present, every prediction already on the
            right side of 0.5, or an optimum at the search bound -- in each case the data cannot identify T.
    """
    z = np.asarray(logits, dtype=np.float64)
    y_arr = np.asarray(y)
    if z.ndim not in (1, 2) or z.shape[0] != y_arr.shape[0] or z.shape[0] == 0:
        raise ValueError(f"logits must be [N] or [N, V] with N = len(y) > 0; got {z.shape} and {y_arr.shape}.")
    if len(np.unique(y_arr)) < 2:
        raise ValueError(f"fitting a temperature needs both classes; got only label {np.unique(y_arr).tolist()}.")
    right = np.where((y_arr == 1).reshape(-1, *([1] * (z.ndim - 1))), z > 0, z < 0)
    if right.all():
        # Every prediction on its side of 0.5: the log loss keeps falling as T -> 0, so the data cannot say how
        # confident the model should be, and the bound would be "fitted" (measured on the demo's fine-tuned model:
        # T = 0.018 on 60 separated validation videos turned a held-out log loss of 0.04 into 0.40).
        raise ValueError(f"all {y_arr.size} validation predictions are on the right side of 0.5, so no temperature "
                         "can be fitted (the log loss falls without end as T -> 0)")
    res = minimize_scalar(lambda t: log_loss(y_arr, apply_temperature(z, math.exp(t))), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    if min(abs(res.x - b) for b in LOG_T_BOUNDS) < 0.05:
        raise ValueError(f"the best temperature lies at the search bound (T = {math.exp(res.x):.3g}): the "
                         "validation predictions cannot pin it down")
    return float(math.exp(res.x))


def fit_calibration(logits: Any, y: Any, *, fitted_on: str = "validation") -> dict[str, Any]:
    """`fit_temperature` plus what a checkpoint stores about it (the ``calibration`` dict).

    Keys: ``temperature``, ``fitted_on``, ``videos``, ``log_loss_before``, ``log_loss_after``. When the data cannot
    identify a temperature (one class only, perfectly separated predictions, an optimum at the bound) the
    temperature stays 1 and ``skipped`` says why (a checkpoint still records that calibration was tried).
    """
    z = np.asarray(logits, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.int64)
    before = log_loss(y_arr, apply_temperature(z, 1.0))
    out: dict[str, Any] = {"temperature": 1.0, "fitted_on": fitted_on, "videos": int(y_arr.size),
                           "log_loss_before": before, "log_loss_after": before}
    try:
        t = fit_temperature(z, y_arr)
    except ValueError as exc:
        return {**out, "skipped": str(exc)}
    return {**out, "temperature": t, "log_loss_after": log_loss(y_arr, apply_temperature(z, t))}


def temperature_of(calibration: dict[str, Any] | None) -> float:
    """The temperature a checkpoint's ``calibration`` dict holds; 1 (no scaling) when it has none."""
    return float((calibration or {}).get("temperature", 1.0))


def expected_calibration_error(y: Any, p: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(fake): ``sum_b n_b / N * |mean(y_b) - mean(p_b)|``.

    The ``bins`` bins are equal-width on [0, 1] (the last one closed); empty bins count nothing. It is the binary,
    class-1 form (the reliability diagram of P(fake)), not the top-label form.
    """
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = np.asarray(p, dtype=np.float64)
    if y_arr.shape != p_arr.shape or y_arr.size == 0:
        raise ValueError(f"labels {y_arr.shape} and probabilities {p_arr.shape} must be equal, non-empty 1-D arrays.")
    idx = np.minimum((p_arr * bins).astype(np.int64), bins - 1)
    err = 0.0
    for b in np.unique(idx):
        sel = idx == b
        err += sel.sum() / y_arr.size * abs(y_arr[sel].mean() - p_arr[sel].mean())
    return float(err)


def brier(y: Any, p: Any) -> float:
    """Brier score: mean squared difference between P(fake) and the 0/1 label (scikit-learn's)."""
    return float(brier_score_loss(np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64), pos_label=1))


def calibration_metrics(y: Any, p: Any, *, bins: int = ECE_BINS) -> dict[str, float]:
    """Log loss, Brier score and ECE of one set of probabilities."""
    return {"log_loss": log_loss(y, p), "brier": brier(y, p), "ece": expected_calibration_error(y, p, bins)}


def _curve(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    used = np.unique(idx)
    return (np.array([p[idx == b].mean() for b in used]), np.array([y[idx == b].mean() for b in used]))


def reliability_diagram(y: Any, p_before: Any, p_after: Any, path: str | os.PathLike, *,
                        bins: int = ECE_BINS, title: str = "") -> Path:
    """Draw the reliability diagram (fraction fake against mean P(fake) per bin) before and after calibration.

    Written atomically as a PNG; returns the path.
    """
    import matplotlib  # optional and slow to import: only when the diagram is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_arr = np.asarray(y, dtype=np.float64)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5.6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, p, style in (("before", p_before, "o-"), ("after", p_after, "s-")):
        p_arr = np.asarray(p, dtype=np.float64)
        x, frac = _curve(y_arr, p_arr, bins)
        ece = expected_calibration_error(y_arr, p_arr, bins)
        ax.plot(x, frac, style, markersize=4, label=f"{name} (ECE {ece:.3f})")
        hist.hist(p_arr, bins=bins, range=(0, 1), histtype="step", label=name)
    ax.set(ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title or f"reliability ({len(y_arr)} videos)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="P(fake)", ylabel="videos")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
