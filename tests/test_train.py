"""End-to-end fine-tuning on tiny generated videos with a tiny timm backbone (test_resnet at 32 px, 4 frames).

Also the pieces of `arena.train`: `arena.train_config`, `arena.train_model` and `arena.train_state`
(`arena.train_data` and `arena.distributed` have their own test files).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _layout import write_dataset

from arena.errors import ArenaError, ModelsError, OptionError, TrainError
from arena.hardware import GpuGuard
from arena.model import DetectorHead
from arena.models_folder import DetectorCheckpoint, HeadCheckpoint, resolve_frames
from arena.train import train
from arena.train_config import TrainConfig
from arena.train_model import build_model, calibrate_head_stats, load_tuned_head
from arena.train_state import config_difference

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
    """8 real + 8 fake training videos (12 train / 4 validation by the persisted split)."""
    rng = np.random.default_rng(0)
    train = ((f"train/{c}/{c}_{i}.mp4", label, _toy_clip(rng, fake=bool(label)))
             for label, c in ((0, "real"), (1, "fake")) for i in range(8))
    return write_dataset(tmp_path_factory.mktemp("toy"), train)


def quiet_guard() -> GpuGuard:
    return GpuGuard(read_temp=lambda: 40.0, read_mem=lambda: (1, 100), log=lambda m: None)


def tiny_config(data: Path, models: Path, **kw) -> TrainConfig:
    # Batch 2: with one clip per step, train-mode BatchNorm normalises each clip by its own statistics and the
    # toy's cue learns slowly; two clips per step learn it in a few epochs.
    base = dict(data=str(data), models=str(models), backbone="test_resnet", pretrained=False, image_size=SIZE,
                frames=4, epochs=2, batch_size=2, accum_steps=1, lr=2e-3, lr_patience=1, es_patience=3, workers=0,
                seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(toy_data, tmp_path_factory):
    # One torch thread, like the subprocesses below (OMP_NUM_THREADS=1): float reductions then give identical bits
    # whatever thread count earlier tests left in this process.
    models = tmp_path_factory.mktemp("models_full")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(tiny_config(toy_data, models), guard=quiet_guard())
    finally:
        torch.set_num_threads(before)
    return models, result


def test_run_writes_checkpoint_with_exactly_the_seed_keys_summary_png_and_log(full_run):
    models, result = full_run
    assert result.best_path == models / "test_resnet_best.pt"
    best = torch.load(result.best_path, weights_only=True)
    assert set(best) == {"epoch", "model_state_dict", "optimizer_state_dict", "val_acc", "val_f1", "val_auc",
                         "history", "config"}  # exactly the seed's keys
    assert {"backbone", "image_size", "seed", "head"} <= set(best["config"])
    rebuilt = DetectorCheckpoint.load(result.best_path).build()  # what submit/evaluate do with it
    for key, value in best["model_state_dict"].items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
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
    assert "epoch 1/2" in (models / "train.log").read_text()


def test_training_loss_falls_on_a_learnable_toy_set(full_run):
    _, result = full_run
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


def test_resume_refuses_other_settings_and_finished_runs_do_nothing(full_run, toy_data):
    models, ref = full_run
    with pytest.raises(TrainError, match=r"other settings: .*lr: saved 0.002, now 0.001.*--resume no"):
        train(tiny_config(toy_data, models, lr=1e-3), guard=quiet_guard())
    again = train(tiny_config(toy_data, models), guard=quiet_guard())  # finished: nothing to train
    assert again.history == ref.history


def test_resume_yes_without_state_is_refused(toy_data, tmp_path):
    with pytest.raises(TrainError, match="no .*last.pt to continue from"):
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
    result = train(tiny_config(toy_data, tmp_path, frames=8, epochs=1, limit_train=4, limit_val=2),
                   guard=quiet_guard())
    assert result.epochs_run == 1
    assert result.oom_events and result.oom_events[0]["frames"] == 8
    assert result.history[-1]["frames"] == 4
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["out_of_memory_events"][0]["frames"] == 8


def test_guard_runs_between_steps_and_a_broken_video_is_skipped_and_reported(toy_data, tmp_path):
    data = tmp_path / "data"
    rows = ["filename,label"]
    for name, label in (("real", 0), ("fake", 1)):
        (data / "train" / name).mkdir(parents=True)
        for i in range(3):
            key = f"train/{name}/{name}_{i}.mp4"
            shutil.copy(toy_data / key, data / key)
            rows.append(f"{key},{label}")
    (data / "train" / "fake" / "fake_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    rows.append("train/fake/fake_broken.mp4,1")
    (data / "train_labels.csv").write_text("\n".join(rows) + "\n")
    temps = iter([80.0, 71.0] + [40.0] * 1000)
    guard = GpuGuard(read_temp=lambda: next(temps), read_mem=lambda: (95, 100), sleep=lambda s: None,
                     log=lambda m: None)
    result = train(tiny_config(data, tmp_path / "m", epochs=1), guard=guard)
    assert len(guard.pauses) == 1 and guard.vram_warnings > 0
    assert list(result.skipped) == ["train/fake/fake_broken.mp4"]
    summary = json.loads((tmp_path / "m" / "training_summary.json").read_text())
    assert "train/fake/fake_broken.mp4" in summary["skipped_videos"]
    assert any("skipped (could not decode) train/fake/fake_broken.mp4" in line for line in result.lines())
    # The command: outputs complete, the skipped video listed, exit status 3.
    from click.testing import CliRunner

    from arena.cli import main

    cli = CliRunner().invoke(main, cli_args(data, tmp_path / "m_cli", "--epochs", "1"))
    assert cli.exit_code == 3, cli.output
    assert "skipped (could not decode) train/fake/fake_broken.mp4" in cli.output
    assert (tmp_path / "m_cli" / "test_resnet_best.pt").is_file()


def test_frames_come_from_the_option_else_the_frame_test_else_24(tmp_path):
    # train-full asks `arena.models_folder.resolve_frames` (the one resolver, shared with submit and evaluate).
    assert resolve_frames(tmp_path)[0] == 24
    assert resolve_frames(tmp_path, 8) == (8, "--frames option")
    (tmp_path / "frame_test.json").write_text(json.dumps({"recommended_frames": 32}))
    assert resolve_frames(tmp_path) == (32, str(tmp_path / "frame_test.json"))
    (tmp_path / "frame_test.json").write_text("{}")
    with pytest.raises(ModelsError, match="frame_test.json: cannot read recommended_frames"):
        resolve_frames(tmp_path)


def _write_tuned_head(models: Path, *, backbone: str, weights_source: str, dim: int) -> DetectorHead:
    torch.manual_seed(7)
    head = DetectorHead(dim, attn_dim=32, hidden=256, dropout=0.3)
    head.set_feature_stats(torch.full((dim,), 0.5), torch.full((dim,), 2.0))
    HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=4,
                   params={"lr": 5e-4, "weight_decay": 1e-3, "attn_dim": 32},
                   provenance={"backbone": backbone, "weights_source": weights_source, "input_size": [SIZE, SIZE]},
                   ).save(models / "best_head.pt")
    return head


def test_the_tuned_head_is_the_starting_point_when_it_fits(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    head = _write_tuned_head(tmp_path, backbone="test_resnet", weights_source="random:test_resnet:seed=3", dim=96)
    model = build_model(cfg, load_tuned_head(tmp_path))
    assert model.head_init_source.endswith("best_head.pt")
    assert model.head.config() == head.config()
    for key, value in head.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    tuned = load_tuned_head(tmp_path)
    assert (tuned.lr, tuned.weight_decay) == (5e-4, 1e-3)


def test_head_statistics_are_recalibrated_from_train_mode_features_without_touching_batchnorm(toy_data, tmp_path):
    from arena.data import load_dataset

    _write_tuned_head(tmp_path, backbone="test_resnet", weights_source="random:test_resnet:seed=3", dim=96)
    model = build_model(tiny_config(toy_data, tmp_path), load_tuned_head(tmp_path))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    n = calibrate_head_stats(model, load_dataset(toy_data, require_test=False).train, frames=4,
                             device=torch.device("cpu"), amp_dtype=None, videos=4)
    assert n == 16
    assert not torch.allclose(model.head.feat_std, torch.full((96,), 2.0))
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_tuned_head_from_other_features_is_not_used(tmp_path):
    _write_tuned_head(tmp_path, backbone="test_resnet", weights_source="random:test_resnet:seed=0", dim=96)
    model = build_model(tiny_config(tmp_path, tmp_path), load_tuned_head(tmp_path))  # seed 3: other weights
    assert model.head_init_source == "default" and model.head.attn_dim == 256
    with pytest.raises(ModelsError, match=r"tuned on other features: weights_source: tuned on "
                                         r"'random:test_resnet:seed=0', training 'random:test_resnet:seed=3'"):
        build_model(tiny_config(tmp_path, tmp_path, head_init="tuned"), load_tuned_head(tmp_path))


def test_bad_options_are_refused_with_the_allowed_range():
    with pytest.raises(OptionError, match=r"--frames must be in 1..512, got 0"):
        TrainConfig(data="d", frames=0)
    with pytest.raises(OptionError, match=r"Invalid --amp \(fp8\). Supported values are auto, fp32, bf16, fp16, off"):
        TrainConfig(data="d", amp="fp8")
    with pytest.raises(OptionError, match=r"Invalid device \(gpu\). Supported values are auto, cpu, cuda or cuda:N"):
        TrainConfig(data="d", device="gpu")
    with pytest.raises(OptionError, match=r"--temp-resume \(80.0\) must be below --temp-pause \(78.0\)"):
        TrainConfig(data="d", temp_resume_c=80.0)


def test_amp_off_is_fp32_and_older_precision_spellings_still_resume():
    assert TrainConfig(data="d", amp="off").amp == "fp32"
    old = {"amp": "off", "amp_dtype": "off", "lr": 1e-4, "frames_source": "option", "workers": 4}
    now = {"amp": "fp32", "amp_dtype": "fp32", "lr": 1e-4, "frames_source": "--frames option", "workers": 0}
    assert config_difference(old, now) == []
    assert config_difference({"amp_dtype": "bfloat16"}, {"amp_dtype": "bf16"}) == []
    assert config_difference({"amp": "auto", "amp_dtype": "bfloat16"}, {"amp": "auto", "amp_dtype": "fp32"}) == [
        "amp_dtype: saved 'bfloat16', now 'fp32'"]


def test_fp16_on_a_cpu_is_refused_before_training(toy_data, tmp_path):
    with pytest.raises(OptionError, match="fp16 needs a CUDA device"):
        train(tiny_config(toy_data, tmp_path, amp="fp16", device="cpu"), guard=quiet_guard())


def test_the_cli_prints_user_errors_without_a_traceback(toy_data, tmp_path):
    from click.testing import CliRunner

    from arena.cli import main

    (tmp_path / "best_head.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, cli_args(toy_data, tmp_path, "--head-init", "tuned"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "best_head.pt: cannot be loaded with weights_only=True" in result.output
    assert issubclass(ModelsError, ArenaError)


def cli_args(data: Path, models: Path, *extra: str) -> list[str]:
    """`arena train-full` with the settings of tiny_config (the CLI must resolve to the same TrainConfig)."""
    return ["train-full", "--data", str(data), "--models", str(models), "--backbone", "test_resnet",
            "--no-pretrained", "--image-size", str(SIZE), "--frames", "4", "--epochs", "2", "--batch-size", "2",
            "--accum-steps", "1", "--lr", "2e-3", "--lr-patience", "1", "--es-patience", "3", "--workers", "0",
            "--seed", "3", *extra]


def test_kill_9_then_resume_reaches_the_same_final_state_as_an_uninterrupted_run(full_run, toy_data, tmp_path):
    models_ref, _ = full_run
    cmd = [sys.executable, "-m", "arena", *cli_args(toy_data, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference run used one thread too
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last = tmp_path / "last.pt"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # A fixed-seed random moment in epoch 2 (checkpoints are replaced atomically, so any moment is fine).
        time.sleep(float(np.random.default_rng(8).uniform(0.0, 1.0)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert torch.load(last, weights_only=True)["epoch"] >= 1
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=env)  # require it
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after epoch 1" in again.stdout or "nothing to train" in again.stderr
    a = torch.load(models_ref / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert (a["epoch"], a["finished"]) == (b["epoch"], b["finished"])
    for key, value in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-5, abs=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_ddp_two_gloo_processes_only_rank0_writes(toy_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "arena",
           *cli_args(toy_data, tmp_path, "--epochs", "1", "--limit-train", "4", "--limit-val", "3", "--device",
                     "cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["config"]["world_size"] == 2
    # Every validation video is counted once although DistributedSampler pads the shards.
    assert summary["history"][0]["epoch"] == 1
    log_text = (tmp_path / "train.log").read_text()
    assert log_text.count("epoch 1/1:") == 1  # one writer
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "runs", "split.json", "test_resnet_best.pt", "train.log", "training_curves.png",
        "training_summary.json"]
    assert len(list((tmp_path / "runs").glob("*-train-full.json"))) == 1  # rank 0's run record, once
    assert proc.stdout.count("train-full: max_epochs after epoch 1") == 1
