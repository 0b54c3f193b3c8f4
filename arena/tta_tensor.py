"""The TTA views of `arena.tta` as tensor operations, on the device the frames are on (the GPU pipeline, issue 16).

`arena.tta` makes the five views with albumentations on the CPU, in the decoding workers: on a GPU machine that
costs more CPU time per video than decoding does. Here the same views are torch operations on a batch of decoded
uint8 frames, so they run on the GPU right before the backbone:

* ``hflip``: ``torch.flip`` -- equal bit for bit.
* ``brightness_up`` / ``brightness_down``: a 256-entry lookup table made by running `arena.tta.tta_view` itself on
  the 256 levels -- equal bit for bit, whatever albumentations' rounding.
* ``shift_scale_rotate``: albumentations' own matrix (`arena.tta.ssr_matrix`), inverted as OpenCV's
  ``warpAffine`` does, applied with ``grid_sample`` (bilinear, ``align_corners=True``, reflection padding, which
  for whole-pixel reflection about the edge pixels is OpenCV's ``BORDER_REFLECT_101``). Not bit-exact: OpenCV
  rounds its interpolation in its own way. Measured on the shared face clips (tests/test_tta_tensor.py): at most
  1 level apart, on about 4 values in 100,000 (mean absolute difference 0.00004 level).

Views are frame-wise like `arena.tta`'s: ``tensor_view(frames[idx], v) == tensor_view(frames, v)[idx]``.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from arena.errors import OptionError
from arena.tta import VARIANTS, _check_frames, ssr_matrix, tta_spec, tta_view

#: The geometric view this module reproduces; a change of `arena.tta`'s parameters beyond the matrix (another
#: border or interpolation) must be reproduced here too, so it is refused rather than silently approximated.
_SSR_SUPPORTED = {"interpolation": "linear", "border": "reflect_101"}


def _check_ssr_spec() -> None:
    spec = tta_spec()["shift_scale_rotate"]
    for key, value in _SSR_SUPPORTED.items():
        if spec[key] != value:
            raise OptionError(f"arena.tta's shift_scale_rotate uses {key}={spec[key]!r}; the tensor views "
                              f"(arena.tta_tensor) reproduce only {value!r}. Build the views on the CPU.")


@functools.cache
def _ssr_grid_cpu(height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid ``[1, H, W, 2]`` (x, y in -1..1, ``align_corners=True``) of the shift_scale_rotate view:
    for every output pixel, the source position OpenCV's ``warpAffine`` reads (the inverse of the view's matrix),
    computed in float64."""
    _check_ssr_spec()
    inverse = cv2.invertAffineTransform(ssr_matrix(height, width)[:2])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    gx = 2.0 * sx / (width - 1) - 1.0 if width > 1 else np.zeros_like(sx)
    gy = 2.0 * sy / (height - 1) - 1.0 if height > 1 else np.zeros_like(sy)
    return torch.from_numpy(np.stack([gx, gy], axis=-1)).float().unsqueeze(0)


@functools.cache
def _ssr_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    return _ssr_grid_cpu(height, width).to(device)


@functools.cache
def _lut_cpu(variant: str) -> torch.Tensor:
    """uint8 ``[256]``: what `arena.tta.tta_view` makes of each level (the brightness views are per-pixel maps)."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    out = tta_view(levels, variant)[0, :, 0]
    if not (torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])):
        raise OptionError(f"the {variant} view is not the same map on every channel; the tensor views "
                          "(arena.tta_tensor) cannot reproduce it. Build the views on the CPU.")
    return out[0].contiguous()


@functools.cache
def _lut(variant: str, device: torch.device) -> torch.Tensor:
    return _lut_cpu(variant).to(device)


def _shift_scale_rotate(frames: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The geometric view in float32, ``chunk`` frames at a time (bounds the float copy: 64 frames at 299² are
    69 MB)."""
    _, _, h, w = frames.shape
    grid = _ssr_grid(int(h), int(w), frames.device)
    out = torch.empty_like(frames)
    for start in range(0, frames.shape[0], chunk):
        x = frames[start : start + chunk].float()
        y = F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="reflection",
                          align_corners=True)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def tensor_view(frames: torch.Tensor, variant: str) -> torch.Tensor:
    """One test-time view of a clip, made where the frames are (CPU or GPU); `arena.tta.tta_view`'s contract.

    Args:
        frames: uint8 ``[T, 3, H, W]`` RGB, on any device.
        variant: one of `arena.tta.VARIANTS`.

    Returns:
        uint8 ``[T, 3, H, W]`` on ``frames.device``, a new tensor (also for ``original``).
    """
    _check_frames(frames)
    if variant == "original":
        return frames.clone()
    if variant == "hflip":
        return torch.flip(frames, dims=[-1])
    if variant == "shift_scale_rotate":
        return _shift_scale_rotate(frames)
    if variant in ("brightness_up", "brightness_down"):
        return _lut(variant, frames.device)[frames.int()]
    raise OptionError(f"Unknown TTA variant {variant!r}. Supported values are {', '.join(VARIANTS)}.")


def tensor_views(frames: torch.Tensor, variants: tuple[str, ...] | list[str] = VARIANTS) -> torch.Tensor:
    """All requested views stacked: uint8 ``[V, T, 3, H, W]`` on ``frames.device``, in the order of ``variants``."""
    if len(variants) == 0:
        raise OptionError(f"variants is empty; pick from {', '.join(VARIANTS)}.")
    return torch.stack([tensor_view(frames, v) for v in variants])
