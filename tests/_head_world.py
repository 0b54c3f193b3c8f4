"""A small synthetic feature cache for the head-tuning tests (test_head_train, test_study, test_frame_test,
test_cv_tune).

80 placeholder videos (40 real, 40 fake), a split in ``models/split.json`` and ``cache.h5`` with separable
features at the tiny scale of a random backbone; one training video's extraction failed. ``cv_setup`` adds a
3-fold split of the same videos in ``models_cv/split.json`` (the cache serves both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arena.cache import FEATURE_FORMAT, CacheWriter, FeatureCache, Provenance
from arena.data import load_dataset
from arena.head_data import HeadDataStore
from arena.head_train import HeadTrainConfig
from arena.sampling import sampling_spec, union_indices
from arena.split import make_split

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")
DIM = 16
FRAMES = (6, 8)
FAST = HeadTrainConfig(max_epochs=12, patience=3, batch_size=16, seed=0)


def make_layout(root: Path, n_per_class: int) -> Path:
    """Placeholder videos (never decoded: the features come from the cache) and their CSVs."""
    for sub in ("train/real", "train/fake", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_per_class):
        for cls, lab in (("real", 0), ("fake", 1)):
            (root / f"train/{cls}/{cls[0]}{i:03d}.mp4").write_bytes(b"\x00")
            rows.append(f"{cls[0]}{i:03d}.mp4,{lab}")
    (root / "test/t000.mp4").write_bytes(b"\x00")
    (root / "train_labels.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    (root / "test_public.csv").write_text("filename\nt000.mp4\n")
    return root


def video_features(key: str, label: int, n: int, idx: np.ndarray, *, shift: float) -> np.ndarray:
    """[V, U, d]: noise at the tiny scale of a random backbone, plus a class-dependent shift in 3 dims."""
    rng = np.random.default_rng(sum(map(ord, key)))
    x = rng.standard_normal((len(VARIANTS), len(idx), DIM)) * 0.01
    x[:, :, :3] += (2 * label - 1) * shift * 0.01
    return x.astype(np.float16)


def provenance() -> Provenance:
    return Provenance(backbone="test_vit", weights_source="random:seed=0", weights_hash="ab" * 32,
                      input_size=(96, 96), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                      decoder={"device": "cpu", "resize": "tensor"}, tta={}, variants=VARIANTS,
                      sampling=sampling_spec(), frame_counts=FRAMES, feature_dim=DIM, feature_format=FEATURE_FORMAT)


def build_world(root: Path) -> dict:
    """data/, models/split.json and cache.h5 under ``root``; returns their paths, the split and the failed key."""
    data = make_layout(root / "data", 40)
    models = root / "models"
    split = make_split(load_dataset(data), models)
    cache = root / "cache.h5"
    failed = split.train[0].key
    with CacheWriter(cache, provenance()) as w:
        for j, item in enumerate(split.train + split.val):
            if item.key == failed:
                w.write_failure(item.key, label=item.label, message="could not decode")
                continue
            n = 5 + (j * 7) % 30  # n < 8 for some: repeated indices, masked frames
            idx = union_indices(n, FRAMES)
            w.write(item.key, features=video_features(item.key, item.label, n, idx, shift=0.8), frame_indices=idx,
                    num_source_frames=n, label=item.label)
    return {"root": root, "data": data, "models": models, "cache": cache, "split": split, "failed": failed}


def copy_split(setup: dict, models: Path) -> Path:
    """A fresh models folder holding only the world's split (of ``cv_setup``: its 3-fold split)."""
    models.mkdir(parents=True, exist_ok=True)
    (models / "split.json").write_bytes((setup["models"] / "split.json").read_bytes())
    return models


# Fixtures of the three head-tuning test files, registered for the suite by tests/conftest.py
# (`pytest_plugins`); the files ask for `one_thread` with `pytestmark = pytest.mark.usefixtures("one_thread")`.


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, and CI cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The world of `build_world`, built once per test module."""
    return build_world(tmp_path_factory.mktemp("head_world"))


@pytest.fixture(scope="module")
def store(setup) -> HeadDataStore:
    return HeadDataStore.from_cache(FeatureCache.open(setup["cache"]), setup["split"])


@pytest.fixture(scope="module")
def cv_setup(setup) -> dict:
    """The world plus a 3-fold split of its videos in ``models_cv`` (``split``: that split)."""
    models = setup["root"] / "models_cv"
    return {**setup, "models": models, "split": make_split(load_dataset(setup["data"]), models, folds=3)}


@pytest.fixture(scope="module")
def cv_store(cv_setup) -> HeadDataStore:
    return HeadDataStore.from_cache(FeatureCache.open(cv_setup["cache"]), cv_setup["split"])
