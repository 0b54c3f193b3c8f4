"""Tests for arena.model: encoder factory, weights handling, attention pooling, head and detector."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch

import arena.model
from arena.errors import OptionError
from arena.limits import DEFAULT_BACKBONE, MAX_IMAGE_SIZE
from arena.model import (
    AttentionPool,
    Detector,
    DetectorHead,
    FrameEncoder,
    WeightsUnavailable,
    create_encoder,
)

TINY = "test_resnet"  # timm's tiny test model: 96-d features, fast at 32..64 px


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, oversubscribed OpenMP threads spin and slow tests 30x."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def irv2() -> FrameEncoder:
    return create_encoder("inception_resnet_v2.tf_in1k", pretrained=False, image_size=75, seed=0)


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches; downloads not allowed."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("ARENA_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(arena.model, "_hub_reachable", lambda *a, **k: False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torchhub"))
    yield tmp_path / "hf"
    torch.hub.set_dir(old)


# --- attention pooling -------------------------------------------------------------------------------------------

def test_attention_weights_sum_to_one_and_masked_frames_get_zero():
    torch.manual_seed(0)
    pool = AttentionPool(16, 8)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    pooled, w = pool(x, mask)
    assert pooled.shape == (3, 16) and w.shape == (3, 5)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert (w[~mask] == 0).all()
    assert (w[mask] > 0).all()
    torch.testing.assert_close(pooled[2], x[2, 4])  # a single valid frame is the pooled vector
    torch.testing.assert_close(pooled, torch.einsum("bt,btd->bd", w, x))


def test_attention_without_mask_and_all_masked_row_is_uniform_not_nan():
    pool = AttentionPool(4, 3)
    x = torch.randn(2, 4, 4)
    _, w_none = pool(x)
    torch.testing.assert_close(w_none.sum(dim=1), torch.ones(2))
    mask = torch.tensor([[False] * 4, [True, True, False, False]])
    pooled, w = pool(x, mask)
    assert torch.isfinite(pooled).all() and torch.isfinite(w).all()
    _, w_all = pool(x[:1], torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(w[0], w_all[0])  # all-masked row == no mask at all


def test_attention_rejects_bad_shapes():
    pool = AttentionPool(4, 3)
    with pytest.raises(ValueError, match=r"x \[B, T, d\]"):
        pool(torch.randn(4, 4))
    with pytest.raises(ValueError, match="mask shape"):
        pool(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


def test_gradient_reaches_every_head_parameter():
    torch.manual_seed(0)
    head = DetectorHead(12, attn_dim=6, hidden=8, dropout=0.0)
    feats = torch.randn(4, 5, 12)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    logits, attn = head(feats, mask)
    assert logits.shape == (4, 2) and attn.shape == (4, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- head ----------------------------------------------------------------------------------------------------------

def test_head_config_rebuilds_the_same_head():
    head = DetectorHead(10, attn_dim=4, hidden=7, dropout=0.3)
    head.set_feature_stats(torch.full((10,), 2.0), torch.full((10,), 0.5))
    clone = DetectorHead(**json.loads(json.dumps(head.config())))
    clone.load_state_dict(head.state_dict())
    head.eval(), clone.eval()
    feats = torch.randn(2, 3, 10)
    torch.testing.assert_close(head(feats)[0], clone(feats)[0])
    assert torch.equal(clone.feat_mean, torch.full((10,), 2.0))


def test_feature_stats_standardise_and_floor_dead_dimensions():
    head = DetectorHead(4, attn_dim=2, hidden=3, dropout=0.0)
    head.set_feature_stats([0.01, 0.0, 0.02, 0.0], [0.01, 0.0, 0.012, 1e-9])
    assert (head.feat_std > 0).all()
    assert head.feat_std[1] >= 1e-4 and head.feat_std[0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="4 entries"):
        head.set_feature_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        head.set_feature_stats(torch.tensor([0.0, float("nan"), 0, 0]), torch.ones(4))


def test_head_standardisation_makes_tiny_features_usable():
    """Random-init features are ~0.01: after set_feature_stats the head sees unit-scale input."""
    head = DetectorHead(8, attn_dim=4, hidden=4, dropout=0.0)
    feats = 0.01 * torch.randn(16, 6, 8) + 0.005
    flat = feats.reshape(-1, 8)
    head.set_feature_stats(flat.mean(0), flat.std(0))
    x = (feats - head.feat_mean) / head.feat_std
    assert x.std().item() == pytest.approx(1.0, abs=0.1)


def test_input_dropout_acts_in_training_only_and_old_configs_still_load():
    head = DetectorHead(16, attn_dim=4, hidden=8, dropout=0.0, input_dropout=0.5)
    assert head.config()["input_dropout"] == 0.5
    feats = torch.randn(3, 5, 16)
    head.eval()
    torch.testing.assert_close(head(feats)[0], head(feats)[0])  # identity at inference: deterministic
    head.train()
    torch.manual_seed(0)
    a = head(feats)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, head(feats)[0])  # a different mask per draw in training
    seen = []
    pool_forward = head.pool.forward
    head.pool.forward = lambda z, mask=None: (seen.append(z), pool_forward(z, mask))[1]
    head.forward_standardized(torch.ones(3, 5, 16))
    dropped = seen[0] == 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # one mask per video, shared by its frames
    torch.testing.assert_close(seen[0][~dropped], torch.full_like(seen[0][~dropped], 2.0))  # kept: scaled 1/(1-p)
    # A checkpoint from before the option (no input_dropout in its config, no extra state) loads as the seed head.
    old_cfg = {k: v for k, v in head.config().items() if k != "input_dropout"}
    old = DetectorHead(**old_cfg)
    old.load_state_dict(head.state_dict())
    assert old.input_dropout == 0.0
    with pytest.raises(ValueError, match="input_dropout"):
        DetectorHead(8, input_dropout=1.0)


def test_head_rejects_bad_input_and_options():
    with pytest.raises(ValueError, match="dropout"):
        DetectorHead(8, dropout=1.0)
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        DetectorHead(8)(torch.randn(2, 3, 9))


# --- encoder -------------------------------------------------------------------------------------------------------

def test_encoder_metadata_comes_from_timm_config(irv2):
    assert irv2.feature_dim == 1536
    assert irv2.input_size == (75, 75)
    assert irv2.interpolation == "bicubic"
    torch.testing.assert_close(irv2.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(irv2.std.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert irv2.weights_source == "random:inception_resnet_v2.tf_in1k:seed=0"
    tiny = create_encoder(TINY, pretrained=False)
    assert tiny.input_size == (160, 160) and tiny.feature_dim == 96


def test_encoder_forward_uint8_equals_float_and_channels_last():
    enc = create_encoder(TINY, pretrained=False, image_size=48, seed=1)
    frames = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    with torch.inference_mode():
        a = enc(frames)
        b = enc(frames.float())
        enc.to_channels_last()
        c = enc(frames)
    assert a.shape == (3, 96) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        enc(frames[:, :2])


def test_random_backbone_is_reproducible_from_the_seed(irv2):
    torch.manual_seed(123)  # the global RNG state before the call must not matter
    again = create_encoder("inception_resnet_v2.tf_in1k", pretrained=False, image_size=75, seed=0)
    assert again.weights_hash() == irv2.weights_hash()
    other = create_encoder("inception_resnet_v2.tf_in1k", pretrained=False, image_size=75, seed=1)
    assert other.weights_hash() != irv2.weights_hash()


def test_weights_hash_is_stable_across_processes():
    code = ("from arena.model import create_encoder; "
            f"print(create_encoder({TINY!r}, pretrained=False, seed=7).weights_hash())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == create_encoder(TINY, pretrained=False, seed=7).weights_hash()


def test_image_size_outside_the_bounds_is_refused():
    with pytest.raises(OptionError, match=rf"image_size=74 .* use 75\.\.{MAX_IMAGE_SIZE} px"):
        create_encoder(DEFAULT_BACKBONE, pretrained=False, image_size=74)
    with pytest.raises(OptionError, match=r"use 32\.\."):
        create_encoder(TINY, pretrained=False, image_size=31)
    with pytest.raises(OptionError, match=rf"image_size={MAX_IMAGE_SIZE + 1} .*\.\.{MAX_IMAGE_SIZE} px"):
        create_encoder(TINY, pretrained=False, image_size=MAX_IMAGE_SIZE + 1)
    assert create_encoder(TINY, pretrained=False, image_size=32).input_size == (32, 32)


def test_unknown_model_name_is_refused():
    with pytest.raises(OptionError, match="Unknown timm model 'no_such_net'"):
        create_encoder("no_such_net", pretrained=False)


def test_pretrained_offline_fails_at_once_naming_the_options(offline_caches):
    with pytest.raises(WeightsUnavailable, match="--pretrained.*--weights PATH.*--no-pretrained"):
        create_encoder("inception_resnet_v2.tf_in1k", pretrained=True)


def test_pretrained_loads_from_the_local_hub_cache(offline_caches):
    """A file already in the HF cache is used without any network access."""
    source = create_encoder(TINY, pretrained=False, seed=5)
    repo = offline_caches / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
                                str(snapshot / "model.safetensors"))
    enc = create_encoder(TINY, pretrained=True)
    assert enc.weights_source == f"hub:{TINY}"
    assert enc.weights_hash() == source.weights_hash()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file(tmp_path, suffix):
    source = create_encoder(TINY, pretrained=False, seed=3)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, str(path))
    enc = create_encoder(TINY, weights=str(path), image_size=64)
    assert enc.weights_source == f"file:{path.resolve()}"
    assert enc.weights_hash() == source.weights_hash()


def test_weights_file_problems_are_named(tmp_path):
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        create_encoder(TINY, weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "tiny.pth"
    torch.save(create_encoder(TINY, pretrained=False).model.state_dict(), wrong)
    with pytest.raises(WeightsUnavailable, match=r"tiny\.pth' does not match 'resnet18'.*missing keys"):
        create_encoder("resnet18", weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match=r"garbage\.pth"):
        create_encoder(TINY, weights=str(garbage))
    with pytest.raises(WeightsUnavailable, match="suffix '.txt'"):
        (tmp_path / "w.txt").write_text("x")
        create_encoder(TINY, weights=str(tmp_path / "w.txt"))


# --- detector ------------------------------------------------------------------------------------------------------

def test_detector_shapes_and_mask(irv2):
    torch.manual_seed(0)
    head = DetectorHead(irv2.feature_dim, attn_dim=32, hidden=16)
    det = Detector(irv2, head).eval()
    frames = torch.randint(0, 256, (2, 3, 3, 75, 75), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.inference_mode():
        logits, attn = det(frames, mask)
        # the detector is the encoder then the head: the same numbers as running them one after the other
        feats = irv2(frames.flatten(0, 1)).reshape(2, 3, -1)
        logits_apart, _ = head(feats, mask)
    assert logits.shape == (2, 2) and attn.shape == (2, 3)
    assert attn[0, 2] == 0
    torch.testing.assert_close(logits, logits_apart, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="1536-d features but the head expects 7"):
        Detector(irv2, DetectorHead(7))


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(irv2):
    enc = copy.deepcopy(irv2)  # train mode updates BatchNorm statistics: keep the shared fixture clean
    torch.manual_seed(0)
    det = Detector(enc, DetectorHead(enc.feature_dim, attn_dim=8, hidden=8, dropout=0.0)).train()
    frames = torch.randint(0, 256, (1, 2, 3, 75, 75), dtype=torch.uint8)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        det.zero_grad()
        logits, _ = det(frames)
        logits.sum().backward()
        return logits.detach(), enc.model.conv2d_1a.conv.weight.grad.clone()

    plain_logits, plain_grad = run()
    enc.set_grad_checkpointing(True)
    ckpt_logits, ckpt_grad = run()
    enc.set_grad_checkpointing(False)
    torch.testing.assert_close(plain_logits, ckpt_logits)
    torch.testing.assert_close(plain_grad, ckpt_grad)
    assert "forward" not in enc.model.repeat.__dict__  # switched off again


def test_offline_mode_skips_the_hub_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert arena.model._hub_reachable() is False
