"""Full-video path: model loading, the shared head step, OOM fallbacks, evaluation and the attention report.

The "world" (a tiny demo dataset, a feature cache of a tiny random backbone, a head-only model and a fine-tuned
checkpoint) is built once per test session and shared with tests/test_submit.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

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


def save_head_only(cache_path: Path, models: Path, *, seed: int = 0) -> None:
    """A head-only model as tune-head leaves it: head weights, config, feature stats and the cache provenance."""
    from arena.cache import FeatureCache
    from arena.model import DetectorHead
    from arena.tune import HEAD_FORMAT, provenance_dict

    cache = FeatureCache.open(cache_path)
    torch.manual_seed(seed)
    head = DetectorHead(cache.provenance.feature_dim, attn_dim=16, hidden=16, dropout=0.3)
    feats = np.concatenate([cache.features(k, FRAMES, "original")[0] for k in cache.keys if k.startswith("train/")])
    head.set_feature_stats(feats.astype(np.float32).mean(0), feats.astype(np.float32).std(0))
    # The layout of tune-head's best_head.pt (arena.tune.head_checkpoint), without running a study.
    torch.save({"format": HEAD_FORMAT, "state_dict": head.state_dict(), "config": head.config(),
                "head_config": head.config(), "frames": FRAMES, "provenance": provenance_dict(cache.provenance)},
               models / "best_head.pt")


def save_finetuned(models: Path, *, seed: int = 1) -> None:
    """A train-full checkpoint with the seed's keys (encoder + head of a Detector), named as train-full names it."""
    from arena.model import Detector, DetectorHead, create_encoder

    enc = create_encoder(BACKBONE, pretrained=False, image_size=IMAGE_SIZE, seed=seed)
    torch.manual_seed(seed)
    head = DetectorHead(enc.feature_dim, attn_dim=16, hidden=16, dropout=0.3)
    det = Detector(enc, head)
    cfg = {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "frames": FRAMES, "head": head.config(),
           "pretrained": False, "weights": None, "seed": seed}
    torch.save({"epoch": 1, "model_state_dict": det.state_dict(), "optimizer_state_dict": {}, "val_acc": 0.5,
                "val_f1": 0.5, "val_auc": 0.5, "history": [], "config": cfg}, models / f"{BACKBONE}_best.pt")


def build_world(base: Path) -> World:
    """Build (once; later calls reuse it) the shared tiny world under ``base``."""
    from arena.demo import generate_dataset
    from arena.features import extract_features

    root = base / "submit_world"
    world = World(root, root / "data", root / "features.h5", root / "models", root / "models_ft")
    if (root / "done").exists():
        return world
    if root.exists():
        shutil.rmtree(root)
    generate_dataset(world.data, n_train_real=2, n_train_fake=2, n_test=4, seconds=0.6, size=(64, 64), fps=10,
                     seed=3, workers=1, progress=False)
    extract_features(data=world.data, cache=world.cache, models=world.models, frame_counts=(FRAMES,),
                     backbone=BACKBONE, pretrained=False, image_size=IMAGE_SIZE, seed=0, device="cpu", workers=0)
    save_head_only(world.cache, world.models)
    world.models_ft.mkdir()
    save_finetuned(world.models_ft)
    shutil.copy(world.models / "split.json", world.models_ft / "split.json")
    for m in (world.models, world.models_ft):
        (m / "frame_test.json").write_text(json.dumps({"recommended_frames": FRAMES}))
    (root / "done").write_text("ok")
    return world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------------------------------------------- loading


def test_resolve_frames_order(tmp_path):
    from arena.predict import PredictError, resolve_frames

    assert resolve_frames(tmp_path) == (24, "default (24; no frame_test.json)")
    (tmp_path / "frame_test.json").write_text(json.dumps({"recommended_frames": 32}))
    assert resolve_frames(tmp_path)[0] == 32
    assert resolve_frames(tmp_path, 48) == (48, "--frames option")
    (tmp_path / "frame_test.json").write_text("{}")
    with pytest.raises(PredictError, match="recommended_frames"):
        resolve_frames(tmp_path)


def test_load_model_prefers_finetuned_and_checks_weights_hash(world, tmp_path):
    from arena.predict import PredictError, load_model

    ft = load_model(world.models_ft)
    assert ft.kind == "finetuned" and not ft.round_fp16 and ft.frames == FRAMES and len(ft.variants) == 5
    ho = load_model(world.models, tta=False)
    assert ho.kind == "head-only" and ho.round_fp16 and ho.variants == ("original",)
    assert ho.encoder.weights_hash() == ho.cache_provenance["weights_hash"]

    # A head tuned on other features (the cache's weights hash differs) is refused, naming both hashes.
    bad = torch.load(world.models / "best_head.pt", weights_only=True)
    bad["provenance"]["weights_hash"] = "0" * 64
    torch.save(bad, tmp_path / "best_head.pt")
    with pytest.raises(PredictError, match="weights hash .* the cache was built with 000000000000"):
        load_model(tmp_path)
    with pytest.raises(PredictError, match="no model in"):
        load_model(tmp_path / "empty")


def test_load_model_refuses_pickled_code(tmp_path):
    from arena.predict import PredictError, load_model

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"format": "arena.head/1", "state_dict": Evil()}, tmp_path / "best_head.pt")
    with pytest.raises(PredictError, match="weights_only=True"):
        load_model(tmp_path, kind="head-only")


def test_head_probabilities_same_for_cache_and_full_path_features(world):
    from arena.cache import FeatureCache
    from arena.predict import head_probabilities, load_model

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


def _items(world, n=1):
    from arena.data import load_dataset

    return load_dataset(world.data).test[:n]


def test_oom_once_is_retried_after_clearing(world, monkeypatch):
    from arena.predict import load_model, predict_items

    model = load_model(world.models)
    _patch_forward(monkeypatch, model.encoder,
                   lambda n, call: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                   if call == 1 else None)
    run = predict_items(_items(world), model, workers=0, progress=False)
    (pred,) = run.predictions
    assert pred.fallback == "retry" and pred.status == "ok" and pred.frames_used == FRAMES
    assert len(pred.variant_p) == 5 and "CUDA out of memory" in pred.error
    assert run.fallbacks == {"retry": 1}


def test_oom_walks_to_16_frames_then_one_variant_then_half(world, monkeypatch):
    from arena.predict import load_model, predict_items

    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 9663676416 bytes.")
    # 20 frames x 5 variants = 100 frames per batch: fails; 16 x 5 = 80 passes -> the 16-frame fallback.
    model = load_model(world.models, frames=20)
    _patch_forward(monkeypatch, model.encoder, lambda n, call: cpu_oom if n > 80 else None)
    (pred,) = predict_items(_items(world), model, workers=0, batch_size=100, progress=False).predictions
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


def test_other_errors_give_half_and_are_recorded(world, monkeypatch):
    from arena.predict import load_model, predict_items

    model = load_model(world.models)
    _patch_forward(monkeypatch, model.encoder, lambda n, call: ValueError("weird input") if call == 1 else None)
    preds = predict_items(_items(world, 2), model, workers=0, progress=False).predictions
    assert [p.fallback for p in preds] == ["0.5 (error)", "none"]
    assert preds[0].p_fake == 0.5 and "ValueError: weird input" in preds[0].error


# ------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_on_labelled_test_set_with_attention_report(world, tmp_path):
    from click.testing import CliRunner

    from arena.cli import main

    out = tmp_path / "eval" / "evaluation.json"
    res = CliRunner().invoke(main, ["evaluate", "--data", str(world.data), "--models", str(world.models),
                                    "--labels", str(world.data / "test_labels.csv"), "--out", str(out),
                                    "--attention-first", "1", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "TTA gain" in res.output and "AUC" in res.output
    doc = json.loads(out.read_text())
    assert doc["n"] == 4 and doc["failed"] == {}
    for name in ("tta", "no_tta"):
        m = doc["metrics"][name]
        assert 0.0 <= m["auc"] <= 1.0 and m["log_loss"] > 0 and sum(m["confusion"].values()) == 4
    (att,) = doc["attention"]
    assert len(att["attention"]) == FRAMES and sum(att["attention"]) == pytest.approx(1.0, abs=1e-4)
    assert Path(att["png"]).is_file() and Path(att["png"]).stat().st_size > 1000


def test_evaluate_on_validation_split(world, tmp_path):
    from arena.data import load_dataset, load_split
    from arena.predict import PredictError, evaluate

    val = load_split(load_dataset(world.data), world.models).val
    res = evaluate(data=world.data, models=world.models_ft, split="val", out=tmp_path / "e.json", workers=0,
                   device="cpu", attention=[val[0].key], progress=False)
    assert res["n"] == len(val) and res["model"]["kind"] == "finetuned"
    assert [v["key"] for v in res["videos"]] == [it.key for it in val]
    assert res["attention"][0]["key"] == val[0].key
    with pytest.raises(PredictError, match="--attention keys not among"):
        evaluate(data=world.data, models=world.models, split="val", attention=["nope.mp4"], progress=False)
