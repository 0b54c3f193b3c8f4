"""Self-Blended Images for clips: a pseudo-fake made from one real clip alone.

Self-Blended Images (Shiohara & Yamasaki, CVPR 2022) blends a real face with a jittered copy of itself — colour,
sharpness or resolution, a small affine — under a blurred, deformed face-shaped mask, and labels the result fake.
Trained on such pairs a detector learns the traces every face swap leaves (a blending boundary, a region whose
colour, frequency content or alignment disagrees with the rest) instead of one generator's fingerprint, which is
why it generalises to manipulations it never saw.

For video, one draw per clip is applied to every frame (a swap is one manipulation of a whole clip) with a small
temporal drift of the mask and of the source's alignment, as a swapped face moves a little against its surround
from frame to frame. Outside the mask the clip keeps its exact pixels, so the label depends on the region only.

Colour and frequency jitters are albumentations transforms applied to all frames at once (``images=``: one set of
parameters for the clip), seeded from the caller's generator; geometry, mask and blending use OpenCV and numpy.
`self_blend` is a pure function of the frames, the box and the state of ``rng``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# albumentations asks PyPI for a newer version at import time; never do network I/O behind the user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from arena.errors import OptionError  # noqa: E402

__all__ = ["SbiConfig", "SelfBlend", "face_square", "self_blend"]


@dataclass(frozen=True)
class SbiConfig:
    """Ranges of the self-blend's random draws (defaults after SBI's source-target generator and mask generator).

    Lengths are fractions of the face box's side (the square root of its area), so the draw means the same at
    112 px and at 1080p. Pairs are ``(low, high)`` ranges drawn uniformly.

    Attributes:
        rgb_shift: per-channel shift, in 0..255 levels, applied to 30 % of the clips (SBI: 20).
        hue_shift: hue shift in OpenCV hue units (0..180).
        sat_shift: saturation shift in 0..255 levels.
        val_shift: value (brightness in HSV) shift in 0..255 levels.
        brightness: brightness change, a fraction of the maximum.
        contrast: contrast change, a fraction.
        downscale: resolution of the resize down-and-up (one of the three frequency jitters, as a fraction).
        blur_sigma: gaussian blur sigma in pixels (the second frequency jitter).
        sharpen_alpha: sharpening strength (the third).
        translate: shift of the source against the target, each axis.
        scale: zoom of the source about the face centre.
        mask_scale: the mask's radii over the face box's half-sides (below 1 shrinks it, above 1 dilates it).
        elastic: amplitude of the mask's elastic deformation.
        mask_blur: gaussian sigma of the mask's soft edge.
        blend: opacity of the source at the mask's peak.
        drift: largest temporal drift over the clip, of the mask and of the source's alignment (each its own).
        face_size: without a box, the side of the random face-sized region as a fraction of the frame's shorter side.
    """

    rgb_shift: float = 20.0
    hue_shift: float = 5.0
    sat_shift: float = 20.0
    val_shift: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    downscale: tuple[float, float] = (0.25, 0.5)
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    sharpen_alpha: tuple[float, float] = (0.2, 0.5)
    translate: float = 0.03
    scale: tuple[float, float] = (0.95, 1 / 0.95)
    mask_scale: tuple[float, float] = (0.75, 1.05)
    elastic: float = 0.04
    mask_blur: tuple[float, float] = (0.03, 0.12)
    blend: tuple[float, float] = (0.5, 1.0)
    drift: float = 0.015
    face_size: tuple[float, float] = (0.3, 0.55)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            values = value if isinstance(value, tuple) else (value,)
            if len(values) not in (1, 2) or any(not np.isfinite(v) or v < 0 for v in values):
                raise OptionError(f"SbiConfig.{name} must be a number >= 0 or a (low, high) pair, got {value!r}.")
            if len(values) == 2 and values[0] > values[1]:
                raise OptionError(f"SbiConfig.{name} must be (low, high) with low <= high, got {value!r}.")
        if not 0 < self.downscale[0] <= self.downscale[1] < 1:
            raise OptionError(f"SbiConfig.downscale must lie in (0, 1), got {self.downscale!r}.")
        if self.blend[1] > 1 or self.blend[0] <= 0:
            raise OptionError(f"SbiConfig.blend must lie in (0, 1], got {self.blend!r}.")
        if self.face_size[1] > 1 or self.face_size[0] <= 0:
            raise OptionError(f"SbiConfig.face_size must lie in (0, 1], got {self.face_size!r}.")


class SelfBlend(NamedTuple):
    """A self-blended clip: ``frames`` uint8 ``[T, H, W, 3]`` and the blend weight ``mask`` float32 ``[T, H, W]``
    (0 where the pixels are the input's exactly, the source's opacity elsewhere)."""

    frames: np.ndarray
    mask: np.ndarray


def face_square(size: tuple[int, int], margin: float) -> tuple[float, float, float, float]:
    """The face box inside a face crop of ``size`` (height, width): the centred square whose side is the crop's
    shorter side over ``margin`` (`arena.faces.crop.crop_boxes` makes the shorter side ``margin`` times the face's
    larger side). Pass it as ``box`` to `self_blend` for crops."""
    if margin < 1:
        raise OptionError(f"margin must be >= 1 (crop side over face side), got {margin!r}.")
    h, w = size
    side = min(h, w) / margin
    x1, y1 = (w - side) / 2, (h - side) / 2
    return x1, y1, x1 + side, y1 + side


def self_blend(frames: np.ndarray, *, rng: np.random.Generator, box: np.ndarray | tuple[float, ...] | None = None,
               config: SbiConfig | None = None) -> SelfBlend:
    """Blend a real clip with a jittered copy of itself under a face-shaped mask (one draw for the whole clip).

    Args:
        frames: uint8 ``[T, H, W, 3]`` RGB, one clip (whole frames or face crops).
        rng: the only source of randomness: the same generator state gives the same result.
        box: the face box ``(x1, y1, x2, y2)`` in pixels (x2, y2 exclusive), one for the clip (``[4]``) or one per
            frame (``[T, 4]``: the mask follows it); for face crops `face_square`. ``None``, or a box with a NaN
            (the letterboxed no-face case), uses a random face-sized region.
        config: the ranges drawn from (default `SbiConfig()`).

    Returns:
        `SelfBlend` ``(frames, mask)``: the blended clip (same shape and dtype) and the blend weight per pixel.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T, H, W >= 1, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    cfg = config or SbiConfig()
    t, h, w, _ = frames.shape
    boxes = _face_boxes(box, t, h, w, rng, cfg)
    side = float(np.sqrt((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])))
    mask0 = _reference_mask(boxes[0], (h, w), side, rng, cfg) * rng.uniform(*cfg.blend)
    source = _jitter(frames, rng, cfg)
    # The face moves with its box; the mask and the source's alignment each drift a little on top of it.
    to_frame = _box_motion(boxes)
    mask_drift, source_drift = _drift(t, side * cfg.drift, rng), _drift(t, side * cfg.drift, rng)
    zoom = rng.uniform(*cfg.scale)
    shift = rng.uniform(-cfg.translate, cfg.translate, 2) * side
    out = np.empty_like(frames)
    masks = np.empty((t, h, w), dtype=np.float32)
    for i in range(t):
        move = to_frame[i].copy()
        move[:, 2] += mask_drift[i]
        masks[i] = cv2.warpAffine(mask0, move, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0)
        cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
        affine = np.array([[zoom, 0.0, (1 - zoom) * cx], [0.0, zoom, (1 - zoom) * cy]], dtype=np.float64)
        affine[:, 2] += shift + source_drift[i]
        src = cv2.warpAffine(source[i], affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out[i] = _paste(frames[i], src, masks[i])
    return SelfBlend(out, masks)


def _face_boxes(box, t: int, h: int, w: int, rng: np.random.Generator, cfg: SbiConfig) -> np.ndarray:
    """Float ``[T, 4]`` face boxes: the given ones (one repeated for the clip), else one random face-sized box."""
    if box is not None:
        arr = np.asarray(box, dtype=np.float64)
        if arr.shape not in ((4,), (t, 4)):
            raise ValueError(f"box must be (x1, y1, x2, y2) or one per frame [{t}, 4], got shape {arr.shape}")
        arr = np.broadcast_to(arr, (t, 4))
        if np.isfinite(arr).all():
            if (arr[:, 2] <= arr[:, 0]).any() or (arr[:, 3] <= arr[:, 1]).any():
                raise ValueError("box must have x2 > x1 and y2 > y1 (pixels, x2 and y2 exclusive)")
            return arr.copy()
    # A face-sized region: a little taller than wide, as faces are, and whole inside the frame.
    side = rng.uniform(*cfg.face_size) * min(h, w)
    bw, bh = side, min(side * rng.uniform(1.0, 1.2), 0.95 * h)
    cx, cy = rng.uniform(bw / 2, w - bw / 2), rng.uniform(bh / 2, h - bh / 2)
    return np.tile([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], (t, 1))


def _reference_mask(box: np.ndarray, size: tuple[int, int], side: float, rng: np.random.Generator,
                    cfg: SbiConfig) -> np.ndarray:
    """The mask of the first frame, float32 ``[H, W]`` with peak 1 and exact zeros outside its support: a random
    convex polygon around an ellipse in the box (SBI: the landmarks' convex hull), elastically deformed, blurred.

    The work is done on the polygon's neighbourhood only, so its cost follows the face's size, not the frame's.
    """
    h, w = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx = (box[2] - box[0]) / 2 * rng.uniform(*cfg.mask_scale)
    ry = (box[3] - box[1]) / 2 * rng.uniform(*cfg.mask_scale)
    n = int(rng.integers(8, 17))
    # vertices spread all round (jittered even spacing): uniform angles can bunch up and give a sliver
    angles = (np.arange(n) + rng.uniform(-0.4, 0.4, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(0.85, 1.1, n)
    points = np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], axis=1)
    sigma = rng.uniform(*cfg.mask_blur) * side
    elastic = cfg.elastic * side
    pad = elastic + 4 * sigma + 2  # the blur's and the deformation's reach around the polygon
    x0, y0 = (max(0, int(np.floor(points[:, i].min() - pad))) for i in (0, 1))
    x1, y1 = min(w, int(np.ceil(points[:, 0].max() + pad))), min(h, int(np.ceil(points[:, 1].max() + pad)))
    full = np.zeros((h, w), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:  # a box wholly outside the frame: nothing to blend
        return full
    rh, rw = y1 - y0, x1 - x0
    hull = cv2.convexHull(np.round((points - (x0, y0)) * 16).astype(np.int32))  # 4 fractional bits: smooth at 64 px
    hard = np.zeros((rh, rw), dtype=np.float32)
    cv2.fillConvexPoly(hard, hull, 1.0, lineType=cv2.LINE_AA, shift=4)
    # Elastic deformation: random displacements on a coarse grid (a third of the face apart), smoothly
    # interpolated (the jaw and cheeks of a real mask are not convex).
    cell = max(2.0, side / 3)
    grid = (int(np.ceil(rh / cell)) + 2, int(np.ceil(rw / cell)) + 2)
    field = [cv2.resize(rng.standard_normal(grid).astype(np.float32), (rw, rh), interpolation=cv2.INTER_CUBIC)
             for _ in range(2)]
    peak = max(float(np.abs(f).max()) for f in field) or 1.0
    gx, gy = np.meshgrid(np.arange(rw, dtype=np.float32), np.arange(rh, dtype=np.float32))
    warped = cv2.remap(hard, gx + (elastic / peak) * field[0], gy + (elastic / peak) * field[1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    soft = cv2.GaussianBlur(warped, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT) if sigma >= 0.3 else warped
    top = float(soft.max())
    if top <= 0:
        return full
    soft = soft / top
    soft[soft < 1e-3] = 0.0  # a finite support, so "outside the mask" is exact
    full[y0:y1, x0:x1] = soft
    return full


def _jitter(frames: np.ndarray, rng: np.random.Generator, cfg: SbiConfig) -> np.ndarray:
    """The source's colour and frequency jitter: one albumentations draw applied to every frame."""
    h, w = frames.shape[1:3]
    # Downscale needs at least 1 px at the lower scale; a very small frame gets blur or sharpening instead.
    can_downscale = min(h, w) * cfg.downscale[0] >= 2
    frequency = [
        *([A.Downscale(scale_range=cfg.downscale, interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                      "upscale": cv2.INTER_LINEAR}, p=0.5)]
          if can_downscale else []),
        A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=0.25),  # OneOf: p are the choice's weights
        A.Sharpen(alpha=cfg.sharpen_alpha, lightness=(0.5, 1.0), p=0.25),
    ]
    transform = A.Compose([
        A.RGBShift(r_shift_limit=cfg.rgb_shift, g_shift_limit=cfg.rgb_shift, b_shift_limit=cfg.rgb_shift, p=0.3),
        A.HueSaturationValue(hue_shift_limit=cfg.hue_shift, sat_shift_limit=cfg.sat_shift,
                             val_shift_limit=cfg.val_shift, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=1.0),
        A.OneOf(frequency, p=1.0),  # SBI: resize down-and-up or sharpen; blur as well (half the draws resize)
    ], seed=int(rng.integers(0, 2**31 - 1)))
    return transform(images=frames)["images"]


def _box_motion(boxes: np.ndarray) -> np.ndarray:
    """``[T, 2, 3]`` affine maps from the first frame's box to each frame's box (scale per axis, then shift)."""
    sx = (boxes[:, 2] - boxes[:, 0]) / (boxes[0, 2] - boxes[0, 0])
    sy = (boxes[:, 3] - boxes[:, 1]) / (boxes[0, 3] - boxes[0, 1])
    out = np.zeros((len(boxes), 2, 3), dtype=np.float64)
    out[:, 0, 0], out[:, 1, 1] = sx, sy
    out[:, 0, 2] = boxes[:, 0] - sx * boxes[0, 0]
    out[:, 1, 2] = boxes[:, 1] - sy * boxes[0, 1]
    return out


def _drift(t: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """``[T, 2]`` smooth (x, y) offsets in pixels, 0 at the first frame and at most ``amplitude`` from it."""
    amp = rng.uniform(0.0, amplitude / 2, 2)
    cycles = rng.uniform(0.3, 1.0, 2)  # per clip: slow, as a swapped face slides against its surround
    phase = rng.uniform(0, 2 * np.pi, 2)
    s = np.linspace(0.0, 1.0, t)[:, None]
    return amp * (np.sin(2 * np.pi * cycles * s + phase) - np.sin(phase))


def _paste(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``source`` over ``target`` with opacity ``mask``; pixels where the mask is 0 keep their exact value."""
    out = target.copy()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return out
    roi = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # only the mask's bounding box: a face, not a frame
    t, m = target[roi].astype(np.float32), mask[roi][..., None]
    mixed = np.clip(np.rint(t + (source[roi].astype(np.float32) - t) * m), 0, 255).astype(np.uint8)
    out[roi] = np.where(m > 0, mixed, target[roi])
    return out
