"""Synthetic demo dataset and a small video writer used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def ffmpeg_binary() -> str:
    """Return the ffmpeg executable, or raise with what to install."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg not found on PATH. Install it (Debian/Ubuntu: apt-get install -y ffmpeg).")
    return exe


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 25.0,
    *,
    codec: str = "libx264",
    crf: int = 18,
    gop: int = 30,
    pix_fmt: str = "yuv420p",
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Encode RGB frames ``uint8 [T, H, W, 3]`` into a video file with FFmpeg (raw frames piped on stdin).

    Args:
        path: output file; its extension chooses the container.
        frames: uint8 array ``[T, H, W, 3]``; for yuv420p H and W must be even.
        fps: frame rate written into the stream.
        codec: FFmpeg encoder name (``libx264``, ``libx265``, ``mpeg4``...).
        crf: quality for x264/x265 (lower is better).
        gop: keyframe interval in frames (``-g``), which sets how far a seek must decode.
        pix_fmt: output pixel format.
        extra_args: more output options, placed before the file name.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        ffmpeg_binary(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "-",
        "-c:v", codec, "-pix_fmt", pix_fmt, "-g", str(gop),
    ]
    if codec in ("libx264", "libx265"):
        cmd += ["-crf", str(crf), "-preset", "veryfast"]
        if codec == "libx264":
            cmd += ["-bf", "0"] if gop <= 1 else []
        if codec == "libx265":
            cmd += ["-x265-params", "log-level=error"]
    cmd += [*extra_args, str(path)]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace').strip()}")
    return path
