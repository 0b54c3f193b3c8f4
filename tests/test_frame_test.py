"""`arena frame-test` (arena.frame_test): one head per frame count, recommended by validation log loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
from _head_world import FAST, copy_split
from click.testing import CliRunner

from arena.cli import main
from arena.errors import ModelsError
from arena.frame_test import frame_test, run_frame_test, study_settings
from arena.head_train import HIDDEN, HeadParams
from arena.models_folder import BEST_PARAMS_FILE, FRAME_TEST_FILE, STUDY_SUMMARY_FILE, resolve_frames

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frame_test_recommends_the_lowest_log_loss(store):
    out = run_frame_test(store, HeadParams(attn_dim=64, lr=1e-3), config=FAST, progress=False)
    losses = {int(k): r["log_loss"] for k, r in out["results"].items()}
    assert out["recommended_frames"] == min(losses, key=losses.get)
    assert out["criterion"] == "val_log_loss"
    assert all(0.5 <= r["mean_confidence"] <= 1 for r in out["results"].values())


def test_frame_test_uses_the_study_settings_and_writes_what_resolve_frames_reads(setup, tmp_path):
    models = copy_split(setup, tmp_path / "models")
    params = HeadParams(attn_dim=64, lr=1e-3)
    (models / BEST_PARAMS_FILE).write_text(json.dumps({**params.to_dict(), "hidden": HIDDEN}))
    study_config = dataclasses.replace(FAST, max_epochs=3, seed=4)
    (models / STUDY_SUMMARY_FILE).write_text(json.dumps({"train_config": dataclasses.asdict(study_config)}))
    assert study_settings(models) == (params, study_config)
    r = CliRunner().invoke(main, ["frame-test", "--cache", str(setup["cache"]), "--data", str(setup["data"]),
                                  "--models", str(models), "--device", "cpu", "--frames", "6,8", "--patience", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads((models / FRAME_TEST_FILE).read_text())
    assert doc["train_config"] == dataclasses.asdict(dataclasses.replace(study_config, patience=2))
    assert all(res["best_epoch"] < 3 for res in doc["results"].values())
    assert resolve_frames(models) == (doc["recommended_frames"], str(models / FRAME_TEST_FILE))
    assert f"recommended: {doc['recommended_frames']} frames" in r.output


def test_frame_test_needs_a_tuned_head(setup, tmp_path):
    with pytest.raises(ModelsError, match="run `arena tune-head"):
        frame_test(setup["cache"], setup["data"], tmp_path, device="cpu")
    (tmp_path / BEST_PARAMS_FILE).write_text(json.dumps({"attn_dim": 64, "dropout": 1.5}))
    with pytest.raises(ModelsError, match="best_head_params.json: not a valid parameter file .*dropout"):
        frame_test(setup["cache"], setup["data"], tmp_path, device="cpu")
    (tmp_path / BEST_PARAMS_FILE).write_text("{")
    r = CliRunner().invoke(main, ["frame-test", "--cache", str(setup["cache"]), "--data", str(setup["data"]),
                                  "--models", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 1 and "best_head_params.json: cannot be read" in r.output
