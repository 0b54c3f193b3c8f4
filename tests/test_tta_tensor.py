"""The tensor TTA views (`arena.tta_tensor`, built where the frames are) against albumentations' (`arena.tta`).

Measured on all 11 shared face clips (8 frames each, at 299x299 and at 224x320: 42.5 M values per view):
``original``, ``hflip`` and both brightness views equal bit for bit; ``shift_scale_rotate`` at most 1 level
apart, on 0.004 % of the values (mean absolute difference 0.00004 level). The tolerance asserted below leaves
room for another OpenCV build: at most 2 levels, mean at most 0.01 level.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _shared import shared_videos

from arena.clips import ClipDataset, iter_clips
from arena.errors import OptionError
from arena.tta import VARIANTS, tta_view, tta_views
from arena.tta_tensor import tensor_view, tensor_views
from arena.video import decode_uniform

EXACT = ("original", "hflip", "brightness_up", "brightness_down")
MAX_LEVELS, MEAN_LEVELS = 2, 0.01  # shift_scale_rotate, against OpenCV's warpAffine (measured: 1 and 0.00004)


@pytest.fixture(scope="module")
def face_frames() -> list[torch.Tensor]:
    """Decoded frames of three shared face clips, square and not (so width and height cannot be swapped)."""
    names = ("real_aniportrait_may_pose_ref.mp4", "fake_geneface_may_radnerf.mp4",
             "real_face_recognition_hamilton_stage_wide.mp4")
    root = shared_videos() / "faces"
    out = []
    for name, size in zip(names, ((299, 299), (224, 320), (299, 299)), strict=True):
        out.append(decode_uniform(root / name, 6, size=size).frames)
    return out


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = (a.cpu().int() - b.cpu().int()).abs()
    return int(d.max()), float(d.float().mean())


@pytest.mark.parametrize("variant", VARIANTS)
def test_views_match_albumentations_on_real_frames(face_frames, variant):
    for frames in face_frames:
        ref, ours = tta_view(frames, variant), tensor_view(frames, variant)
        assert ours.dtype == torch.uint8 and ours.shape == frames.shape
        worst, mean = _stats(ref, ours)
        if variant in EXACT:
            assert worst == 0, variant
        else:
            assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS, (worst, mean)


def test_views_are_frame_wise_and_stacked_in_order(face_frames):
    frames = face_frames[1]
    idx = [5, 0, 3, 3]
    views = tensor_views(frames)
    assert views.shape == (len(VARIANTS), *frames.shape)
    for i, v in enumerate(VARIANTS):
        assert torch.equal(views[i], tensor_view(frames, v))
        assert torch.equal(tensor_view(frames[idx], v), views[i][idx])  # the cache's union-then-slice contract
    assert tensor_views(frames, ["hflip"]).shape == (1, *frames.shape)


def test_geometric_view_on_a_tiny_and_a_one_pixel_wide_clip():
    rng = np.random.default_rng(0)
    for h, w in ((7, 11), (5, 1), (1, 1)):
        frames = torch.from_numpy(rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8))
        worst, _ = _stats(tta_view(frames, "shift_scale_rotate"), tensor_view(frames, "shift_scale_rotate"))
        assert worst <= MAX_LEVELS, (h, w, worst)


def test_bad_input_is_refused_like_the_cpu_views():
    frames = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(OptionError, match="Unknown TTA variant 'vflip'. Supported values are original, hflip"):
        tensor_view(frames, "vflip")
    with pytest.raises(ValueError, match=r"uint8 \[T, 3, H, W\]; got torch.float32"):
        tensor_view(frames.float(), "hflip")
    with pytest.raises(OptionError, match="variants is empty"):
        tensor_views(frames, [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_views_on_the_gpu_match_albumentations(face_frames):
    for frames in face_frames:
        ref = tta_views(frames)
        ours = tensor_views(frames.cuda())
        assert ours.device.type == "cuda"
        for i, v in enumerate(VARIANTS):
            worst, mean = _stats(ref[i], ours[i])
            assert worst <= (0 if v in EXACT else MAX_LEVELS) and mean <= MEAN_LEVELS, (v, worst, mean)


# --- the option of the clip pipeline (arena.clips: views_on) -------------------------------------------------------


@pytest.fixture(scope="module")
def face_item():
    path = shared_videos() / "faces" / "real_aniportrait_may_pose_ref.mp4"
    return SimpleNamespace(key="faces/" + path.name, path=path, label=0)


def test_views_on_device_defers_the_views_and_iter_clips_makes_them(face_item):
    on_cpu = ClipDataset([face_item], size=(96, 96), variants=VARIANTS, frame_counts=(4, 6), views_on="cpu")
    on_dev = ClipDataset([face_item], size=(96, 96), variants=VARIANTS, frame_counts=(4, 6), views_on="device")
    item = on_dev[0]
    assert item.pending == VARIANTS and item.views.shape[0] == 1  # the workers ship the frames alone
    ref = next(iter_clips(on_cpu, workers=0))
    for device in (None, torch.device("cpu")):
        clip = next(iter_clips(on_dev, workers=0, device=device))
        assert clip.pending == () and clip.views.shape == ref.views.shape
        np.testing.assert_array_equal(clip.frame_indices, ref.frame_indices)
        for i, v in enumerate(VARIANTS):
            worst, mean = _stats(ref.views[i], clip.views[i])
            assert worst <= (0 if v in EXACT else MAX_LEVELS) and mean <= MEAN_LEVELS, (v, worst, mean)
    assert on_cpu[0].pending == ()
    with pytest.raises(OptionError, match=r"Invalid views_on \(gpu\). Supported values are cpu, device"):
        ClipDataset([face_item], size=(96, 96), frames=4, views_on="gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_iter_clips_hands_over_clips_on_the_gpu(face_item):
    ds = ClipDataset([face_item, face_item], size=(96, 96), variants=VARIANTS, frames=6, views_on="device")
    ref = ClipDataset([face_item], size=(96, 96), variants=VARIANTS, frames=6)[0]
    clips = list(iter_clips(ds, workers=1, device=torch.device("cuda")))
    assert [c.views.device.type for c in clips] == ["cuda", "cuda"]
    for i, v in enumerate(VARIANTS):
        worst, mean = _stats(ref.views[i], clips[1].views[i])
        assert worst <= (0 if v in EXACT else MAX_LEVELS) and mean <= MEAN_LEVELS, (v, worst, mean)
    assert ClipDataset([face_item], size=(96, 96), frames=4)[0].pin_memory().views.is_pinned()
