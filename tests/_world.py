"""The tiny "world" of the full-video path tests, built once per test session and shared by test_predict,
test_evaluate, test_verify and test_submit: a generated demo dataset, a feature cache of a tiny random backbone,
a head-only model and a fine-tuned checkpoint, each written by the models folder's own checkpoint types."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arena.cache import FeatureCache
from arena.data import load_dataset
from arena.demo import generate_dataset
from arena.features import extract_features
from arena.model import Detector, DetectorHead, create_encoder
from arena.models_folder import (
    BEST_HEAD_FILE,
    FRAME_TEST_FILE,
    SPLIT_FILE,
    DetectorCheckpoint,
    HeadCheckpoint,
    finetuned_name,
)
from arena.split import make_split

BACKBONE = "test_resnet"  # tiny timm model: the tests exercise the path, not the accuracy
IMAGE_SIZE = 64
FRAMES = 4


@dataclass
class World:
    root: Path
    data: Path
    cache: Path
    models: Path  # head-only model (best_head.pt) + frame_test.json + split.json
    models_ft: Path  # fine-tuned checkpoint + frame_test.json + split.json


def save_head_only(cache_path: Path, models: Path, *, seed: int = 0, frames: int = FRAMES) -> Path:
    """A head-only model as tune-head leaves it (a `HeadCheckpoint`), without running a study."""
    cache = FeatureCache.open(cache_path)
    torch.manual_seed(seed)
    head = DetectorHead(cache.provenance.feature_dim, attn_dim=16, hidden=16, dropout=0.3)
    feats = np.concatenate([cache.features(k, frames, "original")[0] for k in cache.keys if k.startswith("train/")])
    head.set_feature_stats(feats.astype(np.float32).mean(0), feats.astype(np.float32).std(0))
    return HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=frames,
                          provenance=cache.provenance.to_dict()).save(models / BEST_HEAD_FILE)


def save_finetuned(models: Path, *, seed: int = 1) -> Path:
    """A train-full checkpoint (a `DetectorCheckpoint`: encoder + head of a Detector), named as train-full names it."""
    enc = create_encoder(BACKBONE, pretrained=False, image_size=IMAGE_SIZE, seed=seed)
    torch.manual_seed(seed)
    head = DetectorHead(enc.feature_dim, attn_dim=16, hidden=16, dropout=0.3)
    cfg = {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "frames": FRAMES, "head": head.config(),
           "pretrained": False, "weights": None, "seed": seed}
    return DetectorCheckpoint(epoch=1, model_state_dict=Detector(enc, head).state_dict(), config=cfg, val_acc=0.5,
                              val_f1=0.5, val_auc=0.5).save(models / finetuned_name(BACKBONE))


def build_world(base: Path) -> World:
    """Build (once; later calls reuse it) the shared tiny world under ``base``."""
    root = base / "submit_world"
    world = World(root, root / "data", root / "features.h5", root / "models", root / "models_ft")
    if (root / "done").exists():
        return world
    if root.exists():
        shutil.rmtree(root)
    generate_dataset(world.data, n_train_real=2, n_train_fake=2, n_test=4, seconds=0.6, size=(64, 64), fps=10,
                     seed=3, workers=1, progress=False)
    make_split(load_dataset(world.data), world.models)  # the cache serves every split; evaluate needs this one
    extract_features(data=world.data, cache=world.cache, frame_counts=(FRAMES,),
                     backbone=BACKBONE, pretrained=False, image_size=IMAGE_SIZE, seed=0, device="cpu", workers=0)
    save_head_only(world.cache, world.models)
    world.models_ft.mkdir()
    save_finetuned(world.models_ft)
    shutil.copy(world.models / SPLIT_FILE, world.models_ft / SPLIT_FILE)
    for m in (world.models, world.models_ft):
        (m / FRAME_TEST_FILE).write_text(json.dumps({"recommended_frames": FRAMES}))
    (root / "done").write_text("ok")
    return world

