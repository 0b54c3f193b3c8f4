"""Realistic training degradations (``train-full --augment none|light|strong``): what a video suffers on its way to
the test set, drawn once per clip.

Test videos are recompressed, rescaled, noisy, blurred and colour-graded in ways a training set does not cover; a
model that learnt the blending artefacts of clean clips misreads them. The DFDC winner (Seferbekov) trained against
exactly these: JPEG recompression (quality 60-100, p 0.5), Gaussian noise (p 0.1), a 3-pixel Gaussian blur (p 0.05)
and one of brightness/contrast or hue/saturation (p 0.7), plus grey frames (p 0.2). ``light`` keeps that mix at
milder colour changes and adds an occasional downscale; ``strong`` makes every degradation more likely and harsher.
Flips, shifts and the mild brightness change stay with `arena.tta.train_augment`, which runs after this on every
training clip whatever the level.

A clip gets ONE draw applied to all its frames (albumentations' ``images=`` target: same JPEG quality, the same
noise field, the same colour shift), so the frames of a video stay consistent as in a real recompressed video. The
draw comes from the caller's generator only, so a clip seeded by (seed, epoch, index) is the same in a resumed run,
in any DataLoader worker and on any rank. ``none`` returns the frames untouched. Training only: validation, the
cache and the submission never see these.
"""

from __future__ import annotations

import functools
import json
import os
import random
from typing import Any

import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time; never do network I/O behind the user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from arena.errors import OptionError  # noqa: E402

LEVELS = ("none", "light", "strong")


def check_level(level: str) -> str:
    """``level`` when it is one of :data:`LEVELS`.

    Raises:
        OptionError: any other value.
    """
    if level not in LEVELS:
        raise OptionError(f"Invalid --augment ({level!r}). Supported values are {', '.join(LEVELS)}.")
    return level


def _downscale(scale_range: tuple[float, float], p: float) -> A.Downscale:
    # Area filter down, bilinear back up: a video re-encoded at a lower resolution and shown at the original size.
    return A.Downscale(scale_range=scale_range, p=p,
                       interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR})


@functools.cache
def _policy(level: str) -> A.Compose:
    """The level's pipeline, in the order a video suffers it: grading, optics, sensor, rescaling, encoder."""
    if level == "light":
        ops: list[Any] = [
            A.OneOf([A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.1), contrast_limit=(-0.1, 0.1)),
                     A.HueSaturationValue(hue_shift_limit=(-10, 10), sat_shift_limit=(-15, 15),
                                          val_shift_limit=(-10, 10))], p=0.3),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.8), p=0.05),
            A.GaussNoise(std_range=(0.01, 0.03), p=0.1),
            _downscale((0.6, 0.9), p=0.1),
            A.ImageCompression(compression_type="jpeg", quality_range=(60, 100), p=0.5),
        ]
    elif level == "strong":
        ops = [
            A.OneOf([A.RandomBrightnessContrast(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2)),
                     A.HueSaturationValue(hue_shift_limit=(-20, 20), sat_shift_limit=(-30, 30),
                                          val_shift_limit=(-20, 20))], p=0.7),
            A.ToGray(p=0.1),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.5), p=0.15),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
            _downscale((0.4, 0.9), p=0.25),
            A.ImageCompression(compression_type="jpeg", quality_range=(40, 100), p=0.7),
        ]
    else:
        raise OptionError(f"no degradation pipeline for --augment {level!r}; choose light or strong.")
    return A.Compose(ops, p=1.0)


def degrade(frames: torch.Tensor, level: str, rng: np.random.Generator) -> torch.Tensor:
    """One draw of the level's degradations, applied to every frame of a clip.

    Args:
        frames: uint8 ``[T, 3, H, W]`` RGB.
        level: one of :data:`LEVELS`.
        rng: the only source of randomness (the same generator state gives the same output, bit for bit).

    Returns:
        uint8 ``[T, 3, H, W]`` on the device of ``frames``; ``frames`` itself for ``none``.

    Raises:
        OptionError: an unknown level.
        ValueError: ``frames`` is not a non-empty uint8 ``[T, 3, H, W]`` tensor.
    """
    check_level(level)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be a non-empty uint8 [T, 3, H, W]; got {frames.dtype} {tuple(frames.shape)}.")
    if level == "none":
        return frames
    compose = _policy(level)
    # One generator shared by every transform (albumentations' set_random_state): independent draws per transform,
    # all of them from ``rng``. (set_random_seed would give each transform the same stream, coupling their draws.)
    compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    images = np.ascontiguousarray(frames.detach().cpu().permute(0, 2, 3, 1).numpy())  # [T, H, W, 3]
    out = np.asarray(compose(images=images)["images"])
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous().to(frames.device)


def augment_spec(level: str) -> dict[str, Any]:
    """JSON-able description of the level's pipeline (every transform and argument), for run configs."""
    check_level(level)
    if level == "none":
        return {"level": "none"}
    transforms = A.to_dict(_policy(level))["transform"]["transforms"]
    # Through JSON: lists rather than tuples, so a saved spec compares equal to a fresh one (resume checks it).
    return {"level": level, "library": f"albumentations=={A.__version__}",
            "transforms": json.loads(json.dumps(transforms))}
