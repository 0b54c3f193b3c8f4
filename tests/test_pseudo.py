"""`arena.pseudo`: self-blended pseudo-fakes in training (``train-full --pseudo-fakes``, ``--train-on real``) and in
the feature cache (``features --pseudo-fakes sbi:K``), the head-side picker and the options' checks."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _layout import write_dataset
from click.testing import CliRunner

from arena.cache import CacheError, FeatureCache
from arena.cache.layout import pseudo_key, pseudo_source
from arena.cli import main
from arena.clips import ClipDataset, encode_views
from arena.data import load_dataset
from arena.errors import OptionError, TrainError
from arena.features import extract_features, provenance_for
from arena.model import create_encoder
from arena.pseudo import (
    DEFAULT_P,
    CachePseudoFakes,
    PseudoFakes,
    blend_clip,
    face_box,
    parse_cache_spec,
    parse_train_spec,
    pseudo_items,
)
from arena.sampling import uniform_indices
from arena.sbi import face_square
from arena.split import make_split
from arena.train import train
from arena.train_config import TrainConfig
from arena.train_data import AugmentClip, PseudoFakeSampler, train_dataset, training_items
from arena.tta import VARIANTS, tta_views
from arena.video import decode_uniform

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
BACKBONE = dict(backbone="test_resnet", pretrained=False, image_size=SIZE, seed=3)
COUNTS = (3, 4)


def _clip(rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """Grainy blocks: a texture a blend visibly changes."""
    base = rng.integers(0, 255, (1, SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2).repeat(n, axis=0).astype(np.int16)
    frames += rng.integers(-20, 20, frames.shape, dtype=np.int16)
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 real + 4 fake training videos, 2 test videos."""
    rng = np.random.default_rng(0)
    train_videos = ((f"train/{c}/{c}_{i}.mp4", label, _clip(rng)) for label, c in ((0, "real"), (1, "fake"))
                    for i in range(4))
    test = ((f"test/t_{i}.mp4", _clip(rng)) for i in range(2))
    return write_dataset(tmp_path_factory.mktemp("pseudo"), train_videos, test)


@pytest.fixture(scope="module")
def items(data) -> list:
    return load_dataset(data, require_test=False).train


# ---------------------------------------------------------------------------------------------------------------
# specs and options


def test_specs_parse_and_refuse_with_the_allowed_values():
    assert parse_train_spec("sbi") == PseudoFakes("sbi", DEFAULT_P) and parse_train_spec("sbi:0.25").p == 0.25
    assert parse_train_spec("sbi:0.5").spec == "sbi:0.5" and parse_train_spec("sbi").spec == "sbi:1"
    assert parse_cache_spec("sbi").k == 1 and parse_cache_spec("sbi:3").k == 3
    for bad, match in (("sbi:x", r"P must be a probability in \(0, 1\]"), ("sbi:0", r"P in \(0, 1\]"),
                       ("sbi:1.5", r"P in \(0, 1\]"), ("blend", "method must be one of sbi"), ("sbi:", "after the")):
        with pytest.raises(OptionError, match=match):
            parse_train_spec(bad)
    for bad, match in (("sbi:x", "K must be a whole number"), ("sbi:0.5", "K must be a whole number"),
                       ("sbi:0", "K >= 1"), ("sbi:-2", "K >= 1")):
        with pytest.raises(OptionError, match=match):
            parse_cache_spec(bad)


def test_cli_refuses_bad_specs_and_train_on_real_without_pseudo_fakes(data, tmp_path):
    runner = CliRunner()
    base = ["train-full", "--data", str(data), "--models", str(tmp_path / "m"), "--no-pretrained"]
    for spec, says in (("sbi:x", "P must be a probability"), ("sbi:0", "(0, 1]"), ("sbi:2", "(0, 1]")):
        res = runner.invoke(main, [*base, "--pseudo-fakes", spec])
        assert res.exit_code == 2 and says in res.output, res.output
    res = runner.invoke(main, [*base, "--train-on", "real"])
    assert res.exit_code == 1 and "--train-on real" in res.output and "--pseudo-fakes sbi" in res.output
    res = runner.invoke(main, ["features", "--data", str(data), "--no-pretrained", "--pseudo-fakes", "sbi:0"])
    assert res.exit_code == 2 and "K >= 1" in res.output
    assert not (tmp_path / "m").exists()
    with pytest.raises(OptionError, match="pseudo-fakes"):
        TrainConfig(data=str(data), train_on="real")
    assert TrainConfig(data=str(data), pseudo_fakes="sbi").pseudo_fakes == "sbi:1"


# ---------------------------------------------------------------------------------------------------------------
# training clips


def test_reals_get_twins_at_rate_p_each_epoch_seeded_by_seed_epoch_index(items):
    reals = [i for i, it in enumerate(items) if it.label == 0]
    ds = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, pseudo=PseudoFakes(p=0.3))
    drawn = [ds.is_twinned(e, i) for e in range(200) for i in reals]
    assert 0.25 < np.mean(drawn) < 0.35  # 800 draws at p 0.3
    assert not any(ds.is_twinned(e, i) for e in range(50) for i, it in enumerate(items) if it.label == 1)
    again = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, pseudo=PseudoFakes(p=0.3))
    assert [again.is_twinned(e, i) for e in range(200) for i in reals] == drawn  # a function of (seed, epoch, index)
    other = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=4, pseudo=PseudoFakes(p=0.3))
    assert [other.is_twinned(e, i) for e in range(200) for i in reals] != drawn
    always = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, pseudo=PseudoFakes())
    assert all(always.is_twinned(e, i) for e in range(20) for i in reals)  # default p 1: SBI's pairs


def test_a_twin_is_its_real_blended_before_the_same_augmentation_and_no_other_clip_changes(items):
    plain = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, augment="light")
    pseudo = PseudoFakes(p=0.5)
    ds = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, augment="light", pseudo=pseudo)
    epoch, i = 2, next(i for i, it in enumerate(items) if it.label == 0)
    twin = ds[(epoch, i, 1)]
    decoded = decode_uniform(items[i].path, 4, size=(SIZE, SIZE)).frames
    _, rng = pseudo.draw(3, epoch, i)
    want = AugmentClip("light")(blend_clip(decoded, rng, box=None), np.random.default_rng([3, epoch, i]))
    assert twin.label == 1 and twin.index == len(items) + i and twin.key == items[i].key
    assert torch.equal(twin.views[0], want) and torch.equal(ds[(epoch, i, 1)].views, twin.views)
    for key in ((epoch, i), *((epoch, j) for j in range(len(items)))):  # reals and fakes: bit for bit as without
        clip = ds[key]
        assert clip.label == items[key[1]].label and torch.equal(clip.views, plain[key].views)
    assert not torch.equal(twin.views, ds[(epoch, i)].views)
    with pytest.raises(ValueError, match="only reals"):
        ds[(epoch, next(j for j, it in enumerate(items) if it.label == 1), 1)]


@pytest.mark.parametrize("train_on", ["real", "all"])
def test_the_sampler_puts_each_twin_beside_its_real_in_one_batch(items, train_on):
    chosen = training_items(items, train_on)
    assert all(it.label == 0 for it in chosen) == (train_on == "real")
    ds = train_dataset(chosen, frames=4, size=(SIZE, SIZE), seed=3, pseudo=PseudoFakes(p=0.5))
    sampler = PseudoFakeSampler(ds, world=1, rank=0, seed=3)
    for epoch in range(1, 8):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        twinned = [i for i in range(len(chosen)) if ds.is_twinned(epoch, i)]
        assert len(sampler) == len(keys) == len(chosen) + len(twinned) and {k[0] for k in keys} == {epoch}
        assert sorted(k[1] for k in keys if len(k) == 2) == list(range(len(chosen)))  # every clip once
        for i in twinned:  # the twin right after its real, both in one batch of 2 (or any even size)
            at = keys.index((epoch, i))
            assert at % 2 == 0 and keys[at + 1] == (epoch, i, 1)
    assert list(sampler) == list(sampler)  # the order is a function of (seed, epoch)


def test_face_box_is_the_crops_face_square_else_a_random_region():
    assert face_box((32, 32), 1.3, True) == face_square((32, 32), 1.3)
    assert face_box((32, 32), 1.3, False) is None and face_box((32, 32), None, None) is None


# ---------------------------------------------------------------------------------------------------------------
# train-full


def _config(data: Path, models: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), models=str(models), backbone="test_resnet", pretrained=False, image_size=SIZE,
                frames=3, epochs=1, batch_size=2, accum_steps=1, workers=0, seed=3, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_train_on_real_trains_a_fold_on_its_reals_records_the_setting_and_resume_refuses_another(data, tmp_path):
    make_split(load_dataset(data, require_test=False), tmp_path, folds=2, groups="none", seed=0)
    result = train(_config(data, tmp_path, pseudo_fakes="sbi:0.5", train_on="real", fold=1))
    summary = json.loads(result.summary_path.read_text())
    config = summary["config"]
    assert result.summary_path.parent == tmp_path / "folds" / "fold_1"
    assert config["pseudo_fakes"] == "sbi:0.5" and config["train_on"] == "real"
    assert config["pseudo_fakes_policy"]["p"] == 0.5 and config["pseudo_fakes_policy"]["sbi"]["blend"] == [0.5, 1.0]
    assert config["train_videos"] == 2 and config["val_videos"] == 4  # fold 1's 2 reals; its validation unchanged
    assert summary["history"][0]["train_auc"] is not None  # both classes were trained on: reals and pseudo-fakes
    with pytest.raises(TrainError, match="pseudo_fakes"):
        train(_config(data, tmp_path, epochs=2, pseudo_fakes="sbi:0.25", train_on="real", fold=1))


def test_monitor_auc_keeps_the_epoch_of_the_best_validation_auc_and_is_a_resume_setting(data, tmp_path):
    make_split(load_dataset(data, require_test=False), tmp_path, val_fraction=0.5, groups="none", seed=0)
    result = train(_config(data, tmp_path, epochs=4, es_patience=4, lr=3e-3, pseudo_fakes="sbi", train_on="real",
                           monitor="auc"))
    history = [row["val_auc"] for row in result.history]
    losses = [row["val_loss"] for row in result.history]
    by_auc = min(range(4), key=lambda e: (-history[e], losses[e]))  # equal AUCs: the lower loss
    assert len(history) == 4 and result.best_epoch == 1 + by_auc
    assert int(np.argmin(losses)) != by_auc  # here the loss alone would have kept another epoch
    summary = json.loads(result.summary_path.read_text())
    assert summary["config"]["monitor"] == "auc" and summary["config"]["early_stopping"] == "val auc"
    assert torch.load(result.best_path, weights_only=True)["epoch"] == result.best_epoch
    with pytest.raises(TrainError, match="monitor"):
        train(_config(data, tmp_path, epochs=5, es_patience=4, lr=3e-3, pseudo_fakes="sbi", train_on="real"))


# ---------------------------------------------------------------------------------------------------------------
# the cache


def _features(data: Path, cache: Path, **kw):
    return extract_features(data=data, cache=cache, frame_counts=COUNTS, workers=0, device="cpu", **BACKBONE, **kw)


@pytest.fixture(scope="module")
def pseudo_cache(data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("pc") / "features.h5"
    summary = _features(data, cache, pseudo=CachePseudoFakes(k=2))
    assert summary.done == 10 and summary.pseudo == 8 and not summary.failed
    return cache


def test_the_cache_holds_k_blends_of_every_labelled_real_made_from_its_frames(data, pseudo_cache):
    with FeatureCache.open(pseudo_cache) as cache:
        reals = sorted(k for k in cache.keys if "/real/" in k)
        assert cache.pseudo_keys == sorted(pseudo_key(k, "sbi", i) for k in reals for i in range(2))
        assert len(cache.keys) == 10 and not any("#" in k for k in cache.keys)  # dataset videos only
        assert all(cache.label(k) == 1 for k in cache.pseudo_keys) and cache.info()["pseudo_fakes"] == 8
        assert cache.provenance.pseudo_fakes["copies"] == 2 and cache.provenance.pseudo_fakes["seed"] == 3
        assert cache.provenance.pseudo_fakes["method"] == "sbi" and "sbi" in cache.provenance.pseudo_fakes
        # one copy recomputed: blend of the decoded union of frames, every TTA view of the blend, the backbone
        key = reals[1]
        item = next(it for it in load_dataset(data).train if it.key == key)
        clip = ClipDataset([item], size=(SIZE, SIZE), variants=VARIANTS, frame_counts=COUNTS)[0]
        frames = blend_clip(clip.views[0], CachePseudoFakes(k=2).rng(3, key, 1), box=None)
        encoder = create_encoder("test_resnet", pretrained=False, image_size=SIZE, seed=3).eval()
        direct = encode_views(encoder, tta_views(frames, VARIANTS), device=torch.device("cpu"))
        rows = np.searchsorted(clip.frame_indices, uniform_indices(clip.num_source_frames, 4))
        for v, variant in enumerate(VARIANTS):
            cached, _ = cache.features(pseudo_key(key, "sbi", 1), 4, variant)
            np.testing.assert_allclose(cached.astype(np.float32), direct[v, rows].numpy(), rtol=2e-2, atol=2e-2)
        real, _ = cache.features(key, 4, "original")
        assert not np.array_equal(real, cache.features(pseudo_key(key, "sbi", 1), 4, "original")[0])


def test_a_resumed_pseudo_cache_is_byte_identical_and_pseudo_items_picks_training_reals_only(data, pseudo_cache,
                                                                                              tmp_path):
    cache = tmp_path / "features.h5"
    first = _features(data, cache, pseudo=CachePseudoFakes(k=2), limit=3)  # the first 3 videos in dataset order
    assert first.done == 3
    second = _features(data, cache, pseudo=CachePseudoFakes(k=2))
    assert second.skipped == 3 and second.done == 7
    assert filecmp.cmp(cache, pseudo_cache, shallow=False)
    with FeatureCache.open(cache) as c:
        train_keys = ["train/real/real_0.mp4", "train/real/real_2.mp4", "train/fake/fake_1.mp4"]
        picked = pseudo_items(c, train_keys)
        assert picked == [(pseudo_key(k, "sbi", i), 1) for k in train_keys[:2] for i in range(2)]
        assert {pseudo_source(k) for k, _ in picked} == set(train_keys[:2])
        assert pseudo_items(c, ["test/t_0.mp4"]) == []


def test_a_cache_without_pseudo_fakes_stores_no_trace_of_them_and_the_two_refuse_each_other(data, pseudo_cache,
                                                                                            tmp_path):
    plain = tmp_path / "plain.h5"
    _features(data, plain)
    with h5py.File(plain) as fh:
        assert "pseudo_fakes" not in json.loads(fh.attrs["provenance"])  # the bytes of caches made before
        assert not any("pseudo" in name for name in fh.attrs)
    with FeatureCache.open(plain) as c:
        assert c.pseudo_keys == [] and pseudo_items(c, c.keys) == []
    encoder = create_encoder("test_resnet", pretrained=False, image_size=SIZE, seed=3)
    expect = provenance_for(encoder, variants=VARIANTS, frame_counts=COUNTS)
    FeatureCache.open(pseudo_cache, expect=expect).close()  # the videos' features are the same: served
    copy = tmp_path / "copy.h5"
    shutil.copy(pseudo_cache, copy)
    with pytest.raises(CacheError, match="pseudo_fakes"):
        _features(data, copy)
    with pytest.raises(CacheError, match="pseudo_fakes"):
        _features(data, plain, pseudo=CachePseudoFakes(k=1))


# ---------------------------------------------------------------------------------------------------------------
# the heads: tune-head trains on the pseudo-fakes of its training reals, never validates on them


def test_head_data_trains_on_the_training_reals_copies_only_and_folds_never_validate_them(data, pseudo_cache,
                                                                                           tmp_path):
    from arena.cv_heads import train_folds
    from arena.head_data import load_fold_data, load_head_data
    from arena.head_train import HeadParams, HeadTrainConfig

    dataset = load_dataset(data, require_test=False)
    with FeatureCache.open(pseudo_cache) as cache:
        holdout = make_split(dataset, tmp_path / "holdout", val_fraction=0.5, groups="none", seed=0)
        d = load_head_data(cache, holdout.train, holdout.val, 3)
        reals = [it.key for it in holdout.train if it.label == 0]
        assert d.pseudo == 2 * len(reals) and d.train_keys[-d.pseudo:] == [pseudo_key(k, "sbi", i) for k in
                                                                           sorted(reals) for i in range(2)]
        assert d.train_y[-d.pseudo:].tolist() == [1] * d.pseudo and not any("#" in k for k in d.val_keys)
        plain = load_head_data(cache, holdout.train, holdout.val, 3, pseudo=False)
        assert plain.pseudo == 0 and plain.train_keys == d.train_keys[:-d.pseudo]
        torch.testing.assert_close(d.train_x[-1], torch.from_numpy(np.stack(
            [cache.features(d.train_keys[-1], 3, v)[0] for v in d.variants])))

        split = make_split(dataset, tmp_path / "folds", folds=2, groups="none", seed=0)
        f = load_fold_data(cache, split, 3)
        assert f.videos == 8 and f.pseudo == 8 and f.keys[8:] == cache.pseudo_keys
        for row in range(8, 16):  # a copy sits in its source's fold: trains the other fold's head only
            assert int(f.fold[row]) == split.fold_of[pseudo_source(f.keys[row])]
        for i in range(2):
            assert int(f.val_rows(i).max()) < 8 and f.fold_data(i).pseudo == 4
            assert set(f.train_rows(i).tolist()) >= {r for r in range(8, 16) if int(f.fold[r]) != i}
        config = HeadTrainConfig(max_epochs=2, patience=2, batch_size=4, seed=0)
        result = train_folds(HeadParams(frames=3, attn_dim=8, dropout=0.0, lr=1e-3, weight_decay=0.0), f,
                             config=config)
        assert result.oof_probs.shape == (8,) and np.isfinite(result.oof_probs).all()


def test_tune_head_uses_the_caches_pseudo_fakes_under_its_own_study_and_frame_test_follows(data, pseudo_cache,
                                                                                          tmp_path):
    models = tmp_path / "models"
    make_split(load_dataset(data, require_test=False), models, folds=2, groups="none", seed=0)
    base = ["--cache", str(pseudo_cache), "--data", str(data), "--models", str(models)]
    tune = ["tune-head", *base, "--n-trials", "1", "--epochs", "2", "--patience", "1", "--batch-size", "4",
            "--frames", "3", "--device", "cpu"]
    result = CliRunner().invoke(main, tune)
    assert result.exit_code == 0, result.output
    summary = json.loads((models / "study_summary.json").read_text())
    assert summary["study_name"].endswith("-cv2-sbi") and summary["pseudo_fakes"]["items_used"] == 8
    assert summary["pseudo_fakes"]["copies"] == 2 and "8 pseudo-fake items" in result.output
    oof = (models / "oof_predictions.csv").read_text().splitlines()
    assert len(oof) == 1 + 8 and not any("#" in line for line in oof)
    result = CliRunner().invoke(main, ["frame-test", *base, "--frames", "3,4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((models / "frame_test.json").read_text())["pseudo_fakes"] is True
    result = CliRunner().invoke(main, [*tune, "--no-pseudo-fakes"])
    assert result.exit_code == 0, result.output
    summary = json.loads((models / "study_summary.json").read_text())
    assert summary["study_name"].endswith("-cv2") and summary["pseudo_fakes"] is None


# ---------------------------------------------------------------------------------------------------------------
# tools/bench_pseudo.py


def test_bench_pseudo_quick_runs_and_reports_auc_per_family(tmp_path):
    """Smoke run of the bench (tiny demo data, test_resnet, one epoch, the SBI-only run): its table and JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_pseudo.py"), "--quick", "--runs", "real+sbi",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench_pseudo.json").read_text())
    (row,) = report["rows"]
    assert row["run"] == "real+sbi" and row["train_on"] == "real" and row["pseudo_fakes"] == "sbi:1"
    assert set(row["test_auc"]) == {"blend", "splice", "all"} and row["train_cpu_minutes"] > 0
    assert "| real+sbi | real | sbi:1 |" in proc.stdout and "within 10 CPU-min" in proc.stdout
