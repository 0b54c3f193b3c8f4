"""Full-video path: model loading from the models folder, the shared head step and the OOM fallback chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _world import FRAMES, IMAGE_SIZE, World, build_world, save_finetuned

from arena.cache import FeatureCache
from arena.data import load_dataset
from arena.errors import ModelsError, OptionError, PredictError
from arena.models_folder import BEST_HEAD_FILE, DetectorCheckpoint, HeadCheckpoint
from arena.predict import head_probabilities, load_model, predict_items


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------------------------------------------- loading


def test_load_model_prefers_finetuned_and_checks_weights_hash(world: World, tmp_path):
    ft = load_model(world.models_ft)
    assert ft.kind == "finetuned" and not ft.round_fp16 and ft.frames == FRAMES and len(ft.variants) == 5
    assert ft.frames_source.endswith("frame_test.json") and ft.info["epoch"] == 1
    assert ft.encoder.input_size == (IMAGE_SIZE, IMAGE_SIZE)
    ho = load_model(world.models, tta=False, frames=6)
    assert ho.kind == "head-only" and ho.round_fp16 and ho.variants == ("original",)
    assert (ho.frames, ho.frames_source) == (6, "--frames option")
    assert ho.encoder.weights_hash() == ho.cache_provenance["weights_hash"]

    # A head tuned on other features (the cache's weights hash differs) is refused, naming both hashes.
    bad = HeadCheckpoint.load(world.models / BEST_HEAD_FILE)
    bad.provenance = {**bad.provenance, "weights_hash": "0" * 64}
    bad.save(tmp_path / BEST_HEAD_FILE)
    with pytest.raises(PredictError, match="weights hash .* the cache was built with 000000000000"):
        load_model(tmp_path)
    with pytest.raises(ModelsError, match="no model in .*empty"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelsError, match="no <backbone>_best.pt in .*use --model head-only"):
        load_model(tmp_path, kind="finetuned")
    with pytest.raises(OptionError, match=r"Invalid model kind \(best\)"):
        load_model(tmp_path, kind="best")


def test_load_model_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"format": "arena.head/1", "state_dict": Evil()}, tmp_path / BEST_HEAD_FILE)
    with pytest.raises(ModelsError, match="best_head.pt: cannot be loaded with weights_only=True"):
        load_model(tmp_path, kind="head-only")


def test_finetuned_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path):
    path = save_finetuned(tmp_path)
    ckpt = DetectorCheckpoint.load(path)
    ckpt.config = {**ckpt.config, "head": {**ckpt.config["head"], "hidden": 8}}  # weights were saved with 16
    ckpt.save(path)
    with pytest.raises(ModelsError, match=r"test_resnet_best.pt: the weights do not fit .*rerun `arena train-full`"):
        load_model(tmp_path)
    ckpt.config = {k: v for k, v in ckpt.config.items() if k != "head"}  # a key nothing else would supply
    ckpt.save(path)
    with pytest.raises(ModelsError, match="config must name the backbone and the head configuration"):
        load_model(tmp_path)


def test_frame_test_json_that_cannot_be_read_names_the_file(tmp_path):
    (tmp_path / "frame_test.json").write_text("{}")
    with pytest.raises(ModelsError, match="frame_test.json: cannot read recommended_frames"):
        load_model(tmp_path)
    (tmp_path / "frame_test.json").write_text(json.dumps({"recommended_frames": 32}))
    with pytest.raises(ModelsError, match="no model in"):  # the frame count resolves, then the model is missing
        load_model(tmp_path)


def test_head_probabilities_same_for_cache_and_full_path_features(world: World):
    model = load_model(world.models)
    cache = FeatureCache.open(world.cache)
    key = cache.keys[0]
    f16 = np.stack([cache.features(key, FRAMES, v)[0] for v in model.variants])
    mask = cache.features(key, FRAMES, "original")[1]
    p_cache, attn = head_probabilities(model.head, f16, mask)
    p_full, _ = head_probabilities(model.head, torch.from_numpy(f16.astype(np.float32)), mask, round_fp16=True)
    assert p_cache.shape == (5,) and attn.shape == (5, FRAMES)
    np.testing.assert_array_equal(p_cache, p_full)
    np.testing.assert_allclose(attn.sum(1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- OOM fallback


def _patch_forward(monkeypatch, encoder, fail):
    """Make ``encoder`` raise ``fail(n_frames, call_no)`` (an exception or None) before computing."""
    calls = {"n": 0}
    original = encoder.forward

    def forward(frames):
        calls["n"] += 1
        exc = fail(frames.shape[0], calls["n"])
        if exc is not None:
            raise exc
        return original(frames)

    monkeypatch.setattr(encoder, "forward", forward)
    return calls


def _items(w: World, n: int = 1) -> list:
    return load_dataset(w.data).test[:n]


def test_frame_batch_and_precision_do_not_change_the_prediction(world: World, monkeypatch):
    model = load_model(world.models)
    ref = predict_items(_items(world), model, workers=0, progress=False).predictions[0]
    calls = _patch_forward(monkeypatch, model.encoder, lambda n, call: None)
    run = predict_items(_items(world), model, workers=0, frame_batch=3, precision="fp32", progress=False)
    assert calls["n"] == 7  # 4 frames x 5 variants = 20 frames in forwards of 3
    assert run.frames_encoded == 20 and run.predictions[0].p_fake == pytest.approx(ref.p_fake, abs=1e-6)
    with pytest.raises(OptionError, match=r"--frame-batch must be >= 1, got 0"):
        predict_items(_items(world), model, workers=0, frame_batch=0, progress=False)
    with pytest.raises(OptionError, match="fp16 needs a CUDA device"):
        predict_items(_items(world), model, workers=0, precision="fp16", progress=False)


def test_oom_once_is_retried_after_clearing(world: World, monkeypatch):
    model = load_model(world.models)
    _patch_forward(monkeypatch, model.encoder,
                   lambda n, call: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                   if call == 1 else None)
    run = predict_items(_items(world), model, workers=0, progress=False)
    (pred,) = run.predictions
    assert pred.fallback == "retry" and pred.status == "ok" and pred.frames_used == FRAMES
    assert len(pred.variant_p) == 5 and "CUDA out of memory" in pred.error
    assert run.fallbacks == {"retry": 1}


def test_oom_walks_to_16_frames_then_one_variant_then_half(world: World, monkeypatch):
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 9663676416 bytes.")
    # 20 frames x 5 variants = 100 frames per batch: fails; 16 x 5 = 80 passes -> the 16-frame fallback.
    model = load_model(world.models, frames=20)
    _patch_forward(monkeypatch, model.encoder, lambda n, call: cpu_oom if n > 80 else None)
    (pred,) = predict_items(_items(world), model, workers=0, frame_batch=100, progress=False).predictions
    assert pred.fallback == "16 frames" and pred.frames_used == 16 and pred.frames_requested == 20
    assert len(pred.variant_p) == 5 and "not enough memory" in pred.error

    # Only a single variant fits -> one variant, p_fake is that variant's.
    model = load_model(world.models)
    _patch_forward(monkeypatch, model.encoder, lambda n, call: cpu_oom if n > FRAMES else None)
    (pred,) = predict_items(_items(world), model, workers=0, progress=False).predictions
    assert pred.fallback == "one variant" and list(pred.variant_p) == ["original"]
    assert pred.p_fake == pytest.approx(pred.variant_p["original"])

    # Nothing fits -> 0.5 with every step's error recorded; the row is still there.
    _patch_forward(monkeypatch, model.encoder, lambda n, call: cpu_oom)
    (pred,) = predict_items(_items(world), model, workers=0, progress=False).predictions
    assert pred.fallback == "0.5 (out of memory)" and pred.p_fake == 0.5 and pred.status == "failed"
    assert pred.error.count("not enough memory") == 3  # none, retry, one variant


def test_other_errors_give_half_and_are_recorded(world: World, monkeypatch):
    model = load_model(world.models)
    _patch_forward(monkeypatch, model.encoder, lambda n, call: ValueError("weird input") if call == 1 else None)
    preds = predict_items(_items(world, 2), model, workers=0, progress=False).predictions
    assert [p.fallback for p in preds] == ["0.5 (error)", "none"]
    assert preds[0].p_fake == 0.5 and "ValueError: weird input" in preds[0].error
