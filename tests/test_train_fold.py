"""`arena train-full --fold i|all`: fold i of the K-fold split trains into ``<models>/folds/fold_<i>``, resumes
there, and ``--fold all`` trains every fold, skipping finished ones (tiny videos, test_resnet at 32 px, 2 frames).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _layout import write_dataset
from click.testing import CliRunner

from arena.cli import main
from arena.data import load_dataset
from arena.errors import OptionError, TrainError
from arena.hardware import GpuGuard
from arena.model import DetectorHead
from arena.models_folder import HeadCheckpoint, fold_dir
from arena.split import make_split
from arena.train import train
from arena.train_config import TrainConfig
from arena.train_folds import train_folds

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only adds synchronisation
OUTPUTS = ["last.pt", "test_resnet_best.pt", "train.log", "training_curves.png", "training_summary.json"]


@pytest.fixture(scope="module")
def fold_world(tmp_path_factory) -> tuple[Path, Path]:
    """6 real + 6 fake videos of 4 frames and a 3-fold split of them (4 validation videos per fold)."""
    rng = np.random.default_rng(0)

    def clip(fake: bool) -> np.ndarray:
        frames = rng.normal(110, 12, size=(4, SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
        if fake:
            frames[:, 8:20, 8:20] = 235
        return frames

    root = tmp_path_factory.mktemp("folds")
    data = write_dataset(root / "data", ((f"train/{c}/{c}_{i}.mp4", label, clip(bool(label)))
                                         for label, c in ((0, "real"), (1, "fake")) for i in range(6)))
    split_dir = root / "split"
    make_split(load_dataset(data, require_test=False), split_dir, folds=3, groups="none", seed=0)
    return data, split_dir / "split.json"


def models_with_split(tmp_path: Path, split_file: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir(parents=True)
    shutil.copy(split_file, models / "split.json")
    return models


def quiet_guard() -> GpuGuard:
    return GpuGuard(read_temp=lambda: 40.0, read_mem=lambda: (1, 100), log=lambda m: None)


def cfg(data: Path, models: Path, **kw) -> TrainConfig:
    """The tiny settings; tests that do not count videos add ``limit_train=4, limit_val=2`` (QUICK)."""
    base = dict(data=str(data), models=str(models), backbone="test_resnet", pretrained=False, image_size=SIZE,
                frames=2, epochs=1, batch_size=2, accum_steps=1, lr=2e-3, workers=0, seed=3, augment="light")
    return TrainConfig(**{**base, **kw})


QUICK = {"limit_train": 4, "limit_val": 2}


def fold_counts(split_file: Path, fold: int) -> tuple[int, int]:
    doc = json.loads(split_file.read_text())
    val = sum(f == fold for f in doc["fold"].values())
    return len(doc["fold"]) - val, val


def write_fold_head(folder: Path) -> None:
    """A tuned head that fits the test backbone (as a K-fold tune-head leaves in each fold's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    head = DetectorHead(96, attn_dim=32, hidden=64, dropout=0.1)
    HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=2, params={"lr": 5e-4},
                   provenance={"backbone": "test_resnet", "weights_source": "random:test_resnet:seed=3",
                               "input_size": [SIZE, SIZE]}).save(folder / "best_head.pt")


def test_fold_1_trains_on_the_other_folds_into_its_own_folder(fold_world, tmp_path):
    data, split_file = fold_world
    models = models_with_split(tmp_path, split_file)
    write_fold_head(fold_dir(models, 1))
    (fold_dir(models, 1) / "frame_test.json").write_text(json.dumps({"recommended_frames": 3}))
    (models / "frame_test.json").write_text(json.dumps({"recommended_frames": 2}))
    result = train(cfg(data, models, fold=1, frames=None), guard=quiet_guard())

    out = fold_dir(models, 1)
    assert result.best_path == out / "test_resnet_best.pt" and result.fold == 1
    assert OUTPUTS == sorted(p.name for p in out.iterdir() if p.name not in ("best_head.pt", "frame_test.json"))
    assert sorted(p.name for p in models.iterdir()) == ["folds", "frame_test.json", "split.json"]
    summary = json.loads((out / "training_summary.json").read_text())
    c = summary["config"]
    assert (c["train_videos"], c["val_videos"]) == fold_counts(split_file, 1) == (8, 4)
    assert (c["fold"], c["folds"]) == (1, 3)
    assert c["frames"] == 3 and c["frames_source"] == str(out / "frame_test.json")  # the fold's own frame test
    assert c["head_init_source"] == f"file:{out / 'best_head.pt'}"  # the fold's own tuned head
    assert c["augment"] == "light" and c["augment_policy"]["level"] == "light"
    assert torch.load(result.best_path, weights_only=True)["config"]["augment"] == "light"
    assert result.lines()[0].startswith("train-full fold 1: max_epochs after epoch 1")


def test_a_fold_resumes_in_its_folder_and_a_finished_fold_is_left_alone(fold_world, tmp_path):
    data, split_file = fold_world
    models = models_with_split(tmp_path, split_file)
    first = train(cfg(data, models, fold=0, augment="none", **QUICK), guard=quiet_guard())
    more = train(cfg(data, models, fold=0, augment="none", epochs=2, **QUICK), guard=quiet_guard())  # extends it
    assert more.resumed_from == 1 and [h["epoch"] for h in more.history] == [1, 2]
    assert more.history[0] == first.history[0]
    last = fold_dir(models, 0) / "last.pt"
    stamp = last.stat().st_mtime_ns
    again = train(cfg(data, models, fold=0, augment="none", epochs=2, **QUICK), guard=quiet_guard())  # finished
    assert again.history == more.history and last.stat().st_mtime_ns == stamp
    assert not (models / "last.pt").exists()
    with pytest.raises(TrainError, match="other settings: augment: saved 'none', now 'light'"):
        train(cfg(data, models, fold=0, epochs=3, **QUICK), guard=quiet_guard())


def test_fold_all_trains_every_fold_and_skips_finished_ones(fold_world, tmp_path):
    data, split_file = fold_world
    models = models_with_split(tmp_path, split_file)
    (models / "best_head.pt").write_bytes(b"the parent's head is never a fold's starting point")
    done = train(cfg(data, models, fold=2, **QUICK), guard=quiet_guard())
    stamp = done.last_path.stat().st_mtime_ns
    epochs = []
    results = train_folds(cfg(data, models, **QUICK), guard=quiet_guard(),
                          on_epoch_end=lambda fold, epoch, row: epochs.append((fold, epoch)))
    assert [r.fold for r in results] == [0, 1, 2] and epochs == [(0, 1), (1, 1)]  # fold 2 had finished
    assert done.last_path.stat().st_mtime_ns == stamp
    for i in range(3):
        summary = json.loads((fold_dir(models, i) / "training_summary.json").read_text())
        assert (summary["config"]["fold"], summary["config"]["train_videos"], summary["config"]["val_videos"]) == (
            i, 4, 2)
        assert summary["config"]["head_init_source"] == "default"
    # The command: every fold finished, nothing trained, each fold's summary printed.
    cli = CliRunner().invoke(main, ["train-full", "--fold", "all", "--data", str(data), "--models", str(models),
                                    "--backbone", "test_resnet", "--no-pretrained", "--image-size", str(SIZE),
                                    "--frames", "2", "--epochs", "1", "--batch-size", "2", "--accum-steps", "1",
                                    "--lr", "2e-3", "--workers", "0", "--seed", "3", "--augment", "light",
                                    "--limit-train", "4", "--limit-val", "2"])
    assert cli.exit_code == 0, cli.output
    assert [line.split(":")[0] for line in cli.output.splitlines() if line.startswith("train-full")] == [
        "train-full fold 0", "train-full fold 1", "train-full fold 2"]
    fresh = models_with_split(tmp_path / "fresh", split_file)
    with pytest.raises(TrainError, match="no fold of .* has a last.pt to continue from"):
        train_folds(cfg(data, fresh, resume="yes", **QUICK), guard=quiet_guard())


def test_fold_errors_name_the_split_file_and_the_command(fold_world, tmp_path):
    data, split_file = fold_world
    models = models_with_split(tmp_path, split_file)
    with pytest.raises(OptionError, match=r"--fold 3: .*split.json has 3 folds, numbered 0 to 2.*"
                                          r"`arena split --folds K --new-split`"):
        train(cfg(data, models, fold=3), guard=quiet_guard())
    holdout = tmp_path / "holdout"
    make_split(load_dataset(data, require_test=False), holdout, groups="none")
    for fold, call in ((0, lambda: train(cfg(data, holdout, fold=0), guard=quiet_guard())),
                       ("all", lambda: train_folds(cfg(data, holdout), guard=quiet_guard()))):
        with pytest.raises(OptionError, match=rf"--fold {fold}: .*split.json is a single train/validation holdout, "
                                              r"not K folds; make a K-fold split with `arena split --folds K "
                                              r"--new-split`"):
            call()
    with pytest.raises(OptionError, match=r"--fold 0: .*split.json does not exist; make a K-fold split"):
        train(cfg(data, tmp_path / "empty", fold=0), guard=quiet_guard())
    assert not (models / "folds").exists() and not (holdout / "folds").exists()
    assert not (tmp_path / "empty").exists()
    with pytest.raises(OptionError, match="--fold must be a fold number >= 0"):
        TrainConfig(data="d", fold=-1)
    bad = CliRunner().invoke(main, ["train-full", "--data", str(data), "--models", str(models), "--fold", "two"])
    assert bad.exit_code == 2 and "neither a fold number" in bad.output
    cli = CliRunner().invoke(main, ["train-full", "--data", str(data), "--models", str(holdout), "--fold", "1"])
    assert cli.exit_code == 1 and "arena split --folds K --new-split" in cli.output, cli.output


def test_ddp_fold_all_two_gloo_processes(fold_world, tmp_path):
    """Under torchrun every rank trains the same fold, and the process group serves every fold in turn."""
    data, _ = fold_world
    models = tmp_path / "models"
    make_split(load_dataset(data, require_test=False), models, folds=2, groups="none", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "arena",
           "train-full", "--fold", "all", "--data", str(data), "--models", str(models), "--backbone", "test_resnet",
           "--no-pretrained", "--image-size", str(SIZE), "--frames", "2", "--epochs", "1", "--batch-size", "2",
           "--accum-steps", "1", "--workers", "0", "--seed", "3", "--device", "cpu", "--limit-train", "4",
           "--limit-val", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(2):
        summary = json.loads((fold_dir(models, i) / "training_summary.json").read_text())
        assert (summary["config"]["fold"], summary["config"]["world_size"]) == (i, 2)
        assert (fold_dir(models, i) / "train.log").read_text().count("epoch 1/1:") == 1  # one writer per fold
    assert proc.stdout.count("train-full fold 1: max_epochs after epoch 1") == 1
