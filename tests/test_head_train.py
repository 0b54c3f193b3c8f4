"""Cached features in memory (arena.head_data) and one head's training on them (arena.head_train)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _head_world import DIM, FAST, FRAMES, VARIANTS, copy_split

from arena.cache import FeatureCache
from arena.data import load_dataset
from arena.errors import CacheError, DataError, ModelsError, OptionError
from arena.head_data import HeadData, load_head_data, open_head_data
from arena.head_train import HeadParams, HeadTrainConfig, train_head
from arena.models_folder import HeadCheckpoint
from arena.split import make_split

# ------------------------------------------------------------------------------------------------ data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_data_from_cache(setup, store):
    data = store.get(8)
    split = setup["split"]
    assert data.train_x.dtype == torch.float16
    assert tuple(data.train_x.shape[1:]) == (len(VARIANTS), 8, DIM)
    assert data.val_x.shape[1] == 1  # validation: the original view only
    assert setup["failed"] in data.skipped and setup["failed"] not in data.train_keys
    assert data.train_x.shape[0] == len(split.train) - 1 and data.val_x.shape[0] == len(split.val)
    assert not set(data.val_keys) & set(data.train_keys)
    assert [int(y) for y in data.val_y] == [i.label for i in split.val]
    mean, std = data.feature_stats()
    assert mean.shape == (DIM,) and (std > 0).all()
    assert store.provenance["backbone"] == "test_vit" and store.provenance["frame_counts"] == list(FRAMES)
    with pytest.raises(OptionError, match=r"frame counts \[7\] are not in the cache \(it holds \(6, 8\)\)"):
        store.get(7)


def test_a_cache_built_before_a_new_split_serves_it_unchanged(setup, tmp_path):
    """The cache does not depend on the split: after `arena split --new-split --seed 7` it is read as it is."""
    cache_bytes = setup["cache"].read_bytes()
    models = copy_split(setup, tmp_path / "models")
    new = make_split(load_dataset(setup["data"]), models, seed=7, new=True)
    assert new.sha256 != setup["split"].sha256 and new.val != setup["split"].val
    store, split = open_head_data(setup["cache"], setup["data"], models, device="cpu")
    assert split.sha256 == new.sha256
    data = store.get(6)
    assert data.val_keys == [i.key for i in new.val if i.key != setup["failed"]]
    assert setup["cache"].read_bytes() == cache_bytes  # used unchanged, not rebuilt


def test_cache_and_split_that_disagree_are_refused(setup):
    cache = FeatureCache.open(setup["cache"])
    split = setup["split"]
    with pytest.raises(CacheError, match="frames=7 is not in .*cache.h5.*arena features --frames"):
        load_head_data(cache, split.train, split.val, 7)
    with pytest.raises(CacheError, match=r"validation variants \['sepia'\] are not in"):
        load_head_data(cache, split.train, split.val, 6, val_variants=("sepia",))
    flipped = [dataclasses.replace(split.val[0], label=1 - split.val[0].label), *split.val[1:]]
    with pytest.raises(CacheError, match="the split says label .* rebuild it with `arena features`"):
        load_head_data(cache, split.train, flipped, 6)
    ghost = [*split.val, dataclasses.replace(split.val[0], key="train/real/ghost.mp4")]
    with pytest.raises(CacheError, match="1 val video\\(s\\) of the split are not in .*ghost.mp4.*arena features"):
        load_head_data(cache, split.train, ghost, 6)


def test_open_head_data_needs_a_cache_and_makes_a_missing_split(setup, tmp_path):
    with pytest.raises(CacheError):
        open_head_data(tmp_path / "missing.h5", setup["data"], setup["models"], device="cpu")
    # No split file yet: the default one (seed 42, 70:30) is made, as train-full does.
    _, split = open_head_data(setup["cache"], setup["data"], tmp_path, device="cpu")
    assert (tmp_path / "split.json").is_file() and split.seed == 42
    # An existing split is used whatever seed made it (`arena split --seed 7`), not refused.
    (tmp_path / "split.json").unlink()
    make_split(load_dataset(setup["data"], require_test=False), tmp_path, seed=7)
    assert open_head_data(setup["cache"], setup["data"], tmp_path, device="cpu")[1].seed == 7
    with pytest.raises(OptionError, match="Invalid device"):
        open_head_data(setup["cache"], setup["data"], setup["models"], device="gpu")


# ------------------------------------------------------------------------------------------------ training


def test_input_dropout_reaches_the_head(store):
    base = HeadParams(attn_dim=64, lr=1e-3, frames=8)
    plain = train_head(base, store.get(8), config=FAST)
    dropped = train_head(dataclasses.replace(base, input_dropout=0.6), store.get(8), config=FAST)
    assert dropped.head_config["input_dropout"] == 0.6 and plain.head_config["input_dropout"] == 0.0
    assert dropped.history != plain.history  # the option acts in the training loop
    assert dropped.metrics["auc"] >= 0.9  # and the head still learns the separable features through it
    with pytest.raises(OptionError, match="input_dropout"):
        HeadParams(input_dropout=1.0)


def test_training_is_deterministic_and_the_checkpoint_round_trips(store, tmp_path):
    params = HeadParams(attn_dim=64, lr=1e-3, frames=8)
    a = train_head(params, store.get(8), config=FAST)
    b = train_head(params, store.get(8), config=FAST)
    assert a.val_loss == b.val_loss and a.history == b.history
    epochs = []
    train_head(params, store.get(8), config=FAST, on_epoch=lambda e, loss: epochs.append((e, loss)))
    assert epochs == list(enumerate(a.history))  # the callback sees every epoch's validation loss
    path = tmp_path / "head.pt"
    HeadCheckpoint(config=a.head_config, state_dict=a.state_dict, frames=8, params=params.to_dict(),
                   metrics=a.metrics, provenance=store.provenance).save(path)
    ckpt = HeadCheckpoint.load(path)
    assert ckpt.frames == 8 and ckpt.params["attn_dim"] == 64 and ckpt.provenance["backbone"] == "test_vit"
    head = ckpt.build()
    d = store.get(8)
    with torch.no_grad():
        p = torch.softmax(head(d.val_x[:, 0], d.val_mask)[0], -1)[:, 1].numpy()
    np.testing.assert_allclose(p, a.val_probs, rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelsError, match="bad.pt: cannot be loaded"):
        HeadCheckpoint.load(tmp_path / "bad.pt")


def test_precision_follows_the_runtime_policy(store):
    params = HeadParams(attn_dim=64, lr=1e-3, frames=6)
    fp32 = train_head(params, store.get(6), config=dataclasses.replace(FAST, max_epochs=2, precision="fp32"))
    auto = train_head(params, store.get(6), config=dataclasses.replace(FAST, max_epochs=2))
    bf16 = train_head(params, store.get(6), config=dataclasses.replace(FAST, max_epochs=2, precision="bf16"))
    assert np.isfinite(bf16.val_loss) and bf16.history != fp32.history  # bf16 really runs in bf16
    from arena.runtime import autocast_dtype

    if autocast_dtype(torch.device("cpu"), "auto") is None:  # no native bf16 here: auto is fp32
        assert auto.history == fp32.history
    with pytest.raises(OptionError, match="Invalid precision \\(fp8\\)"):
        HeadTrainConfig(precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="fp16 needs a CUDA device"):
            train_head(params, store.get(6), config=dataclasses.replace(FAST, precision="fp16"))


def test_bad_inputs_are_refused(store):
    good = store.get(6)
    with pytest.raises(DataError, match="needs both classes"):
        HeadData(6, VARIANTS, good.train_x, good.train_mask, torch.zeros_like(good.train_y), good.val_x,
                 good.val_mask, good.val_y)
    with pytest.raises(ValueError, match="params ask for 8 frames but the data has 6"):
        train_head(HeadParams(frames=8), good)
    with pytest.raises(OptionError, match="max_epochs, patience and batch_size must be >= 1"):
        HeadTrainConfig(batch_size=0)
    assert HeadTrainConfig.from_dict({**dataclasses.asdict(FAST), "other": 1}) == FAST
    assert json.loads(json.dumps(HeadParams().to_dict())) == HeadParams().to_dict()
