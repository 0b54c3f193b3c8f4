"""`arena.augment`: the ``--augment`` degradations are one draw per clip, seeded by the caller only, and off by
default; `arena.train_data.AugmentClip` puts them in front of the existing training augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arena.augment import LEVELS, augment_spec, check_level, degrade
from arena.errors import OptionError
from arena.train_config import TrainConfig
from arena.train_data import AugmentClip
from arena.train_state import config_difference
from arena.tta import train_augment


def clip(frames: int = 4, size: int = 48, seed: int = 0) -> torch.Tensor:
    """A smooth gradient with some texture, moving a little from frame to frame: uint8 [T, 3, H, W]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float32)
    out = [np.clip(base + t * 3 + rng.normal(0, 6, base.shape), 0, 255) for t in range(frames)]
    return torch.from_numpy(np.stack(out).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def test_none_is_the_identity():
    frames = clip()
    assert degrade(frames, "none", np.random.default_rng(0)) is frames


@pytest.mark.parametrize("level", ["light", "strong"])
def test_one_draw_for_every_frame_of_a_clip(level):
    still = clip(frames=1).repeat(5, 1, 1, 1)  # five identical frames: one draw gives five identical outputs
    changed = 0
    for seed in range(12):
        out = degrade(still, level, np.random.default_rng(seed))
        assert all(torch.equal(out[0], out[t]) for t in range(1, 5)), seed
        changed += not torch.equal(out, still)
    assert changed >= 6


def test_strong_changes_pixels_more_than_light():
    frames = clip()
    diff = {level: [float((degrade(frames, level, np.random.default_rng(s)).float() - frames.float()).abs().mean())
                    for s in range(16)] for level in ("light", "strong")}
    assert sum(d > 0 for d in diff["strong"]) >= 14  # nothing at all drawn: about 1 clip in 80
    assert np.mean(diff["strong"]) > np.mean(diff["light"]) > 0


@pytest.mark.parametrize("level", LEVELS)
def test_a_seed_gives_the_same_clip_and_dtype_shape_device_are_kept(level):
    frames = clip()
    a = degrade(frames, level, np.random.default_rng([3, 1, 7]))
    b = degrade(frames, level, np.random.default_rng([3, 1, 7]))
    assert torch.equal(a, b)
    assert a.dtype == torch.uint8 and a.shape == frames.shape and a.device == frames.device
    if level != "none":
        others = [degrade(frames, level, np.random.default_rng([3, 1, s])) for s in range(8)]
        assert any(not torch.equal(a, o) for o in others)
    assert torch.equal(frames, clip())  # the input is never modified


def test_unknown_levels_and_bad_frames_are_refused():
    with pytest.raises(OptionError, match=r"Invalid --augment \('medium'\). Supported values are none, light, strong"):
        degrade(clip(), "medium", np.random.default_rng(0))
    with pytest.raises(OptionError, match="Invalid --augment"):
        check_level("STRONG")
    with pytest.raises(OptionError, match=r"Invalid --augment \(heavy\)"):
        TrainConfig(data="d", augment="heavy")
    with pytest.raises(OptionError):
        AugmentClip("heavy")
    with pytest.raises(ValueError, match="uint8"):
        degrade(clip().float(), "light", np.random.default_rng(0))


def test_the_training_hook_degrades_first_and_leaves_train_augment_draws_as_they_were():
    frames = clip()
    rng = lambda: np.random.default_rng([0, 2, 5])  # noqa: E731 - what ClipDataset hands the hook
    assert torch.equal(AugmentClip("none")(frames, rng()), train_augment(frames, rng=rng()))
    r = rng()
    want = train_augment(degrade(frames, "strong", rng().spawn(1)[0]), rng=rng())
    assert torch.equal(AugmentClip("strong")(frames, r), want)


def test_the_spec_is_json_and_runs_saved_before_augment_still_resume():
    for level in LEVELS:
        spec = augment_spec(level)
        assert json.loads(json.dumps(spec)) == spec and spec["level"] == level
    names = [t["__class_fullname__"] for t in augment_spec("strong")["transforms"]]
    assert names == ["OneOf", "ToGray", "GaussianBlur", "GaussNoise", "Downscale", "ImageCompression"]
    now = {"lr": 1e-4, "augment": "none", "augment_policy": augment_spec("none"), "fold": None}
    assert config_difference({"lr": 1e-4}, now) == []  # a last.pt from before --augment and --fold
    assert config_difference({"lr": 1e-4}, {**now, "augment": "light"}) == ["augment: saved None, now 'light'"]
