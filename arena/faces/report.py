"""``arena faces``: run the face stage on videos, report what it found, and draw the crops the backbone would see.

A user looks at these before trusting ``--crop faces``: how many sampled frames rest on a detected face, how
many faces were tracked, how big they are, what it cost, and a PNG strip of the exact crops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np

from arena._files import atomic_write_bytes
from arena.errors import VideoDecodeError
from arena.faces.stage import FaceCropConfig, FaceCropper, FaceCrops
from arena.runtime import resolve_device
from arena.sampling import uniform_indices
from arena.video import decode_selected

__all__ = ["face_report", "strip_image", "write_strip"]

#: Tile borders in the strip (RGB): the box rests on detections around the frame / was carried over / letterbox.
_COVERED, _CARRIED, _LETTERBOX = (40, 200, 40), (240, 150, 0), (128, 128, 128)


def face_report(paths, *, frames: int = 24, config: FaceCropConfig | None = None, image_size: int = 299,
                device: str = "auto", strip_dir: str | os.PathLike | None = None,
                cropper: FaceCropper | None = None) -> list[dict]:
    """One JSON-able dict per video: decode ``frames`` uniform frames plus the detection frames, crop, summarise.

    Never raises for a bad file: its ``status`` is "error" and ``message`` says why; "ok" means every sampled
    frame's box rests on detections of the main track, "partial" that some do not or that no face was found
    (whole frame, letterboxed) or that some frames could not be decoded.

    Args:
        paths: video files.
        frames: frames sampled per video, as the model would (``uniform_indices(n, frames)``).
        config: face crop settings (default `FaceCropConfig()`).
        image_size: side of the square crops (the model input).
        device: where the detector runs (auto, cpu, cuda, cuda:N); frames are decoded on the CPU.
        strip_dir: if given, one PNG per video of the crops (see `strip_image`), named after the video.
        cropper: a ready cropper (tests hand in one with a stand-in detector); default: built from ``config``.
    """
    cropper = cropper or FaceCropper(config or FaceCropConfig(), device=resolve_device(device))
    size = (image_size, image_size)
    rows, names = [], set()
    for path in paths:
        row: dict = {"file": str(path)}
        start = time.process_time()
        try:
            row.update(_one_video(path, cropper, frames, size))
        except VideoDecodeError as exc:
            row.update(status="error", message=exc.reason, cpu_seconds=round(time.process_time() - start, 3))
            rows.append(row)
            continue
        crops = row.pop("_crops")
        row["cpu_seconds"] = round(time.process_time() - start, 3)
        if strip_dir is not None:
            name = _unique_name(Path(path).stem, names)
            row["strip"] = str(write_strip(crops, Path(strip_dir) / f"{name}.png"))
        rows.append(row)
    return rows


def _one_video(path, cropper: FaceCropper, k: int, size: tuple[int, int]) -> dict:
    def select(n: int) -> np.ndarray:
        return np.union1d(uniform_indices(n, k), cropper.detection_indices(n))

    clip = decode_selected(path, select, size=None)
    n = clip.num_source_frames
    want = uniform_indices(n, k)
    crops = cropper.crop(clip.frames, clip.frame_indices, want, size, num_source_frames=n)
    with_face = int(crops.covered[0].sum()) if crops.found else 0
    messages = [crops.message] + ([f"decode: {clip.message}"] if clip.partial else [])
    ok = crops.found and with_face == len(want) and not clip.partial
    main = crops.boxes[0]
    return {
        "status": "ok" if ok else "partial",
        "message": "; ".join(messages),
        "num_source_frames": n,
        "sampled": len(want),
        "with_face": with_face,
        "detection_frames": crops.detection_frames,
        "detection_frames_with_face": crops.frames_with_face,
        "tracks": crops.num_tracks,
        "tracks_kept": int(crops.crops.shape[0]) if crops.found else 0,
        "main_track_detections": int(crops.track_detections[0]),
        "box_px": float(np.median(main[:, 2] - main[:, 0])) if crops.found else None,
        "found": crops.found,
        "_crops": crops,
    }


def _unique_name(stem: str, taken: set[str]) -> str:
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}"
    taken.add(name)
    return name


def strip_image(crops: FaceCrops, *, columns: int = 8, border: int = 2, gap: int = 8) -> np.ndarray:
    """The crops as one RGB image: a block of rows per track (main first), ``columns`` frames per row.

    Each tile is the crop as the backbone receives it, framed green where its box rests on detections around
    the frame, orange where the box was carried over a miss or past the track's ends, grey for the letterbox.

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    c = crops.crops.cpu()
    n, t, _, h, w = c.shape
    cols = min(columns, t)
    grid_rows = -(-t // cols)
    th, tw = h + 2 * border, w + 2 * border
    block_h = grid_rows * th
    image = np.full((n * block_h + (n - 1) * gap, cols * tw, 3), 255, dtype=np.uint8)
    for i in range(n):
        for j in range(t):
            y = i * (block_h + gap) + (j // cols) * th
            x = (j % cols) * tw
            colour = _LETTERBOX if not crops.found else _COVERED if crops.covered[i, j] else _CARRIED
            image[y : y + th, x : x + tw] = colour
            image[y + border : y + border + h, x + border : x + border + w] = c[i, j].permute(1, 2, 0).numpy()
    return image


def write_strip(crops: FaceCrops, path: str | os.PathLike, *, columns: int = 8) -> Path:
    """Write `strip_image` as a PNG (atomically; folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(strip_image(crops, columns=columns)[:, :, ::-1]))
    if not ok:
        raise OSError(f"could not encode the strip for {path} as PNG")
    return atomic_write_bytes(path, data.tobytes())
