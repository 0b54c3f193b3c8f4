"""Calibration: temperature fitting and metrics, the temperature stored with a model and applied at submit/evaluate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _world import World, build_world
from click.testing import CliRunner

from arena.calibration import (
    apply_temperature,
    brier,
    calibration_metrics,
    clip_probabilities,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    probs_to_logits,
    reliability_diagram,
)
from arena.cli import main
from arena.metrics import log_loss
from arena.model import DetectorHead
from arena.models_folder import BEST_HEAD_FILE, HeadCheckpoint
from arena.predict import head_probabilities, load_model
from arena.submit import make_submission


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def _calibrated_models(world: World, dest: Path, temperature: float) -> Path:
    """A copy of the world's head-only models folder whose checkpoint carries ``temperature``."""
    shutil.copytree(world.models, dest)
    ckpt = HeadCheckpoint.load(dest / BEST_HEAD_FILE)
    ckpt.calibration = {"temperature": temperature, "fitted_on": "validation", "videos": 4}
    ckpt.save(dest / BEST_HEAD_FILE)
    return dest


def _overconfident(n: int = 4000, t_true: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z) and logits reported as t_true * z: a model t_true times too confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return t_true * z, y


def test_fit_temperature_recovers_a_known_temperature_and_lowers_log_loss():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert log_loss(y, apply_temperature(z, t)) < log_loss(y, apply_temperature(z, 1.0)) - 0.05
    # With views ([N, V]) the calibrated P(fake) is the mean over views of sigmoid(z / T): the submission's TTA mean.
    zv = np.stack([z, z + 0.1], axis=1)
    mean_of_views = (apply_temperature(z, 2.0) + apply_temperature(z + 0.1, 2.0)) / 2
    assert apply_temperature(zv, 2.0) == pytest.approx(mean_of_views)
    assert fit_temperature(zv, y) == pytest.approx(3.0, rel=0.1)
    rec = fit_calibration(z, y)
    assert rec["temperature"] == pytest.approx(t) and rec["videos"] == len(y)
    assert rec["log_loss_after"] < rec["log_loss_before"] and rec["fitted_on"] == "validation"


def test_fit_temperature_needs_both_classes_and_fit_calibration_falls_back_to_one():
    with pytest.raises(ValueError, match="needs both classes"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    rec = fit_calibration(np.array([1.0, 2.0]), np.array([1, 1]))
    assert rec["temperature"] == 1.0 and "both classes" in rec["skipped"]


def test_separated_validation_keeps_temperature_one():
    """Every validation video on its side of 0.5 (the demo's fine-tuned model): T is not identifiable, so it stays 1
    instead of running to the search bound and making every later mistake a confident one."""
    z = np.array([[2.0, 3.0], [4.0, 1.0], [-1.0, -2.5], [-3.0, -0.5]])  # [N, V]: right in every view
    y = np.array([1, 1, 0, 0])
    with pytest.raises(ValueError, match="right side of 0.5"):
        fit_temperature(z, y)
    rec = fit_calibration(z, y)
    assert rec["temperature"] == 1.0 and "right side of 0.5" in rec["skipped"]
    z[0, 1] = -0.2  # one view on the wrong side: now the loss has a finite optimum
    assert 0.05 < fit_calibration(z, y)["temperature"] < 20


def test_probability_helpers():
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    assert clip_probabilities(p, 0.01).tolist() == [0.01, 0.2, 0.5, 0.9, 0.99]
    with pytest.raises(ValueError, match=r"clip epsilon must be in \[0, 0.5\)"):
        clip_probabilities(p, 0.5)
    assert apply_temperature(probs_to_logits(p[1:4]), 1.0) == pytest.approx(p[1:4])
    assert brier([0, 1], [0.0, 1.0]) == 0.0 and brier([0, 1], [1.0, 0.0]) == 1.0


def test_ece_small_when_calibrated_and_large_when_overconfident(tmp_path):
    z, y = _overconfident(n=20000)
    p_true = apply_temperature(z, 3.0)  # the labels' own probabilities: calibrated
    p_over = apply_temperature(z, 1.0)
    assert expected_calibration_error(y, p_true) < 0.02
    assert expected_calibration_error(y, p_over) > 0.08
    m = calibration_metrics(y, p_true)
    assert set(m) == {"log_loss", "brier", "ece"} and m["brier"] < calibration_metrics(y, p_over)["brier"]
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0  # p = 1 falls into the last (closed) bin
    png = reliability_diagram(y[:500], p_over[:500], p_true[:500], tmp_path / "r.png")
    assert png.is_file() and png.stat().st_size > 1000


def test_head_checkpoint_round_trips_the_temperature_and_old_ones_load_with_one(tmp_path):
    head = DetectorHead(8, attn_dim=4, hidden=4)
    cal = {"temperature": 1.7, "fitted_on": "validation", "videos": 10, "log_loss_before": 0.7,
           "log_loss_after": 0.6}
    HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=4, calibration=cal).save(tmp_path / "a")
    assert HeadCheckpoint.load(tmp_path / "a").calibration == cal
    old = HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=4).save(tmp_path / "b")
    assert "calibration" not in torch.load(old, weights_only=True)  # as written before calibration existed
    assert HeadCheckpoint.load(old).calibration == {}


def test_head_probabilities_divides_the_logits_by_the_temperature():
    torch.manual_seed(0)
    head = DetectorHead(8, attn_dim=4, hidden=4).eval()
    feats, valid = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32), np.ones(5, dtype=bool)
    with torch.no_grad():
        logits, _ = head(torch.as_tensor(feats), torch.ones(3, 5, dtype=torch.bool))
    z = (logits[:, 1] - logits[:, 0]).double().numpy()
    for t in (1.0, 0.5, 4.0):
        p, _ = head_probabilities(head, feats, valid, temperature=t)
        assert p == pytest.approx(apply_temperature(z, t), abs=1e-6)


def test_models_load_their_temperature_or_one(world: World, tmp_path):
    models = _calibrated_models(world, tmp_path / "m", 2.5)
    assert load_model(models, kind="head-only").temperature == 2.5
    assert load_model(models, kind="head-only", calibration=False).temperature == 1.0
    assert load_model(world.models, kind="head-only").temperature == 1.0  # written without calibration
    assert load_model(world.models_ft, kind="finetuned").temperature == 1.0


def test_evaluate_reports_calibration_before_and_after(world: World, tmp_path):
    models = _calibrated_models(world, tmp_path / "m", 0.2)
    out = tmp_path / "eval" / "evaluation.json"
    common = ["evaluate", "--data", str(world.data), "--models", str(models), "--labels",
              str(world.data / "test_labels.csv"), "--workers", "0", "--device", "cpu", "--no-amp"]
    res = CliRunner().invoke(main, [*common, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "calibration (T = 0.200): log loss" in res.output
    cal = json.loads(out.read_text())["calibration"]
    assert cal["temperature"] == 0.2 and set(cal["before"]) == {"log_loss", "brier", "ece"}
    assert cal["before"] != cal["after"] and Path(cal["png"]) == out.parent / "reliability.png"
    assert Path(cal["png"]).stat().st_size > 1000
    doc = json.loads(out.read_text())
    assert any(abs(v["p_fake"] - v["p_uncalibrated"]) > 1e-3 for v in doc["videos"])
    res = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "raw.json"), "--no-calibration"])
    assert res.exit_code == 0, res.output
    raw = json.loads((tmp_path / "raw.json").read_text())["calibration"]
    assert raw["temperature"] == 1.0 and raw["before"] == raw["after"] == cal["before"]


def test_submit_applies_the_temperature_verifies_and_clips(world: World, tmp_path):
    models = _calibrated_models(world, tmp_path / "m", 0.05)  # very sharp: P(fake) near 0 or 1
    out = tmp_path / "sub" / "PREDICTIONS.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(models), "--out", str(out),
                                    "--workers", "0", "--device", "cpu", "--no-amp", "--verify", str(world.cache),
                                    "--verify-all", "--clip", "0.3"])
    assert res.exit_code == 0, res.output
    assert "temperature 0.050" in res.output and "clipped to [0.3, 0.7]" in res.output
    probs = [float(r["probability"]) for r in csv.DictReader(out.open())]
    assert probs and all(0.5 <= p <= 0.7 + 1e-9 for p in probs)  # probability of the predicted class
    raw = make_submission(data=world.data, models=models, out=tmp_path / "raw.csv", workers=0, device="cpu",
                          progress=False, echo=None, precision="fp32")
    assert max(abs(p.p_fake - 0.5) for p in raw.predictions) > 0.25  # without --clip the sharp values are written
