"""The FFmpeg command-line fallback of `arena.video`: ffprobe metadata, sequential decoding, frame counting.

torchcodec cannot decode every real-world file (a stream without a keyframe at the start, corrupted H.264,
truncated files); the ``ffmpeg`` executable decodes what it can of them, in display order. Frames come back as RGB
``[H, W, 3]`` uint8 arrays through a PPM pipe, with their pts read from the ``showinfo`` filter on stderr, so each
one can be matched to torchcodec's scan. Every subprocess runs under a timeout that scales with the file size.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from arena.errors import VideoDecodeError

__all__ = ["Sequential", "decode_sequential", "ffprobe", "frame_count", "packet_pts", "stream_fields",
           "video_stream"]


def ffprobe(path: Path) -> dict:
    """ffprobe's JSON for streams + format; raises VideoDecodeError with ffprobe's own words."""
    cmd = [_ffmpeg_exe(path, "ffprobe"), "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=_timeout_for(path), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise VideoDecodeError(path, f"ffprobe timed out after {e.timeout:.0f} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise VideoDecodeError(path, f"not a readable media file ({err[-1] if err else 'ffprobe failed'})")
    return json.loads(proc.stdout or b"{}")


def video_stream(path: Path, meta: dict) -> dict:
    """The first video stream of ffprobe's JSON (cover pictures left out); `VideoDecodeError` when there is none."""
    streams = meta.get("streams", [])
    video = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not video:
        kinds = ", ".join(sorted({s.get("codec_type", "?") for s in streams})) or "none"
        raise VideoDecodeError(path, f"no video stream (streams found: {kinds})")
    return video[0]


def _stream_rotation(stream: dict) -> float:
    """Display rotation in degrees of an ffprobe stream (display matrix side data, else the ``rotate`` tag)."""
    for sd in stream.get("side_data_list", []) or []:
        if "rotation" in sd:
            return float(sd["rotation"])
    tag = stream.get("tags", {}).get("rotate")
    return float(tag) if tag else 0.0


def _rate(text: str | None) -> float | None:
    try:
        a, b = (text or "0/0").split("/")
        return float(a) / float(b) if float(b) else None
    except ValueError:
        return None


def stream_fields(path: Path, meta: dict, stream: dict) -> dict:
    """`arena.video.VideoInfo`'s fields (all but path and num_frames) from ffprobe's JSON, in display geometry."""
    rot = _stream_rotation(stream)
    w, h = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if round(abs(rot)) % 180 == 90:
        w, h = h, w
    dur = stream.get("duration") or meta.get("format", {}).get("duration")
    return dict(container=meta.get("format", {}).get("format_name", path.suffix.lstrip(".")),
                codec=stream.get("codec_name", "?"), width=w, height=h,
                fps=_rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate")),
                duration_seconds=float(dur) if dur not in (None, "N/A") else None, rotation=rot,
                stream_index=stream.get("index"), pixel_format=stream.get("pix_fmt"))



#: The hang guard's ceiling: a 2 GB file would otherwise be given 11 hours. Ten minutes decodes about 100,000
#: frames of 1080p H.264 sequentially on one core, more than any competition clip holds.
MAX_FFMPEG_SECONDS = 600.0


def _timeout_for(path: Path) -> float:
    """Hang guard for FFmpeg subprocesses: 30 s plus 20 s per MB (small damaged files take well under 1 s), at most
    `MAX_FFMPEG_SECONDS`."""
    return min(MAX_FFMPEG_SECONDS, 30.0 + 20.0 * path.stat().st_size / 1e6)


_SHOWINFO_RE = re.compile(r"\bn:\s*\d+\s+pts:\s*\S+\s+pts_time:\s*(\S+)")


def _read_ppm(stream) -> np.ndarray | None:
    """One binary PPM (P6, maxval 255) from a pipe, or None at the end of the stream."""
    tokens: list[bytes] = []
    while len(tokens) < 4:
        line = stream.readline()
        if not line:
            return None
        tokens.extend(line.split(b"#", 1)[0].split())
    magic, w, h, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"unexpected PPM header {tokens!r}")
    data = stream.read(w * h * 3)
    if len(data) < w * h * 3:
        return None
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(h, w, 3)


def _ffmpeg_exe(path: Path, name: str = "ffmpeg") -> str:
    exe = shutil.which(name)
    if exe is None:
        raise VideoDecodeError(path, f"{name} not found on PATH (install FFmpeg: apt-get install -y ffmpeg)")
    return exe


@dataclass
class Sequential:
    """Result of one sequential FFmpeg pass: frames for the wanted indices (filled where not decodable)."""

    count: int                                            # frames FFmpeg decoded
    rows: dict[int, tuple[np.ndarray, float, bool]]       # index -> (RGB HWC, pts, really decoded)


def decode_sequential(
    path: Path, stream_index: int | None, wanted: np.ndarray | None, *,
    scan_pts: np.ndarray | None = None, num_threads: int = 1,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Sequential:
    """Decode every frame FFmpeg can decode, in display order, keeping only ``wanted`` (sorted unique) indices.

    A decoded frame's index is its ordinal, or with ``scan_pts`` the index of the nearest scanned pts (frames that
    match none are skipped). A wanted index with no decoded frame takes the nearest decoded frame before it (after
    it when there is none before) and is marked not decoded: a rule that depends on the file and the index only.
    ``wanted=None`` only counts frames. ``transform`` (e.g. the resize to the model input) is applied to each kept
    frame as soon as it is decoded, once per frame, so memory holds small frames only (a 4K frame is 25 MB).
    """
    exe = _ffmpeg_exe(path)
    stream = f"0:{stream_index}" if stream_index is not None else "0:v:0"
    # -copyts keeps the demuxer's timestamps so they can be matched to the scan; passthrough neither drops
    # nor duplicates frames; showinfo logs each frame's pts to stderr before the frame reaches stdout.
    cmd = [exe, "-nostdin", "-hide_banner", "-v", "info", "-nostats", "-threads", str(num_threads), "-copyts",
           "-i", str(path), "-map", stream, "-an", "-sn", "-dn", "-fps_mode", "passthrough", "-vf", "showinfo"]
    cmd += ["-f", "null", "-"] if wanted is None else ["-pix_fmt", "rgb24", "-c:v", "ppm", "-f", "image2pipe", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err_lines: list[str] = []
    pts: list[float] = []
    cond = threading.Condition()
    done = threading.Event()

    def _drain_stderr() -> None:
        for raw in proc.stderr:  # type: ignore[union-attr]
            line = raw.decode(errors="replace")
            m = _SHOWINFO_RE.search(line) if "showinfo" in line else None
            with cond:
                if m:
                    try:
                        pts.append(float(m.group(1)))
                    except ValueError:
                        pts.append(float("nan"))
                    cond.notify_all()
                elif "showinfo" not in line:
                    err_lines.append(line.strip())
        with cond:
            done.set()
            cond.notify_all()

    killed = threading.Event()

    def _kill() -> None:
        killed.set()
        proc.kill()

    reader = threading.Thread(target=_drain_stderr, daemon=True)
    reader.start()
    timer = threading.Timer(_timeout_for(path), _kill)
    timer.start()
    rows: dict[int, tuple[np.ndarray, float, bool]] = {}
    count = 0
    last: list = [None, None]  # (source frame, its transformed copy): a frame filling several rows is done once

    def small(img: np.ndarray) -> np.ndarray:
        if transform is None:
            return img
        if last[0] is not img:
            last[:] = [img, transform(img)]
        return last[1]

    try:
        if wanted is None:
            proc.stdout.read()  # type: ignore[union-attr]
        else:
            want = wanted.tolist()
            pos = 0                      # next wanted index not yet settled
            prev: tuple[np.ndarray, float] | None = None
            pending: list[int] = []      # wanted indices before the first decoded frame
            while (img := _read_ppm(proc.stdout)) is not None:
                with cond:
                    cond.wait_for(lambda c=count: len(pts) > c or done.is_set(), timeout=5.0)
                    t = pts[count] if len(pts) > count else float("nan")
                count += 1
                j = _index_for_pts(t, scan_pts) if scan_pts is not None else count - 1
                if j is None:
                    continue
                while pos < len(want) and want[pos] < j:
                    if prev is None:
                        pending.append(want[pos])
                    else:
                        rows[want[pos]] = (small(prev[0]), prev[1], False)
                    pos += 1
                if pos < len(want) and want[pos] == j:
                    rows[j] = (small(img), t, True)
                    pos += 1
                if prev is None:
                    for i in pending:
                        rows[i] = (small(img), t, False)
                    pending.clear()
                prev = (img, t)
            if prev is not None:
                for i in want[pos:]:
                    rows[i] = (small(prev[0]), prev[1], False)
        proc.wait()
        reader.join()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed.is_set():
        raise VideoDecodeError(path, f"ffmpeg did not finish within {_timeout_for(path):.0f} s")
    if wanted is None:
        count = len(pts)
    if count == 0:
        useful = [ln for ln in err_lines if ln and not ln.startswith(("Input #", "Output #", "Stream", " "))]
        reason = useful[-1] if useful else "ffmpeg decoded zero frames"
        if "matches no streams" in reason or "does not contain any stream" in reason:
            reason = "no video stream"
        raise VideoDecodeError(path, f"no decodable video frame ({reason})")
    return Sequential(count=count, rows=rows)


def _index_for_pts(t: float, scan_pts: np.ndarray) -> int | None:
    """Index of the scanned pts nearest to ``t`` if within a quarter of the local frame gap, else None."""
    if not np.isfinite(t) or len(scan_pts) == 0:
        return None
    j = int(np.clip(np.searchsorted(scan_pts, t), 0, len(scan_pts) - 1))
    if j > 0 and abs(scan_pts[j - 1] - t) <= abs(scan_pts[j] - t):
        j -= 1
    gaps = np.diff(scan_pts[max(0, j - 1): j + 2])
    tol = 0.25 * float(gaps.min()) if len(gaps) and gaps.min() > 0 else 1e-3
    return j if abs(scan_pts[j] - t) <= max(tol, 1e-5) else None


def packet_pts(path: Path, stream_index: int | None, n: int) -> np.ndarray | None:
    """Sorted pts (seconds) of the stream's packets, i.e. of its frames; None if they do not number ``n``."""
    sel = str(stream_index) if stream_index is not None else "v:0"
    cmd = [_ffmpeg_exe(path, "ffprobe"), "-v", "error", "-select_streams", sel, "-show_entries", "packet=pts_time",
           "-of", "csv=p=0", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=_timeout_for(path), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    vals = []
    for tok in proc.stdout.decode(errors="replace").split():
        try:
            vals.append(float(tok.strip(",")))
        except ValueError:
            continue
    arr = np.unique(np.asarray(vals, dtype=np.float64))
    return arr if len(arr) == n else None


@lru_cache(maxsize=256)
def _frame_count_cached(path: str, stream_index: int | None, _stamp: tuple[int, int]) -> int:
    return decode_sequential(Path(path), stream_index, None).count


def frame_count(path: Path, stream_index: int | None) -> int:
    """Frames FFmpeg decodes from the stream (cached per file path, size and modification time)."""
    st = path.stat()
    return _frame_count_cached(str(path.resolve()), stream_index, (st.st_size, st.st_mtime_ns))
