"""`arena submit --verify`: the full-video path against the cache path, same weights and fine-tuned."""

from __future__ import annotations

import pytest
from _world import World, build_world

from arena.data import load_dataset
from arena.errors import OptionError, SubmissionError
from arena.predict import load_model, predict_items
from arena.submit import make_submission
from arena.verify import sample_keys, verify_against_cache


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def test_sample_keys_is_seeded_and_keeps_input_order():
    keys = [f"k{i}" for i in range(10)]
    a = sample_keys(keys, 4, seed=1)
    assert a == sample_keys(keys, 4, seed=1) and len(set(a)) == 4
    assert a == sorted(a, key=keys.index)
    assert sample_keys(keys, None, seed=0) == keys and sample_keys(keys, 99, seed=0) == keys
    with pytest.raises(OptionError, match="--verify-sample must be >= 1, got 0"):
        sample_keys(keys, 0, seed=0)


def test_verify_reports_max_difference(world: World):
    model = load_model(world.models)
    items = load_dataset(world.data).test
    preds = predict_items(items, model, workers=0, progress=False).predictions
    res = verify_against_cache(model, world.cache, preds, items=items, sample=2, seed=0)
    assert res.ok and res.mode == "cache-features" and len(res.keys) == 2 and res.max_abs_diff <= 1e-3
    # A full-path result that disagrees with the cache fails verification.
    preds[0].p_fake = min(1.0, preds[0].p_fake + 0.01)
    res = verify_against_cache(model, world.cache, preds, items=items, sample=None, seed=0)
    assert not res.ok and res.max_abs_diff == pytest.approx(0.01, abs=1e-3)
    # A video the full path predicted through a fallback saw other frames: not compared, and said why.
    preds[1].fallback = "16 frames"
    res = verify_against_cache(model, world.cache, preds, items=items, sample=None, seed=0)
    assert preds[1].key not in res.keys and "full path used a fallback (16 frames" in res.skipped[preds[1].key]
    with pytest.raises(SubmissionError, match="holds frame counts \\(4,\\), the submission uses 8"):
        verify_against_cache(load_model(world.models, frames=8), world.cache, preds, items=items)
    with pytest.raises(SubmissionError, match="--verify .*nope.h5"):
        verify_against_cache(model, world.cache.parent / "nope.h5", preds, items=items)


def test_submit_finetuned_verifies_preprocessing_and_head(world: World, tmp_path):
    res = make_submission(data=world.data, models=world.models_ft, out=tmp_path / "P.CSV", verify=world.cache,
                          verify_sample=3, workers=0, device="cpu", progress=False, echo=None)
    v = res.verify
    assert v.mode == "finetuned" and v.ok and len(v.keys) == 3
    assert v.max_feature_diff <= 1e-2 and v.max_abs_diff <= 1e-3
    assert any("decode/TTA/preprocess agree" in line for line in v.lines)
