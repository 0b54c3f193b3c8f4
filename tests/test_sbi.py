"""Self-blended pseudo-fakes: shape, locality, one draw per clip, determinism, boxes, tiny clips, validation."""

from __future__ import annotations

import numpy as np
import pytest

from arena.demo_render import draw_clip_params, render_clip
from arena.errors import OptionError
from arena.sbi import SbiConfig, face_square, self_blend

STILL = SbiConfig(drift=0.0)


def _clip(t: int = 6, size: tuple[int, int] = (64, 80), seed: int = 0) -> np.ndarray:
    """A demo clip: grain, hard edges and a moving camera, so every jitter shows."""
    return render_clip(draw_clip_params(np.random.default_rng(seed), size=size, num_frames=t))


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(mask.shape)
    return np.array([(xs * mask).sum(), (ys * mask).sum()]) / mask.sum()


def test_shape_dtype_kept_and_pixels_change_only_under_the_mask():
    for seed in range(4):
        frames = _clip(seed=seed)
        out, mask = self_blend(frames, rng=np.random.default_rng(seed), box=None if seed % 2 else (20, 10, 60, 58))
        assert out.shape == frames.shape and out.dtype == np.uint8
        assert mask.shape == frames.shape[:3] and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        diff = np.abs(out.astype(np.int16) - frames).max(axis=-1)
        assert diff[mask == 0].max() == 0  # exact outside: the label depends on the region only
        assert diff[mask > 0.4].mean() > 1.0  # and the blend is really there
        assert 0.05 < (mask > 0).mean() < 0.8  # a face-sized region, not the frame


def test_one_draw_for_the_whole_clip_up_to_a_small_drift():
    still = np.repeat(_clip(t=1)[:1], 8, axis=0)  # the same frame 8 times: only the drift can tell them apart
    out, mask = self_blend(still, rng=np.random.default_rng(3), box=(20, 10, 60, 58), config=STILL)
    assert all(np.array_equal(out[0], f) for f in out) and all(np.array_equal(mask[0], m) for m in mask)
    moving, mask_moving = self_blend(still, rng=np.random.default_rng(3), box=(20, 10, 60, 58),
                                     config=SbiConfig(drift=0.05))
    # the same draw: the first frame is the drift's origin, the later ones move a little from it
    np.testing.assert_array_equal(moving[0], out[0])
    assert not all(np.array_equal(moving[0], f) for f in moving)
    side = np.sqrt(40 * 48)
    for m in mask_moving:
        assert np.abs(_centroid(m) - _centroid(mask[0])).max() <= 0.05 * side
        assert np.minimum(m, mask[0]).sum() / np.maximum(m, mask[0]).sum() > 0.8


def test_deterministic_for_a_generator_state():
    frames = _clip()
    a = self_blend(frames, rng=np.random.default_rng(11))
    b = self_blend(frames, rng=np.random.default_rng(11))
    c = self_blend(frames, rng=np.random.default_rng(12))
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.frames, c.frames)


def test_the_mask_sits_on_the_box_and_follows_it():
    frames = _clip(t=5, size=(96, 96))
    box = np.array([50.0, 20.0, 86.0, 64.0])
    _, mask = self_blend(frames, rng=np.random.default_rng(0), box=box, config=STILL)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    assert np.abs(_centroid(mask[0]) - centre).max() < 6
    inside = np.zeros((96, 96), bool)
    inside[int(box[1]) - 8 : int(box[3]) + 8, int(box[0]) - 8 : int(box[2]) + 8] = True
    assert mask[0][~inside].sum() < 0.05 * mask[0].sum()
    # one box per frame: the mask moves with it
    boxes = box + np.array([[-3.0 * i, 2.0 * i, -3.0 * i, 2.0 * i] for i in range(5)])
    _, moved = self_blend(frames, rng=np.random.default_rng(0), box=boxes, config=STILL)
    np.testing.assert_array_equal(moved[0], mask[0])
    np.testing.assert_allclose(_centroid(moved[4]) - _centroid(moved[0]), [-12.0, 8.0], atol=0.5)
    # no box (or the letterbox's NaN box): a face-sized region drawn at random, away from a given box
    _, free = self_blend(frames, rng=np.random.default_rng(0))
    _, nan = self_blend(frames, rng=np.random.default_rng(0), box=np.full(4, np.nan))
    np.testing.assert_array_equal(free, nan)
    assert not np.array_equal(free, mask)
    assert 0.05 < (free[0] > 0.5 * free[0].max()).mean() < 0.5


def test_face_crops_use_the_centred_face_square():
    assert face_square((299, 299), 1.3) == pytest.approx((34.5, 34.5, 264.5, 264.5))
    x1, y1, x2, y2 = face_square((112, 160), 1.4)
    assert (x2 - x1, y2 - y1) == pytest.approx((80, 80)) and (x1 + x2, y1 + y2) == pytest.approx((160, 112))
    crop = _clip(t=3, size=(112, 112))
    _, mask = self_blend(crop, rng=np.random.default_rng(5), box=face_square((112, 112), 1.3))
    assert np.abs(_centroid(mask[0]) - 55.5).max() < 8


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 8, 8), (3, 20, 12)])
def test_tiny_clips_work(shape):
    frames = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out, mask = self_blend(frames, rng=np.random.default_rng(1))
    assert out.shape == frames.shape and mask.shape == shape
    assert not np.array_equal(out, frames)


def test_bad_input_is_refused_with_what_was_given():
    frames = _clip(t=2)
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\].*float32"):
        self_blend(frames.astype(np.float32), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"one per frame \[2, 4\], got shape \(3, 4\)"):
        self_blend(frames, rng=np.random.default_rng(0), box=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="x2 > x1"):
        self_blend(frames, rng=np.random.default_rng(0), box=(10, 10, 5, 20))
    with pytest.raises(OptionError, match=r"SbiConfig.blend must lie in \(0, 1\]"):
        SbiConfig(blend=(0.5, 1.5))
    with pytest.raises(OptionError, match="low <= high"):
        SbiConfig(scale=(1.1, 0.9))
    with pytest.raises(OptionError, match="margin must be >= 1"):
        face_square((64, 64), 0.5)
