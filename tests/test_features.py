"""The features stage: cache contents equal the full-video path, resume, failures, refusal of a mismatch."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _layout import write_dataset
from click.testing import CliRunner

from arena.cache import CacheError, FeatureCache, merge_shards, shard_path
from arena.cache.provenance import DROPPED_V1_FIELDS, V1_BUILT_WITH
from arena.cli import main
from arena.clips import ClipDataset, encode_views
from arena.features import extract_features, provenance_for
from arena.model import create_encoder
from arena.tta import VARIANTS, tta_views
from arena.video import decode_uniform

BACKBONE = dict(backbone="test_resnet", pretrained=False, image_size=32, seed=3)
COUNTS = (4, 6, 8)


def _clip(rng: np.random.Generator, n: int, size: int = 48) -> np.ndarray:
    base = rng.integers(0, 255, (1, size // 8, size // 8, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2).repeat(n, axis=0).astype(np.int16)
    frames += rng.integers(-20, 20, frames.shape, dtype=np.int16)  # grain, different in every frame
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    train = ((f"train/{c}/{c}_{i}.mp4", label, _clip(rng, 20 + 5 * i)) for label, c in ((0, "real"), (1, "fake"))
             for i in range(3))
    test = ((f"test/t_{i}.mp4", _clip(rng, 3 if i == 0 else 30)) for i in range(2))  # 3 frames: fewer than k
    return write_dataset(tmp_path_factory.mktemp("data"), train, test)


def _run(data: Path, out: Path, **kw):
    return extract_features(
        data=data, cache=out / "features.h5", frame_counts=COUNTS, workers=0, device="cpu",
        **BACKBONE, **kw,
    )


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built")
    summary = _run(tiny_data, out)
    assert summary.done == 8 and not summary.failed
    assert not (out / "models").exists()  # features neither need nor make a split
    return out


def test_cache_equals_full_video_path(tiny_data, built):
    """For every k the cached rows are the features of a direct k-frame decode of the same video."""
    encoder = create_encoder(BACKBONE["backbone"], pretrained=False, image_size=32, seed=3).eval()
    cache = FeatureCache.open(built / "features.h5")
    assert len(cache.keys) == 8
    for key in ("train/real/real_2.mp4", "test/t_0.mp4", "test/t_1.mp4"):
        for k in COUNTS:
            clip = decode_uniform(tiny_data / key, k, size=encoder.input_size)
            direct = encode_views(encoder, tta_views(clip.frames), device=torch.device("cpu"))
            for v, variant in enumerate(VARIANTS):
                cached, mask = cache.features(key, k, variant)
                np.testing.assert_allclose(cached.astype(np.float32), direct[v].numpy(), rtol=2e-2, atol=2e-2)
                np.testing.assert_array_equal(mask, clip.valid)


def test_short_video_is_masked(built):
    cache = FeatureCache.open(built / "features.h5")
    _, mask = cache.features("test/t_0.mp4", 8, "original")
    assert mask.sum() == 3  # three distinct frames, the rest are repeats


def test_resume_gives_identical_cache(tiny_data, built, tmp_path):
    first = _run(tiny_data, tmp_path, limit=3)
    assert first.done == 3
    second = _run(tiny_data, tmp_path)
    assert second.skipped == 3 and second.done == 5
    assert filecmp.cmp(tmp_path / "features.h5", built / "features.h5", shallow=False)


def test_failed_video_is_recorded_and_run_continues(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "test" / "broken.mp4").write_text("this is not a video\n" * 10)
    with open(data / "test_public.csv", "a") as f:
        f.write("test/broken.mp4\n")
    summary = _run(data, tmp_path / "out")
    assert list(summary.failed) == ["test/broken.mp4"]
    assert summary.done == 8
    cache = FeatureCache.open(tmp_path / "out" / "features.h5")
    assert "test/broken.mp4" in cache.failures()


def test_mismatched_cache_is_refused(tiny_data, built, tmp_path):
    shutil.copytree(built, tmp_path / "b")
    with pytest.raises(CacheError, match="weights"):
        extract_features(data=tiny_data, cache=tmp_path / "b" / "features.h5", frame_counts=COUNTS, workers=0,
                         device="cpu", backbone="test_resnet", pretrained=False, image_size=32, seed=4)


def test_dataset_needs_exactly_one_frame_spec(tiny_data):
    with pytest.raises(ValueError, match="exactly one"):
        ClipDataset([], size=(32, 32), variants=VARIANTS)
    with pytest.raises(ValueError, match=">= 1"):
        ClipDataset([], size=(32, 32), variants=VARIANTS, frames=0)


def test_cli_refuses_impossible_frames(tiny_data, tmp_path):
    res = CliRunner().invoke(main, ["features", "--data", str(tiny_data), "--frames", "0,8", "--no-pretrained"])
    assert res.exit_code == 2 and "1..512" in res.output


def test_shards_merge_to_the_one_process_cache(tiny_data, built, tmp_path):
    """Two processes' shards (--shard 0/2, 1/2) merge into a file byte-identical to the one-process cache."""
    for i in range(2):
        _run(tiny_data, tmp_path, shard=(i, 2))
    merge_shards(tmp_path / "merged.h5", [shard_path(tmp_path / "features.h5", i, 2) for i in range(2)])
    assert filecmp.cmp(tmp_path / "merged.h5", built / "features.h5", shallow=False)


def test_format1_fields_are_what_the_code_applies_today():
    """A format-1 cache is read as built with V1_BUILT_WITH: that must be what provenance_for gives now."""
    encoder = create_encoder(BACKBONE["backbone"], pretrained=False, image_size=32, seed=3)
    live = provenance_for(encoder, variants=VARIANTS, frame_counts=COUNTS).to_dict()
    assert {name: live[name] for name in V1_BUILT_WITH} == V1_BUILT_WITH


def _as_format1(path: Path) -> None:
    """Rewrite a cache's provenance attributes as the format-1 release stored them."""
    with h5py.File(path, "r+") as fh:
        prov = json.loads(fh.attrs["provenance"])
        for name in ("decoder", "sampling", "feature_format"):
            del prov[name], fh.attrs[f"provenance.{name}"]
        prov.update(interpolation="bilinear", arena_version="0.1.0", split_sha256="ab" * 32)
        assert set(DROPPED_V1_FIELDS) <= set(prov)
        fh.attrs["format_version"] = 1
        fh.attrs["provenance"] = json.dumps(prov, sort_keys=True, separators=(",", ":"))
        for name, value in prov.items():
            fh.attrs[f"provenance.{name}"] = json.dumps(value, sort_keys=True)


def test_format1_cache_is_used_unchanged(tiny_data, built, tmp_path):
    """A cache written by the release that stored the split's hash: a rerun of features adds nothing and leaves the
    file untouched, and its features read as before."""
    cache = tmp_path / "features.h5"
    shutil.copy(built / "features.h5", cache)
    _as_format1(cache)
    before, mtime = cache.read_bytes(), cache.stat().st_mtime_ns
    summary = _run(tiny_data, tmp_path)
    assert summary.skipped == 8 and summary.done == 0
    assert cache.read_bytes() == before and cache.stat().st_mtime_ns == mtime
    with FeatureCache.open(cache) as old, FeatureCache.open(built / "features.h5") as new:
        assert old.provenance == new.provenance
        np.testing.assert_array_equal(old.batch(old.keys, 6)[0], new.batch(new.keys, 6)[0])


def test_cache_outlives_new_splits(tiny_data, built, tmp_path):
    """`arena split` with another seed, then `--new-split`: the cache is used unchanged by tune-head and features."""
    cache, models = tmp_path / "features.h5", tmp_path / "models"
    shutil.copy(built / "features.h5", cache)
    before, mtime = cache.read_bytes(), cache.stat().st_mtime_ns
    runner = CliRunner()
    features = ["features", "--data", str(tiny_data), "--cache", str(cache), "--frames", ",".join(map(str, COUNTS)),
                "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--seed", "3", "--workers", "0",
                "--device", "cpu"]
    tune = ["tune-head", "--data", str(tiny_data), "--cache", str(cache), "--models", str(models), "--n-trials", "1",
            "--epochs", "1", "--frames", "4", "--device", "cpu"]
    splits = []
    for split in (["--seed", "1"], ["--seed", "2", "--new-split"], ["--seed", "3", "--new-split"]):
        res = runner.invoke(main, ["split", "--data", str(tiny_data), "--out", str(models), *split])
        assert res.exit_code == 0, res.output
        splits.append((models / "split.json").read_text())
        res = runner.invoke(main, tune)
        assert res.exit_code == 0, res.output
        assert "best trial" in res.output and (models / "best_head.pt").exists()
        res = runner.invoke(main, features)
        assert res.exit_code == 0, res.output
        assert "done 0 (partial 0), skipped (already cached) 8" in res.output
        assert cache.read_bytes() == before and cache.stat().st_mtime_ns == mtime
    assert len(set(splits)) > 1  # the splits really differed
