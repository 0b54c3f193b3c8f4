"""Crop geometry: a box with a margin around the face, cut from the full-resolution frame, and the letterbox.

Every output pixel goes through `arena.video.resize_frames` (antialiased bilinear), the one resize of the
package, so a crop made for the cache, for training or for the submission is the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from arena.video import resize_frames

__all__ = ["crop_boxes", "cut_boxes", "detection_scale", "letterbox"]


def crop_boxes(cxcywh: np.ndarray, margin: float, size: tuple[int, int]) -> np.ndarray:
    """Integer crop boxes centred on the faces: shorter side ``margin * max(w, h)``, the aspect of ``size``.

    For a square model input (299 x 299) the box is the square the issue asks for; for another aspect it is
    widened (or heightened) instead of squashing the face.

    Args:
        cxcywh: float ``[T, 4]`` face centre and size in source pixels.
        margin: side of the box over the face's larger side (1.3: 30 % more than the face).
        size: (height, width) of the model input.

    Returns:
        int64 ``[T, 4]`` (x1, y1, x2, y2), x2 and y2 exclusive; they may lie outside the frame (padded black).
    """
    h_out, w_out = size
    side = margin * np.maximum(cxcywh[:, 2], cxcywh[:, 3])
    bw = np.maximum(1, np.round(side * max(1.0, w_out / h_out))).astype(np.int64)
    bh = np.maximum(1, np.round(side * max(1.0, h_out / w_out))).astype(np.int64)
    x1 = np.round(cxcywh[:, 0] - bw / 2).astype(np.int64)
    y1 = np.round(cxcywh[:, 1] - bh / 2).astype(np.int64)
    return np.stack([x1, y1, x1 + bw, y1 + bh], 1)


def cut_boxes(frames: torch.Tensor, rows: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Cut ``boxes[t]`` out of ``frames[rows[t]]``, black where a box extends past the frame, resized to ``size``.

    Padding instead of shifting the box back inside the frame keeps the face centred and whole at the edges.

    Returns:
        uint8 ``[T, 3, size_h, size_w]`` on the frames' device.
    """
    _, _, height, width = frames.shape
    out = torch.empty((len(rows), 3, *size), dtype=torch.uint8, device=frames.device)
    for t, (r, (x1, y1, x2, y2)) in enumerate(zip(rows.tolist(), boxes.tolist(), strict=True)):
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if (sx1, sy1, sx2, sy2) == (x1, y1, x2, y2):  # inside the frame: no canvas (same pixels, less work)
            out[t] = resize_frames(frames[r, :, y1:y2, x1:x2], size)
            continue
        canvas = torch.zeros((3, y2 - y1, x2 - x1), dtype=torch.uint8, device=frames.device)
        if sx2 > sx1 and sy2 > sy1:
            canvas[:, sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frames[r, :, sy1:sy2, sx1:sx2]
        out[t] = resize_frames(canvas, size)
    return out


def letterbox(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Whole frames scaled to fit ``size`` with their aspect kept, centred between black bars (the no-face case)."""
    _, _, height, width = frames.shape
    h_out, w_out = size
    scale = min(h_out / height, w_out / width)
    h = min(h_out, max(1, round(height * scale)))
    w = min(w_out, max(1, round(width * scale)))
    out = torch.zeros((frames.shape[0], 3, h_out, w_out), dtype=torch.uint8, device=frames.device)
    top, left = (h_out - h) // 2, (w_out - w) // 2
    out[:, :, top : top + h, left : left + w] = resize_frames(frames, (h, w))
    return out


def detection_scale(height: int, width: int, detect_size: int) -> tuple[int, int]:
    """(height, width) of the copy the detector sees: long side at most ``detect_size``, never upscaled."""
    scale = min(1.0, detect_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))
