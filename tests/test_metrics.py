"""Metrics on P(fake): scikit-learn's numbers, the log-loss clipping, AUC's one-class rule, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arena import metrics


def test_metrics_against_hand_computed_values():
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4
    assert metrics.auc(y, p) == pytest.approx(0.75)
    assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # a tie counts one half
    assert metrics.log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert metrics.confusion(y, p) == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert metrics.accuracy(y, p) == pytest.approx(0.75)
    assert metrics.f1(y, p) == pytest.approx(2 / 3)
    assert metrics.f1([0, 0], [0.1, 0.2]) == 0.0
    assert metrics.f1([1, 1], [0.1, 0.2]) == 0.0  # no true positive
    assert metrics.mean_confidence([0.1, 0.6, 0.5]) == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    s = metrics.summary(y, p)
    assert s["auc"] == pytest.approx(0.75) and s["n"] == 4
    assert s["confusion"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}


def test_threshold_counts_equal_as_fake():
    assert metrics.confusion([0, 1], [0.5, 0.5]) == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}
    assert metrics.confusion([0, 1], [0.5, 0.5], threshold=0.6) == {"tn": 1, "fp": 0, "fn": 1, "tp": 0}


def test_log_loss_clips_at_eps():
    """A confident mistake costs -log(EPS) (~16 nats), not inf; one class alone is fine for log loss."""
    assert metrics.log_loss([1], [0.0]) == pytest.approx(-math.log(metrics.EPS))
    assert metrics.log_loss([0], [1.0]) == pytest.approx(-math.log(metrics.EPS))
    assert metrics.log_loss([1, 0], [0.0, 0.0], eps=1e-3) == pytest.approx(-(math.log(1e-3) + math.log(1 - 1e-3)) / 2)


def test_one_class_auc_is_none_in_summary_and_an_error_alone():
    s = metrics.summary([1, 1], [0.9, 0.8])
    assert s["auc"] is None and s["accuracy"] == 1.0 and s["confusion"]["tp"] == 2
    with pytest.raises(ValueError, match="AUC needs both classes; got 0 fake and 2 real"):
        metrics.auc([0, 0], [0.2, 0.3])


def _reference(y: np.ndarray, p: np.ndarray) -> dict:
    """The hand-written formulas the module had before it used scikit-learn."""
    pos, neg = p[y == 1], p[y == 0]
    auc = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (pos.size * neg.size)
    q = np.clip(p, metrics.EPS, 1 - metrics.EPS)
    pred = p >= 0.5
    tp, fp, fn = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0))), int(np.sum(~pred & (y == 1)))
    return {"auc": auc, "log_loss": -np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)),
            "accuracy": np.mean(pred == (y == 1)), "f1": 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)}


def test_same_numbers_as_the_hand_written_formulas():
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = int(rng.integers(2, 40))
        y = np.r_[0, 1, rng.integers(0, 2, m - 2)]
        p = np.round(rng.random(m), int(rng.integers(1, 3)))  # coarse rounding: many ties
        p[rng.integers(0, m)] = rng.choice([0.0, 1.0])
        got, want = metrics.summary(y, p), _reference(y, p)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.log_loss([0, 1], [0.5])
    with pytest.raises(ValueError, match=r"0 \(real\) or 1 \(fake\); got \[2\]"):
        metrics.accuracy([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.log_loss([0, 1], [0.5, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc([0, 1], [float("nan"), 0.5])
    with pytest.raises(ValueError, match="at least one sample"):
        metrics.summary([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.f1([[0, 1]], [[0.2, 0.3]])
