"""Tests for arena.tta: deterministic, frame-wise TTA views and the training augmentation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from arena.errors import OptionError
from arena.tta import (
    VARIANTS,
    TrainAugmentConfig,
    ssr_matrix,
    train_augment,
    train_augment_params,
    tta_spec,
    tta_view,
    tta_views,
)


def _clip(t: int = 6, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """A textured clip: smooth gradients plus grain, different per frame (like moving video)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(t):
        base = 60 + 2.0 * xx + 1.5 * yy + 10 * i
        img = np.stack([base, base[::-1], 0.5 * base + 40], axis=0) + rng.normal(0, 8, (3, h, w))
        frames.append(np.clip(img, 0, 255))
    return torch.from_numpy(np.stack(frames).astype(np.uint8))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_is_deterministic_uint8_and_shape_preserving(variant):
    clip = _clip()
    a = tta_view(clip, variant)
    b = tta_view(clip.clone(), variant)
    assert a.dtype == torch.uint8 and a.shape == clip.shape
    assert torch.equal(a, b)
    if variant != "original":
        assert not torch.equal(a, clip)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_draw_for_all_frames(variant):
    """A video of identical frames stays a video of identical frames."""
    frame = _clip(t=1)
    same = frame.repeat(5, 1, 1, 1)
    out = tta_view(same, variant)
    assert all(torch.equal(out[i], out[0]) for i in range(5))
    assert torch.equal(out[:1], tta_view(frame, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_views_are_frame_wise(variant):
    """Computing a view on the union of frames and slicing equals computing it on the subset (cache contract)."""
    clip = _clip(t=9)
    idx = [7, 0, 3, 3]
    assert torch.equal(tta_view(clip[idx], variant), tta_view(clip, variant)[idx])


def test_flip_of_flip_is_the_original_and_matches_albumentations():
    clip = _clip()
    flipped = tta_view(clip, "hflip")
    assert torch.equal(tta_view(flipped, "hflip"), clip)
    assert torch.equal(flipped, torch.flip(clip, dims=[-1]))


def test_original_returns_a_copy():
    clip = _clip()
    out = tta_view(clip, "original")
    assert torch.equal(out, clip) and out.data_ptr() != clip.data_ptr()


@pytest.mark.parametrize(("variant", "delta"), [("brightness_up", 25.5), ("brightness_down", -25.5)])
def test_brightness_shifts_the_mean_by_a_tenth_of_the_range(variant, delta):
    clip = torch.full((3, 3, 16, 16), 100, dtype=torch.uint8)
    clip[:, :, ::2] = 140  # mid-tones: no saturation at 0/255
    shift = tta_view(clip, variant).float().mean() - clip.float().mean()
    assert shift.item() == pytest.approx(delta, abs=1.0)


def test_shift_scale_rotate_moves_content_but_keeps_it_recognisable():
    clip = _clip(t=2, h=64, w=64)
    out = tta_view(clip, "shift_scale_rotate")
    diff = (out.float() - clip.float()).abs().mean().item()
    assert 1.0 < diff < 60.0
    assert abs(out.float().mean().item() - clip.float().mean().item()) < 10.0  # reflect border: no black wedges


def test_tta_views_stacks_in_order():
    clip = _clip(t=3)
    views = tta_views(clip)
    assert views.shape == (len(VARIANTS), *clip.shape) and views.dtype == torch.uint8
    for i, v in enumerate(VARIANTS):
        assert torch.equal(views[i], tta_view(clip, v))
    assert tta_views(clip, ["hflip"]).shape == (1, *clip.shape)


def test_bad_input_is_refused_with_clear_messages():
    with pytest.raises(OptionError, match="Unknown TTA variant 'vflip'. Supported values are original, hflip"):
        tta_view(_clip(), "vflip")
    with pytest.raises(ValueError, match=r"uint8 \[T, 3, H, W\]; got torch.float32"):
        tta_view(_clip().float(), "hflip")
    with pytest.raises(ValueError, match=r"got torch.uint8 \(3, 40, 56\)"):
        tta_view(_clip()[0], "hflip")
    with pytest.raises(ValueError, match="empty"):
        tta_view(_clip()[:0], "hflip")
    with pytest.raises(TypeError, match="ndarray"):
        tta_view(np.zeros((1, 3, 4, 4), np.uint8), "hflip")
    with pytest.raises(OptionError, match="variants is empty"):
        tta_views(_clip(), [])


def test_spec_is_json_and_describes_every_variant():
    spec = tta_spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["variants"] == list(VARIANTS)
    assert spec["shift_scale_rotate"]["translate"] == 0.05 and spec["shift_scale_rotate"]["scale"] == 1.05
    assert spec["library"].startswith("albumentations==2.")
    assert all(v in spec for v in VARIANTS if v != "original")


# --- training augmentation -----------------------------------------------------------------------------------------

def test_train_augment_is_reproducible_from_the_generator():
    clip = _clip()
    a = [train_augment(clip, rng=np.random.default_rng(s)) for s in range(6)]
    b = [train_augment(clip, rng=np.random.default_rng(s)) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.numpy().tobytes() for x in a}) > 1  # different seeds, different draws
    assert all(x.shape == clip.shape and x.dtype == torch.uint8 for x in a)


def test_train_augment_uses_one_draw_per_clip():
    same = _clip(t=1).repeat(4, 1, 1, 1)
    rng = np.random.default_rng(3)
    for _ in range(5):
        out = train_augment(same, rng=rng)
        assert all(torch.equal(out[i], out[0]) for i in range(4))


def test_train_augment_stays_mild():
    clip = _clip(h=64, w=64)
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = train_augment(clip, rng=rng)
        assert abs(out.float().mean().item() - clip.float().mean().item()) < 40.0


def test_train_augment_params_and_config():
    p = train_augment_params(np.random.default_rng(0), 100, 200, TrainAugmentConfig(p_flip=1.0, p_shift=1.0,
                                                                                       p_affine=0.0, p_color=0.0))
    assert p["flip"] is True and p["affine"] is None and p["color"] is None
    assert abs(p["shift_px"][0]) <= 8 and abs(p["shift_px"][1]) <= 4
    off = TrainAugmentConfig(p_flip=0.0, p_shift=0.0, p_affine=0.0, p_color=0.0)
    clip = _clip()
    assert torch.equal(train_augment(clip, rng=np.random.default_rng(0), config=off), clip)
    flip_only = TrainAugmentConfig(p_flip=1.0, p_shift=0.0, p_affine=0.0, p_color=0.0)
    assert torch.equal(train_augment(clip, rng=np.random.default_rng(0), config=flip_only), tta_view(clip, "hflip"))
    with pytest.raises(ValueError, match="p_flip must be a probability in \\[0, 1\\]; got 1.5"):
        TrainAugmentConfig(p_flip=1.5)
    with pytest.raises(ValueError, match="brightness must be in"):
        TrainAugmentConfig(brightness=0.9)


def test_ssr_matrix_is_the_matrix_the_view_applies():
    clip = _clip(t=2, h=40, w=56)
    m = ssr_matrix(40, 56)
    assert m.shape == (3, 3) and m.dtype == np.float64 and np.array_equal(m[2], [0.0, 0.0, 1.0])
    img = np.ascontiguousarray(clip[0].permute(1, 2, 0).numpy())
    warped = cv2.warpAffine(img, m[:2], (56, 40), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    assert np.array_equal(warped, tta_view(clip, "shift_scale_rotate")[0].permute(1, 2, 0).numpy())
