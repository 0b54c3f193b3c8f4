"""Test-time views and training augmentation of decoded clips (uint8 in, uint8 out).

Every transform draws its parameters once per clip and applies them to every frame (albumentations'
``images=`` target), so the frames of a video stay consistent. TTA views have fixed parameters: a view is a
pure function of the pixels, and ``tta_view(frames[idx], v) == tta_view(frames, v)[idx]`` bit for bit, which
lets the cache compute a view once on the union of frame indices and slice it for every frame count.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time; never do network I/O behind the user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from arena.errors import OptionError  # noqa: E402

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")

# Fixed parameters of the geometric view: the seed's ShiftScaleRotate(shift 0.05, scale 0.05) at the edge of its
# range plus a small rotation, as one deterministic A.Affine. Reflect borders: no black wedges for the model.
_SSR = {"translate": 0.05, "scale": 1.05, "rotate_degrees": 5.0, "interpolation": "linear", "border": "reflect_101"}
_BRIGHTNESS = 0.1  # fraction of 255 added (+) or subtracted (-), saturating at 0/255


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor uint8 [T, 3, H, W]; got {type(frames).__name__}.")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [T, 3, H, W]; got {frames.dtype} {tuple(frames.shape)}.")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T = 0): nothing to transform.")


def _to_numpy(frames: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(frames.detach().cpu().permute(0, 2, 3, 1).numpy())  # [T, H, W, 3]


def _to_torch(images: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(like.device)


def _apply(compose: A.Compose, frames: torch.Tensor) -> torch.Tensor:
    """Run one albumentations pipeline over all frames at once (one parameter draw for the clip)."""
    out = compose(images=_to_numpy(frames))["images"]
    return _to_torch(np.asarray(out), frames)


@functools.cache
def _variant_pipeline(variant: str) -> A.Compose:
    if variant == "hflip":
        ops: list[Any] = [A.HorizontalFlip(p=1.0)]
    elif variant == "shift_scale_rotate":
        t, s, r = _SSR["translate"], _SSR["scale"], _SSR["rotate_degrees"]
        ops = [A.Affine(translate_percent={"x": (t, t), "y": (t, t)}, scale=(s, s), rotate=(r, r),
                        interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_REFLECT_101, p=1.0)]
    elif variant in ("brightness_up", "brightness_down"):
        b = _BRIGHTNESS if variant == "brightness_up" else -_BRIGHTNESS
        ops = [A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(0.0, 0.0), p=1.0)]
    else:
        raise OptionError(f"Unknown TTA variant {variant!r}. Supported values are {', '.join(VARIANTS)}.")
    return A.Compose(ops, p=1.0)


def tta_view(frames: torch.Tensor, variant: str) -> torch.Tensor:
    """One deterministic test-time view of a clip.

    Args:
        frames: uint8 ``[T, 3, H, W]`` RGB.
        variant: one of :data:`VARIANTS`.

    Returns:
        uint8 ``[T, 3, H, W]``, a new tensor (also for ``original``).
    """
    _check_frames(frames)
    if variant == "original":
        return frames.clone()
    return _apply(_variant_pipeline(variant), frames)


def tta_views(frames: torch.Tensor, variants: tuple[str, ...] | list[str] = VARIANTS) -> torch.Tensor:
    """All requested views stacked: uint8 ``[V, T, 3, H, W]`` in the order of ``variants``."""
    if len(variants) == 0:
        raise OptionError(f"variants is empty; pick from {', '.join(VARIANTS)}.")
    return torch.stack([tta_view(frames, v) for v in variants])


def ssr_matrix(height: int, width: int) -> np.ndarray:
    """The 3x3 float64 matrix (source -> view pixel coordinates) of the ``shift_scale_rotate`` view of a
    ``height`` x ``width`` frame, as albumentations computes it for that size.

    `arena.tta_tensor` applies the same matrix with torch, so both paths follow this one definition.
    """
    affine = _variant_pipeline("shift_scale_rotate").transforms[0]
    return np.asarray(affine.get_params_dependent_on_data({"shape": (int(height), int(width), 3)}, {})["matrix"],
                      dtype=np.float64)


def tta_spec() -> dict[str, Any]:
    """JSON-able description of the views (stored in cache provenance; any change here invalidates caches)."""
    return {
        "variants": list(VARIANTS),
        "hflip": {"axis": "width"},
        "shift_scale_rotate": dict(_SSR),
        "brightness_up": {"brightness": _BRIGHTNESS, "contrast": 0.0, "by_max": True},
        "brightness_down": {"brightness": -_BRIGHTNESS, "contrast": 0.0, "by_max": True},
        "library": f"albumentations=={A.__version__}",
    }


@dataclass(frozen=True)
class TrainAugmentConfig:
    """Mild clip-level augmentation for training.

    Deliberately no blur, noise or recompression: the cue we learn is local high-frequency texture (blend
    boundaries that wipe the grain), and those would erase it on real clips too. Plain shifts are whole-pixel
    (lossless); scale/rotation resample and are kept rare.
    """

    p_flip: float = 0.5
    p_shift: float = 0.5
    max_shift: float = 0.04          # fraction of the side, rounded to whole pixels
    p_affine: float = 0.2
    max_scale: float = 0.05          # scale drawn in [1 - s, 1 + s]
    max_rotate_degrees: float = 5.0
    p_color: float = 0.5
    brightness: float = 0.1          # additive, fraction of 255
    contrast: float = 0.1            # multiplicative around 1

    def __post_init__(self) -> None:
        for name in ("p_flip", "p_shift", "p_affine", "p_color"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {value}.")
        for name in ("max_shift", "max_scale", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value <= 0.5:
                raise ValueError(f"{name} must be in [0, 0.5] (keep augmentation mild); got {value}.")
        if not 0.0 <= self.max_rotate_degrees <= 45.0:
            raise ValueError(f"max_rotate_degrees must be in [0, 45]; got {self.max_rotate_degrees}.")


def train_augment_params(rng: np.random.Generator, height: int, width: int,
                         config: TrainAugmentConfig | None = None) -> dict[str, Any]:
    """Draw one clip's augmentation parameters (always the same number of draws, so streams stay aligned)."""
    c = config or TrainAugmentConfig()
    u = rng.random(4)
    shift = rng.uniform(-c.max_shift, c.max_shift, size=2)
    scale = float(rng.uniform(1.0 - c.max_scale, 1.0 + c.max_scale))
    rotate = float(rng.uniform(-c.max_rotate_degrees, c.max_rotate_degrees))
    brightness = float(rng.uniform(-c.brightness, c.brightness))
    contrast = float(rng.uniform(-c.contrast, c.contrast))
    return {
        "flip": bool(u[0] < c.p_flip),
        "shift_px": (int(round(shift[0] * width)), int(round(shift[1] * height))) if u[1] < c.p_shift else (0, 0),
        "affine": {"scale": scale, "rotate": rotate} if u[2] < c.p_affine else None,
        "color": {"brightness": brightness, "contrast": contrast} if u[3] < c.p_color else None,
    }


def train_augment(frames: torch.Tensor, *, rng: np.random.Generator,
                  config: TrainAugmentConfig | None = None) -> torch.Tensor:
    """Randomly augment a training clip: one draw from ``rng``, applied to every frame.

    Args:
        frames: uint8 ``[T, 3, H, W]``.
        rng: the caller's generator (seed it per epoch/worker for reproducible runs).
        config: magnitudes and probabilities; defaults to :class:`TrainAugmentConfig`.

    Returns:
        uint8 ``[T, 3, H, W]``.
    """
    _check_frames(frames)
    params = train_augment_params(rng, int(frames.shape[2]), int(frames.shape[3]), config)
    ops: list[Any] = []
    if params["flip"]:
        ops.append(A.HorizontalFlip(p=1.0))
    if params["shift_px"] != (0, 0):
        dx, dy = params["shift_px"]
        ops.append(A.Affine(translate_px={"x": (dx, dx), "y": (dy, dy)}, interpolation=cv2.INTER_NEAREST,
                            border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if params["affine"] is not None:
        s, r = params["affine"]["scale"], params["affine"]["rotate"]
        ops.append(A.Affine(scale=(s, s), rotate=(r, r), interpolation=cv2.INTER_LINEAR,
                            border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if params["color"] is not None:
        b, k = params["color"]["brightness"], params["color"]["contrast"]
        ops.append(A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(k, k), p=1.0))
    if not ops:
        return frames.clone()
    return _apply(A.Compose(ops, p=1.0), frames)


def train_augment_spec(config: TrainAugmentConfig | None = None) -> dict[str, Any]:
    """JSON-able description of the training augmentation (for run configs)."""
    return {**asdict(config or TrainAugmentConfig()), "library": f"albumentations=={A.__version__}"}
