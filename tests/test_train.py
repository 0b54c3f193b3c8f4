"""End-to-end fine-tuning on tiny generated videos with a tiny timm backbone (test_resnet at 32 px, 4 frames)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arena.demo import write_video
from arena.hardware import GpuGuard
from arena.train import CHECKPOINT_KEYS, TrainConfig, train

SIZE = 32


def _toy_clip(rng: np.random.Generator, fake: bool) -> np.ndarray:
    """6 frames of grainy texture; fakes carry a bright square (a trivially learnable cue, fine for a toy)."""
    frames = rng.normal(110, 12, size=(6, SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    if fake:
        y, x = rng.integers(4, SIZE - 16, size=2)
        frames[:, y:y + 12, x:x + 12] = 235
    return frames


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """5 real + 5 fake training videos (split 7/3 by the persisted split)."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    rows = ["filename,label"]
    for label, name in ((0, "real"), (1, "fake")):
        for i in range(5):
            key = f"train/{name}/{name}_{i}.mp4"
            write_video(root / key, _toy_clip(rng, fake=bool(label)), fps=10, gop=6)
            rows.append(f"{key},{label}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def quiet_guard() -> GpuGuard:
    return GpuGuard(read_temp=lambda: 40.0, read_mem=lambda: (1, 100), log=lambda m: None)


def tiny_config(data: Path, models: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), models=str(models), backbone="test_resnet", pretrained=False, image_size=SIZE,
                frames=4, epochs=3, accum_steps=2, lr=2e-3, lr_patience=0, es_patience=3, workers=0, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(toy_data, tmp_path_factory):
    models = tmp_path_factory.mktemp("models_full")
    result = train(tiny_config(toy_data, models), guard=quiet_guard())
    return models, result


def test_run_writes_checkpoint_with_exactly_the_seed_keys_summary_png_and_log(full_run):
    models, result = full_run
    assert result.best_path == models / "test_resnet_best.pt"
    best = torch.load(result.best_path, weights_only=True)
    assert set(best) == set(CHECKPOINT_KEYS)
    assert best["epoch"] == result.best_epoch
    assert isinstance(best["config"], dict) and best["config"]["frames"] == 4 and best["config"]["image_size"] == SIZE
    assert [h["epoch"] for h in best["history"]] == list(range(1, best["epoch"] + 1))
    last = torch.load(models / "last.pt", weights_only=True)
    assert {"scheduler_state_dict", "scaler_state_dict", "early_stopping", "rng"} <= set(last)
    assert last["finished"] and last["stop_reason"] in ("max_epochs", "early_stopping")

    summary = json.loads((models / "training_summary.json").read_text())
    assert summary["best_epoch"] == result.best_epoch
    assert len(summary["history"]) == result.epochs_run
    assert summary["config"]["backbone"] == "test_resnet"
    assert "torch" in summary["hardware"] and summary["elapsed_seconds"] > 0
    assert (models / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch 1/3" in (models / "train.log").read_text()


def test_training_loss_falls_on_a_learnable_toy_set(full_run):
    _, result = full_run
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


def test_resume_after_a_stop_reaches_the_same_final_state(full_run, toy_data, tmp_path):
    models_ref, ref = full_run

    class Stop(Exception):
        pass

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config(toy_data, tmp_path), guard=quiet_guard(), on_epoch_end=stop_after_first)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train(tiny_config(toy_data, tmp_path, resume="yes"), guard=quiet_guard())
    assert resumed.resumed_from == 1

    a = torch.load(models_ref / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key, value in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k in ("train_loss", "val_loss", "val_auc", "lr"):
            assert ha[k] == pytest.approx(hb[k], rel=1e-5, abs=1e-6), k
    assert a["scheduler_state_dict"] == b["scheduler_state_dict"]


def test_resume_refuses_other_settings_and_finished_runs_do_nothing(full_run, toy_data):
    models, ref = full_run
    with pytest.raises(ValueError, match=r"other settings: .*lr: saved 0.002, now 0.001.*--resume no"):
        train(tiny_config(toy_data, models, lr=1e-3), guard=quiet_guard())
    again = train(tiny_config(toy_data, models), guard=quiet_guard())  # finished: nothing to train
    assert again.history == ref.history


def test_resume_yes_without_state_is_refused(toy_data, tmp_path):
    with pytest.raises(ValueError, match="no .*last.pt to continue from"):
        train(tiny_config(toy_data, tmp_path, resume="yes"), guard=quiet_guard())


def test_an_injected_out_of_memory_is_survived_with_fewer_frames(toy_data, tmp_path, monkeypatch):
    import arena.train as train_mod

    real_build = train_mod.build_model

    def build_with_small_memory(cfg, tuned):
        model = real_build(cfg, tuned)
        forward = model.forward

        def limited(frames, mask=None):
            if model.training and frames.shape[1] > 4:
                raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes")
            return forward(frames, mask)

        model.forward = limited
        return model

    monkeypatch.setattr(train_mod, "build_model", build_with_small_memory)
    result = train(tiny_config(toy_data, tmp_path, frames=8, epochs=1), guard=quiet_guard())
    assert result.epochs_run == 1
    assert result.oom_events and result.oom_events[0]["frames"] == 8
    assert result.history[-1]["frames"] == 4
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["out_of_memory_events"][0]["frames"] == 8


def test_guard_is_called_between_steps(toy_data, tmp_path):
    temps = iter([80.0, 71.0] + [40.0] * 1000)
    guard = GpuGuard(read_temp=lambda: next(temps), read_mem=lambda: (95, 100), sleep=lambda s: None,
                     log=lambda m: None)
    train(tiny_config(toy_data, tmp_path, epochs=1, limit_train=4, limit_val=2), guard=guard)
    assert len(guard.pauses) == 1 and guard.vram_warnings > 0


def test_bad_options_are_refused_with_the_allowed_range():
    with pytest.raises(ValueError, match=r"frames must be in 1..512, got 0"):
        TrainConfig(data="d", frames=0)
    with pytest.raises(ValueError, match=r"invalid amp \(fp8\). Supported values are auto, fp16, bf16, off"):
        TrainConfig(data="d", amp="fp8")


def test_ddp_two_gloo_processes_only_rank0_writes(toy_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "arena",
           "train-full", "--data", str(toy_data), "--models", str(tmp_path), "--backbone", "test_resnet",
           "--no-pretrained", "--image-size", str(SIZE), "--frames", "4", "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--accum-steps", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["config"]["world_size"] == 2
    # Every validation video is counted once although DistributedSampler pads the shards.
    assert summary["history"][0]["epoch"] == 1
    log_text = (tmp_path / "train.log").read_text()
    assert log_text.count("epoch 1/1:") == 1  # one writer
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "split.json", "test_resnet_best.pt", "train.log", "training_curves.png", "training_summary.json"]
    assert proc.stdout.count("train-full: max_epochs after epoch 1") == 1
