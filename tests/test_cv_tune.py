"""Cross-validated head tuning (arena.cv_heads, arena.study_folds): the K fold heads trained together equal each fold
trained alone; the out-of-fold objective; `arena tune-head` and `arena frame-test` on a K-fold split, and the
holdout behaviour they keep (--no-cv, studies of one fold)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import optuna
import pytest
import torch
from _head_world import FAST, copy_split
from click.testing import CliRunner

from arena import metrics
from arena.cache import FeatureCache
from arena.calibration import apply_temperature
from arena.cli import main
from arena.cv_heads import _LossScale, train_folds
from arena.errors import OptionError, StudyError
from arena.head_data import load_head_data
from arena.head_train import HeadParams, train_head
from arena.models_folder import (
    BEST_HEAD_FILE,
    FRAME_TEST_FILE,
    OOF_FILE,
    STUDY_SUMMARY_FILE,
    HeadCheckpoint,
    fold_dir,
    fold_dirs,
    resolve_frames,
)
from arena.study import default_study_name, make_pruner, resolve_pruner, run_study
from arena.study_storage import create_storage

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = dataclasses.replace(FAST, precision="fp32")
# Every source of randomness on: dropout, input dropout and a random TTA view per video and epoch.
NOISY = HeadParams(attn_dim=32, dropout=0.4, lr=3e-3, frames=8, tta_aug=True, input_dropout=0.5)


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("params, ragged", [(HeadParams(attn_dim=64, lr=1e-3, frames=8), False), (NOISY, False),
                                            (dataclasses.replace(NOISY, lr=0.05), True)],
                         ids=["plain", "noisy", "ragged"])
def test_batched_fold_heads_equal_each_fold_trained_alone(cv_setup, cv_store, params, ragged):
    data = cv_store.get_folds(8)
    config = FP32
    if ragged:  # a batch of the smallest fold's size: the others take an extra step; heads stop at other epochs
        config = dataclasses.replace(FP32, batch_size=min(len(data.train_rows(i)) for i in range(3)), patience=1,
                                     max_epochs=30)
    batched = train_folds(params, data, config=config)
    if ragged:
        assert len({len(data.train_rows(i)) for i in range(3)}) > 1
        assert len({r.epochs_run for r in batched.folds}) > 1
    cache, split = FeatureCache.open(cv_setup["cache"]), cv_setup["split"]
    assert data.folds == split.folds == 3 and len(batched.folds) == 3
    for i, together in enumerate(batched.folds):
        fold = split.fold(i)
        alone_data = load_head_data(cache, fold.train, fold.val, 8)  # the fold as a holdout, read on its own
        assert torch.equal(alone_data.train_x, data.fold_data(i).train_x)
        for mine, theirs in zip(data.fold_stats(i), alone_data.feature_stats(), strict=True):
            assert torch.equal(mine, theirs)  # each head standardises with its own training videos' statistics
        alone = train_head(params, alone_data, config=config)
        assert together.best_epoch == alone.best_epoch and together.epochs_run == alone.epochs_run
        np.testing.assert_allclose(together.history, alone.history, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together.val_probs, alone.val_probs, rtol=1e-4, atol=1e-6)
        assert together.val_loss == pytest.approx(alone.val_loss, rel=1e-4, abs=1e-6)
        for name, weight in alone.state_dict.items():
            if name == "pool.score.2.bias":
                # The attention scores' bias has no gradient in exact arithmetic (a softmax ignores a shift), so
                # Adam turns rounding noise into steps of size lr; it changes no output.
                continue
            # Adam divides by the gradient's size, so rounding in a tiny gradient can move a weight by a fraction of
            # lr: compared as a whole tensor (differences measured: 1e-7 of its norm, 2e-4 at lr = 0.05).
            assert float((together.state_dict[name] - weight).norm()) <= 1e-3 * float(weight.norm()), name
    # The trial's value: every video scored by the head of its fold, at that head's best epoch.
    oof = np.empty(len(data.keys))
    for i, r in enumerate(batched.folds):
        oof[data.val_rows(i).numpy()] = r.val_probs
    np.testing.assert_array_equal(batched.oof_probs, oof)
    assert batched.value == pytest.approx(metrics.log_loss(data.y.numpy(), oof), abs=1e-12)


def test_bf16_autocast_reaches_the_batched_heads(cv_store):
    data, bf16 = cv_store.get_folds(8), dataclasses.replace(FAST, precision="bf16", max_epochs=4)
    batched = train_folds(NOISY, data, config=bf16)
    fp32 = train_folds(NOISY, data, config=dataclasses.replace(bf16, precision="fp32"))
    assert batched.history != fp32.history  # bf16 really runs in bf16
    for i, together in enumerate(batched.folds):  # and rounds as train_head's bf16 does, within bf16's precision
        alone = train_head(NOISY, data.fold_data(i), config=bf16)
        np.testing.assert_allclose(together.history, alone.history, rtol=0, atol=5e-3)


def test_on_epoch_sees_the_oof_loss_and_may_stop_training(cv_store):
    data = cv_store.get_folds(6)
    seen = []
    result = train_folds(HeadParams(attn_dim=64, lr=1e-3, frames=6), data, config=FAST,
                         on_epoch=lambda e, loss: seen.append((e, loss)))
    assert [e for e, _ in seen] == list(range(result.epochs_run)) and result.history == [v for _, v in seen]
    assert result.epochs_run == max(r.epochs_run for r in result.folds)
    assert result.metrics["n"] == len(data.keys) and result.metrics["auc"] >= 0.95

    class Stop(Exception):
        pass

    def stop_at_1(epoch: int, loss: float) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_folds(HeadParams(attn_dim=64, frames=6), data, config=FAST, on_epoch=stop_at_1)
    with pytest.raises(ValueError, match="params ask for 8 frames but the data has 6"):
        train_folds(HeadParams(frames=8), data)


def test_fp16_loss_scale_skips_only_the_head_that_overflowed():
    """CUDA's fp16 path (not runnable on a CPU): each head keeps GradScaler's scale of its own."""
    weight = torch.zeros(3, 2, requires_grad=True)
    weight.grad = torch.tensor([[2.0 ** 16, 0.0], [math.inf, 1.0], [2.0 ** 17, 2.0 ** 16]])
    scale = _LossScale(3)
    assert scale.factors([0, 2], torch.device("cpu")).tolist() == [2.0 ** 16] * 2
    assert scale.unscale({"w": weight}, [0, 1, 2], [0, 1, 2]) == [0, 2]  # head 1 takes no step
    assert weight.grad[0].tolist() == [1.0, 0.0] and weight.grad[2].tolist() == [2.0, 1.0]
    assert scale.scale == [2.0 ** 16, 2.0 ** 15, 2.0 ** 16] and scale.good_steps == [1, 0, 1]


def test_cv_and_holdout_studies_are_never_mixed(cv_store, store, tmp_path):
    url = f"journal:{tmp_path / 'j.log'}"
    kw = {"n_trials": 1, "frame_choices": (6,), "config": FAST, "progress": False}
    cv_study = run_study(cv_store, storage=create_storage(url), study_name="s", cv=True, **kw)
    assert cv_study.user_attrs["context"]["objective"] == "oof_log_loss"
    assert cv_study.user_attrs["context"]["folds"] == 3
    assert len(cv_study.trials[0].user_attrs["fold_log_loss"]) == 3
    with pytest.raises(StudyError, match="different settings .*objective: study has 'oof_log_loss', now None"):
        run_study(cv_store, storage=create_storage(url), study_name="s", **kw)
    # A holdout study keeps the context it always had (so a study made before CV existed resumes) and refuses CV.
    holdout = run_study(store, storage=create_storage(url), study_name="h", **kw)
    assert set(holdout.user_attrs["context"]) == {"frame_choices", "train_config", "seed", "search_space"}
    with pytest.raises(StudyError, match="objective: study has None, now 'oof_log_loss'"):
        run_study(cv_store, storage=create_storage(url), study_name="h", cv=True, **kw)
    assert default_study_name("ab" * 32) == "head-abababab"
    assert default_study_name("ab" * 32, 3) == "head-abababab-cv3"
    with pytest.raises(OptionError, match="cross-validation needs a K-fold split"):
        store.get_folds(6)


def test_pruner_defaults_to_halving_on_folds_and_is_part_of_the_study(cv_store, store, tmp_path):
    assert resolve_pruner("auto", cv=True) == "halving" and resolve_pruner("auto", cv=False) == "median"
    with pytest.raises(OptionError, match="--pruner 'fast'"):
        resolve_pruner("fast", cv=True)
    url = f"journal:{tmp_path / 'j.log'}"
    kw = {"n_trials": 1, "frame_choices": (6,), "config": FAST, "progress": False}
    cv_study = run_study(cv_store, storage=create_storage(url), study_name="s", cv=True, **kw)
    assert cv_study.user_attrs["context"]["pruner"] == "halving"
    assert isinstance(cv_study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    with pytest.raises(StudyError, match="pruner: study has 'halving', now None.*pass --pruner median"):
        run_study(cv_store, storage=create_storage(url), study_name="s", cv=True, pruner="median", **kw)
    holdout = run_study(store, storage=create_storage(url), study_name="h", pruner="none", **kw)
    assert holdout.user_attrs["context"]["pruner"] == "none" and isinstance(holdout.pruner, optuna.pruners.NopPruner)


def test_halving_stops_all_but_the_best_third_after_two_epochs():
    """The rungs `make_pruner("halving")` sets: a trial's loss after epoch index 1 must be in the best third of the
    trials that got there, then again after index 3; the median rule lets every trial run 3 epochs."""
    def curves(pruner):
        study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))

        def objective(trial):
            quality = [0.9, 0.5, 0.7, 0.8, 0.6, 0.3, 0.95, 0.4, 0.85][trial.number]
            for epoch in range(8):
                trial.report(quality + 1.0 / (epoch + 1), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return quality

        study.optimize(objective, n_trials=9)
        return [len(t.intermediate_values) for t in study.trials]

    # After index 1, trials 0, 1 and 5 were the best of those there when they got there (under 6 trials only the best
    # goes on), and 7 was second of 8 (8 // 3 = 2 go on); after index 3, 7 was not the best of the 4 there.
    assert curves(make_pruner("halving")) == [8, 8, 2, 2, 2, 8, 2, 4, 2]
    assert min(curves(make_pruner("median"))) == 3 and curves(make_pruner("none")) == [8] * 9


def _tune(setup, models, *extra):
    args = ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]), "--models", str(models),
            "--n-trials", "3", "--epochs", "6", "--patience", "2", "--batch-size", "16", "--device", "cpu",
            "--threads", "1", *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r.output


def test_cli_split_folds_then_tune_head_writes_the_fold_ensemble(cv_setup, tmp_path):
    models = tmp_path / "models"
    r = CliRunner().invoke(main, ["split", "--data", str(cv_setup["data"]), "--out", str(models), "--folds", "3"])
    assert r.exit_code == 0, r.output
    (models / BEST_HEAD_FILE).write_bytes(b"an earlier holdout study's head")
    out = _tune(cv_setup, models)
    assert "out-of-fold (3 folds) log loss" in out and "removed" in out and "temperature" in out
    assert not (models / BEST_HEAD_FILE).exists()  # the folder's models are its fold heads
    summary = json.loads((models / STUDY_SUMMARY_FILE).read_text())
    assert summary["objective"] == "oof_log_loss" and summary["folds"] == 3
    assert summary["study_name"].endswith("-cv3") and summary["retrained"]["abs_diff"] < 1e-9
    cv = summary["cv"]
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1, 2] and cv["oof"]["auc"] >= 0.95
    assert cv["calibration"]["fitted_on"] == "out-of-fold" and cv["oof"]["ece_calibrated"] >= 0
    assert cv["oof"]["objective_log_loss"] == pytest.approx(summary["best_value"], abs=1e-5)
    # The temperature is fitted on the TTA mean of every cached view, what submit averages; so are the OOF metrics.
    variants = list(FeatureCache.open(cv_setup["cache"]).provenance.variants)
    assert sorted(cv["calibration"]["views"]) == sorted(variants) and cv["oof"]["views"] == cv["calibration"]["views"]
    assert cv["oof"]["log_loss"] == pytest.approx(cv["calibration"]["log_loss_before"])
    assert [p.name for p in fold_dirs(models)] == ["fold_0", "fold_1", "fold_2"]
    rows = list(csv.DictReader((models / OOF_FILE).open()))
    assert len(rows) == cv["oof"]["n"] == 79  # every video but the one whose features failed
    assert all(int(r["fold"]) == cv_setup["split"].fold_of[r["key"]] for r in rows)
    temperature, cache = cv["calibration"]["temperature"], FeatureCache.open(cv_setup["cache"])
    for i in range(3):
        ckpt = HeadCheckpoint.load(fold_dir(models, i) / BEST_HEAD_FILE)
        assert ckpt.metrics["fold"] == i and ckpt.metrics["folds"] == 3
        assert ckpt.metrics["log_loss"] == pytest.approx(cv["per_fold"][i]["log_loss"])
        assert ckpt.calibration == cv["calibration"]  # one temperature for every member
        mine = [r for r in rows if int(r["fold"]) == i]  # what fold i's head says of its own fold's videos
        assert len(mine) == ckpt.metrics["n"]
        x, mask = cache.batch([r["key"] for r in mine], ckpt.frames, ckpt.calibration["views"])
        with torch.no_grad():
            z = torch.stack([ckpt.build()(torch.from_numpy(x[:, v]), torch.from_numpy(mask))[0].diff(dim=-1)[:, 0]
                             for v in range(x.shape[1])], dim=1).double().numpy()  # [videos, views]
        np.testing.assert_allclose([float(r["p_fake"]) for r in mine], apply_temperature(z, 1.0), atol=1e-6)
        np.testing.assert_allclose([float(r["p_fake_calibrated"]) for r in mine],
                                   apply_temperature(z, temperature), atol=1e-6)

    # frame-test on the folds: the OOF comparison goes to the parent and to every fold folder.
    r = CliRunner().invoke(main, ["frame-test", "--cache", str(cv_setup["cache"]), "--data", str(cv_setup["data"]),
                                  "--models", str(models), "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "out-of-fold log loss, 3 folds" in r.output
    doc = json.loads((models / FRAME_TEST_FILE).read_text())
    assert doc["criterion"] == "oof_log_loss" and doc["folds"] == 3
    assert all(len(res["fold_log_loss"]) == 3 and res["n_val"] == 79 for res in doc["results"].values())
    losses = {int(k): res["log_loss"] for k, res in doc["results"].items()}
    assert doc["recommended_frames"] == min(losses, key=losses.get)
    for i in range(3):
        fold_doc = json.loads((fold_dir(models, i) / FRAME_TEST_FILE).read_text())
        assert fold_doc == {**doc, "fold": i}
        assert resolve_frames(fold_dir(models, i))[0] == doc["recommended_frames"]

    # --no-cv: the holdout objective on fold 0, in a study of its own; the parent gets its head again.
    out = _tune(cv_setup, models, "--no-cv")
    summary = json.loads((models / STUDY_SUMMARY_FILE).read_text())
    assert summary["objective"] == "val_log_loss" and "cv" not in summary and "val log loss" in out
    assert summary["study_name"] == default_study_name(cv_setup["split"].sha256)
    ckpt = HeadCheckpoint.load(models / BEST_HEAD_FILE)
    assert ckpt.calibration["fitted_on"] == "validation"
    assert ckpt.metrics["n"] == len([i for i in cv_setup["split"].val if i.key != cv_setup["failed"]])
    r = CliRunner().invoke(main, ["frame-test", "--cache", str(cv_setup["cache"]), "--data", str(cv_setup["data"]),
                                  "--models", str(models), "--device", "cpu", "--threads", "1", "--frames", "6"])
    assert r.exit_code == 0 and json.loads((models / FRAME_TEST_FILE).read_text())["criterion"] == "val_log_loss"


def test_cv_needs_folds(setup, tmp_path):
    models = copy_split(setup, tmp_path / "models")
    r = CliRunner().invoke(main, ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]),
                                  "--models", str(models), "--device", "cpu", "--cv", "--n-trials", "1"])
    assert r.exit_code == 1 and "--cv:" in r.output and "arena split --folds K" in r.output
