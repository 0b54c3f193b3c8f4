"""Robust frame decoding on top of torchcodec, with an FFmpeg fallback for damaged files.

The decoder picks frames by *index* (``np.linspace(0, n - 1, k)`` as the seed did), returns them as a uint8
``[k, 3, H, W]`` RGB tensor with the rotation applied, optionally resized to the model input size, and says
which rows are real and which are repeats.

Decode paths:

1. **torchcodec, exact seek mode** (the normal path). Its scan reads packet headers only, so ``n`` is the real
   frame count and frame ``i`` is frame ``i`` even on variable-frame-rate files and MP4 edit lists, where
   approximate mode is wrong or fails; approximate mode was not faster (``tools/bench_decode.py``).
   Frame 0 is always decoded with the batch and its pts must equal the stream's first pts; this is how a stream
   that starts without a keyframe (MPEG-TS segments) is caught: exact mode returns wrong frames there silently.
2. **FFmpeg CLI, sequential, n = frames FFmpeg decodes** when torchcodec cannot open the file, its scan finds no
   frames, or frame 0 fails that check. These are properties of the file, so every index set takes this path.
3. **FFmpeg CLI, sequential, mapped to the scan by pts** when torchcodec raises while decoding (corrupted H.264:
   ``Could not push packet to decoder``; truncated files). ``n`` stays the scan count; decoded frames are matched
   to scan indices by pts, so a frame gets the same index (and, measured, the same pixels) on either path.

Fill rule (paths 2, 3): an index with no decoded frame repeats the nearest decoded frame before it (after it if
there is none) and is marked ``valid=False``; repeated indices (``k > n``) are invalid after their first row.
``n = source_frame_count(path)`` and the fill depend on the file and the index only, never on which other
indices were asked for, so rows of a decoded union equal a direct decode of any subset (tested). Undecodable
files raise `VideoDecodeError` naming the file and the reason; FFmpeg subprocesses run under a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DecodedClip",
    "VideoDecodeError",
    "VideoInfo",
    "decode_indices",
    "decode_selected",
    "decode_uniform",
    "probe",
    "resize_frames",
    "source_frame_count",
    "uniform_indices",
]

_LOG = logging.getLogger(__name__)

ResizeBackend = Literal["tensor", "decoder"]
#: Where ``size`` is applied. "tensor" (antialiased bilinear on the decoded uint8 tensor, `resize_frames`) was
#: measured faster or equal to torchcodec's decoder-side Resize here (see tools/bench_decode.py) and is the same
#: function on every path (torchcodec, FFmpeg fallback, CUDA), so it is the default.
DEFAULT_RESIZE: ResizeBackend = "tensor"


class VideoDecodeError(RuntimeError):
    """A file from which no frame can be decoded. ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Stream metadata in display geometry (``width``/``height`` after rotation)."""

    path: str
    container: str
    codec: str
    width: int
    height: int
    fps: float | None
    num_frames: int | None
    duration_seconds: float | None
    rotation: float
    stream_index: int | None = None
    pixel_format: str | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DecodedClip:
    """Frames decoded at given source indices (see module docstring for the fill rule)."""

    frames: torch.Tensor
    frame_indices: np.ndarray
    pts_seconds: np.ndarray
    valid: np.ndarray
    num_source_frames: int
    partial: bool
    info: VideoInfo
    message: str = ""
    decoder: str = field(default="torchcodec")

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8 or f.ndim != 4 or f.shape[1] != 3:
            got = f"{getattr(f, 'dtype', type(f).__name__)} {tuple(getattr(f, 'shape', ()))}"
            raise ValueError(f"frames must be a uint8 tensor [k, 3, H, W], got {got}")
        k = f.shape[0]
        for name, arr, dtype in (
            ("frame_indices", self.frame_indices, np.int64),
            ("pts_seconds", self.pts_seconds, np.float64),
            ("valid", self.valid, np.bool_),
        ):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (k,):
                got = f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', None)}"
                raise ValueError(f"{name} must be {np.dtype(dtype).name} [{k}], got {got}")
        if self.num_source_frames < 1:
            raise ValueError(f"num_source_frames must be >= 1, got {self.num_source_frames}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    def __repr__(self) -> str:
        return (
            f"DecodedClip(frames={tuple(self.frames.shape)} {self.frames.device}, "
            f"indices={self.frame_indices.tolist()}, "
            f"valid={int(self.valid.sum())}/{len(self.valid)}, n={self.num_source_frames}, partial={self.partial}, "
            f"decoder={self.decoder!r}, message={self.message!r})"
        )


def uniform_indices(num_frames: int, k: int) -> np.ndarray:
    """The seed's frame sampling: ``np.linspace(0, n - 1, k).astype(int64)`` (duplicates when ``k > n``)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.linspace(0, num_frames - 1, k).astype(np.int64)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 ``[..., 3, H, W]`` frames to ``size=(height, width)``: bilinear with antialias, uint8 out.

    The one resize used by every decode path (and by anyone else who needs the model input size).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    h, w = _check_size(size)
    if tuple(frames.shape[-2:]) == (h, w):
        return frames
    return tvf.resize(frames, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------------------------------- probing


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(p, "file does not exist")
    if not p.is_file():
        raise VideoDecodeError(p, "not a regular file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(p, "empty file (0 bytes)")
    return p


def _display_dims(width: int | None, height: int | None, rotation: float | None) -> tuple[int, int]:
    w, h = int(width or 0), int(height or 0)
    if rotation is not None and round(abs(rotation)) % 180 == 90:
        w, h = h, w
    return w, h


def _open_torchcodec(path: Path, *, device: str = "cpu", num_threads: int = 1, seek_mode: str = "exact"):
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(path), seek_mode=seek_mode, num_ffmpeg_threads=num_threads, device=device)


def _info_from_torchcodec(path: Path, decoder, container: str) -> VideoInfo:
    md = decoder.metadata
    rot = float(md.rotation or 0.0)
    w, h = int(md.width or 0), int(md.height or 0)  # torchcodec reports post-rotation (display) dimensions
    return VideoInfo(
        path=str(path), container=container, codec=str(md.codec), width=w, height=h,
        fps=float(md.average_fps) if md.average_fps else None, num_frames=md.num_frames,
        duration_seconds=float(md.duration_seconds) if md.duration_seconds is not None else None,
        rotation=rot, stream_index=decoder.stream_index, pixel_format=getattr(md, "pixel_format", None),
    )


def _ffprobe(path: Path) -> dict:
    """ffprobe's JSON for streams + format; raises VideoDecodeError with ffprobe's own words."""
    exe = shutil.which("ffprobe")
    if exe is None:
        raise VideoDecodeError(path, "ffprobe not found on PATH (install FFmpeg: apt-get install -y ffmpeg)")
    cmd = [exe, "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=_timeout_for(path), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise VideoDecodeError(path, f"ffprobe timed out after {e.timeout:.0f} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise VideoDecodeError(path, f"not a readable media file ({err[-1] if err else 'ffprobe failed'})")
    return json.loads(proc.stdout or b"{}")


def _video_stream_or_raise(path: Path, meta: dict) -> dict:
    streams = meta.get("streams", [])
    video = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not video:
        kinds = ", ".join(sorted({s.get("codec_type", "?") for s in streams})) or "none"
        raise VideoDecodeError(path, f"no video stream (streams found: {kinds})")
    return video[0]


def _rotation_from_ffprobe(stream: dict) -> float:
    for sd in stream.get("side_data_list", []) or []:
        if "rotation" in sd:
            return float(sd["rotation"])
    tag = stream.get("tags", {}).get("rotate")
    return float(tag) if tag else 0.0


def _info_from_ffprobe(path: Path, meta: dict, stream: dict, num_frames: int | None) -> VideoInfo:
    def _rate(s: str | None) -> float | None:
        try:
            a, b = (s or "0/0").split("/")
            return float(a) / float(b) if float(b) else None
        except ValueError:
            return None

    rot = _rotation_from_ffprobe(stream)
    w, h = _display_dims(stream.get("width"), stream.get("height"), rot)
    dur = stream.get("duration") or meta.get("format", {}).get("duration")
    return VideoInfo(
        path=str(path), container=meta.get("format", {}).get("format_name", path.suffix.lstrip(".")),
        codec=stream.get("codec_name", "?"), width=w, height=h,
        fps=_rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate")), num_frames=num_frames,
        duration_seconds=float(dur) if dur not in (None, "N/A") else None, rotation=rot,
        stream_index=stream.get("index"), pixel_format=stream.get("pix_fmt"),
    )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Metadata of the video stream that would be decoded (display geometry). Raises `VideoDecodeError`."""
    p = _check_file(path)
    meta = _ffprobe(p)
    stream = _video_stream_or_raise(p, meta)
    try:
        dec = _open_torchcodec(p)
    except Exception:  # noqa: BLE001 - torchcodec cannot open it; the FFmpeg path counts frames instead
        return _info_from_ffprobe(p, meta, stream, _ffmpeg_frame_count(p, stream.get("index")))
    info = _info_from_torchcodec(p, dec, meta.get("format", {}).get("format_name", p.suffix.lstrip(".")))
    if not info.num_frames or not _first_frame_ok(dec):  # same n as decode_uniform would use
        info = replace(info, num_frames=_ffmpeg_frame_count(p, dec.stream_index))
    return info


# ------------------------------------------------------------------------------------------ FFmpeg fallback


def _timeout_for(path: Path) -> float:
    """Hang guard for FFmpeg subprocesses: 30 s plus 20 s per MB (small damaged files take well under 1 s)."""
    return 30.0 + 20.0 * path.stat().st_size / 1e6


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
class _Sequential:
    """Result of one sequential FFmpeg pass: frames for the wanted indices (filled where not decodable)."""

    count: int                                            # frames FFmpeg decoded
    rows: dict[int, tuple[np.ndarray, float, bool]]       # index -> (RGB HWC, pts, really decoded)


def _ffmpeg_sequential(
    path: Path, stream_index: int | None, wanted: np.ndarray | None, *,
    scan_pts: np.ndarray | None = None, num_threads: int = 1, size: tuple[int, int] | None = None,
) -> _Sequential:
    """Decode every frame FFmpeg can decode, in display order, keeping only ``wanted`` (sorted unique) indices.

    A decoded frame's index is its ordinal, or with ``scan_pts`` the index of the nearest scanned pts (frames that
    match none are skipped). A wanted index with no decoded frame takes the nearest decoded frame before it (after
    it when there is none before) and is marked not decoded: a rule that depends on the file and the index only.
    ``wanted=None`` only counts frames. With ``size`` each kept frame is resized as soon as it is decoded, so memory
    holds small frames only (a 4K frame is 25 MB), with the same pixels as resizing them all at the end.
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
    last: list = [None, None]  # (source frame, its resized copy): a frame that fills several rows is resized once

    def small(img: np.ndarray) -> np.ndarray:
        if size is None:
            return img
        if last[0] is not img:
            resized = resize_frames(torch.from_numpy(img).permute(2, 0, 1), size)
            last[:] = [img, resized.permute(1, 2, 0).numpy()]
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
    return _Sequential(count=count, rows=rows)


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


def _packet_pts(path: Path, stream_index: int | None, n: int) -> np.ndarray | None:
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
def _ffmpeg_frame_count_cached(path: str, stream_index: int | None, _stamp: tuple[int, int]) -> int:
    return _ffmpeg_sequential(Path(path), stream_index, None).count


def _ffmpeg_frame_count(path: Path, stream_index: int | None) -> int:
    st = path.stat()
    return _ffmpeg_frame_count_cached(str(path.resolve()), stream_index, (st.st_size, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------- decoding


def _classify_open_failure(path: Path, exc: Exception) -> int | None:
    """torchcodec could not open ``path``: raise the typed error, or return the stream FFmpeg should decode."""
    meta = _ffprobe(path)  # raises "not a readable media file" for text files etc.
    stream = _video_stream_or_raise(path, meta)
    _LOG.info("torchcodec cannot open %s (%s); decoding sequentially with FFmpeg", path, _short(exc))
    return stream.get("index")


def _short(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    # torchcodec prefixes C++ locations ("decode_av_frame, /__w/.../File.cpp:1493, Could not push packet ...").
    text = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", text)
    return text[:200]


def _first_frame_ok(decoder) -> bool:
    """Whether torchcodec's frame 0 is the stream's first frame.

    It is not when a stream starts without a keyframe (MPEG-TS segments): exact mode then returns the first
    keyframe for every early index and fails near the end, silently wrong rather than raising. A file-level test,
    so the choice of decode path never depends on which indices were asked for.
    """
    try:
        pts = float(decoder.get_frames_at([0]).pts_seconds[0])
    except Exception:  # noqa: BLE001 - frame 0 itself undecodable: not a file for the fast path
        return False
    return abs(pts - float(decoder.metadata.begin_stream_seconds)) < 1e-6


def source_frame_count(path: str | os.PathLike) -> int:
    """The ``n`` used by `decode_uniform`; depends on the file alone.

    torchcodec's exact scan count when its fast path is usable for the file, otherwise the number of frames
    FFmpeg decodes sequentially. Raises `VideoDecodeError` when no frame can be decoded.
    """
    p = _check_file(path)
    try:
        dec = _open_torchcodec(p)
    except Exception as e:  # noqa: BLE001 - any torchcodec failure -> classify or fall back
        return _ffmpeg_frame_count(p, _classify_open_failure(p, e))
    n = int(dec.metadata.num_frames or 0)
    if n < 1 or not _first_frame_ok(dec):
        n = _ffmpeg_frame_count(p, dec.stream_index)
    return n


def _as_indices(indices) -> np.ndarray:
    arr = np.asarray(indices)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"indices must be a non-empty 1-D sequence of frame indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"indices must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"indices must be >= 0, got min {arr.min()}")
    return arr


def _duplicate_mask(indices: np.ndarray) -> np.ndarray:
    """True at the first occurrence of each index (in row order), False for repeats."""
    first = np.zeros(len(indices), dtype=bool)
    _, pos = np.unique(indices, return_index=True)
    first[pos] = True
    return first


def _resolve_device(device: str) -> str:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _LOG.warning("device=%r requested but CUDA is not available; decoding on CPU", device)
            return "cpu"
        return device
    if device != "cpu":
        raise ValueError(f"Invalid device ({device}). Supported values are cpu, cuda, cuda:N.")
    return device


def _check_range(p: Path, idx: np.ndarray, n: int) -> None:
    if idx.max() >= n:
        raise ValueError(f"{p}: frame index {int(idx.max())} out of range; the video has {n} frames (0..{n - 1})")


def decode_indices(
    path: str | os.PathLike,
    indices,
    *,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    num_threads: int = 1,
    resize: ResizeBackend = DEFAULT_RESIZE,
) -> DecodedClip:
    """Decode the frames at source ``indices`` (any order, duplicates allowed).

    Args:
        path: video file.
        indices: source frame indices, ``0 <= i < source_frame_count(path)``.
        size: ``(height, width)`` to resize to (antialiased bilinear), or None for the display size.
        device: "cpu" or "cuda[:N]" (NVDEC; falls back to CPU, with a log message, where it cannot decode).
        num_threads: FFmpeg threads per decoder (1 is best when several files are decoded in parallel; 0 = auto).
        resize: "tensor" (`resize_frames`, every path) or "decoder" (torchcodec's decoder-side Resize).

    Raises:
        VideoDecodeError: no frame can be decoded (names the file and the reason).
        ValueError: an index is out of range or an option is invalid.
    """
    idx = _as_indices(indices)
    return _decode(path, lambda n: idx, size=size, device=device, num_threads=num_threads, resize=resize)


def decode_uniform(
    path: str | os.PathLike,
    k: int,
    *,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    num_threads: int = 1,
    resize: ResizeBackend = DEFAULT_RESIZE,
) -> DecodedClip:
    """Decode ``k`` frames at ``uniform_indices(source_frame_count(path), k)``; options as `decode_indices`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _decode(path, lambda n: uniform_indices(n, k), size=size, device=device, num_threads=num_threads,
                   resize=resize)


def decode_selected(
    path: str | os.PathLike,
    select: Callable[[int], np.ndarray],
    *,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    num_threads: int = 1,
    resize: ResizeBackend = DEFAULT_RESIZE,
) -> DecodedClip:
    """Decode the indices ``select(n)`` picks once the file's ``n`` (`source_frame_count`) is known.

    One open of the file does both, where `source_frame_count` followed by `decode_indices` opens and scans it
    twice. `decode_uniform` is ``decode_selected(path, lambda n: uniform_indices(n, k))``; the feature cache asks
    for the union of several k this way.
    """
    return _decode(path, select, size=size, device=device, num_threads=num_threads, resize=resize)


def _decode(path, select, *, size, device: str, num_threads: int, resize: str) -> DecodedClip:
    """Shared body of `decode_indices` / `decode_uniform`: ``select(n)`` gives the indices once n is known."""
    if size is not None:
        size = _check_size(size)
    if resize not in ("tensor", "decoder"):
        raise ValueError(f"Invalid resize ({resize}). Supported values are tensor, decoder.")
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0 lets FFmpeg choose), got {num_threads}")
    p = _check_file(path)
    dev = _resolve_device(device)
    notes: list[str] = []

    try:
        dec = _open_with_device(p, dev, num_threads, size if resize == "decoder" else None, notes)
    except Exception as e:  # noqa: BLE001 - torchcodec cannot open it: typed error or the FFmpeg path
        stream = _classify_open_failure(p, e)
        notes.append(f"torchcodec cannot open the file ({_short(e)}); decoded sequentially with FFmpeg")
        meta = _ffprobe(p)
        info = _info_from_ffprobe(p, meta, _video_stream_or_raise(p, meta), None)
        return _decode_sequential(p, select, info, stream, size, num_threads, notes)

    info = _info_from_torchcodec(p, dec, p.suffix.lstrip(".").lower())
    n = int(dec.metadata.num_frames or 0)
    if n < 1:
        notes.append("torchcodec's scan found no frames; decoded sequentially with FFmpeg")
        return _decode_sequential(p, select, info, dec.stream_index, size, num_threads, notes)
    idx = select(n)
    _check_range(p, idx, n)
    uniq = np.unique(np.append(idx, 0))  # frame 0 always: it validates the fast path for this file
    error: str | None = None
    try:
        data, pts_u = _frames_at(dec, uniq, size if resize == "tensor" else None)
        first_ok = abs(pts_u[0] - float(dec.metadata.begin_stream_seconds)) < 1e-6
    except Exception as e:  # noqa: BLE001 - corrupted or truncated stream
        error = _short(e)
        first_ok = _first_frame_ok(_open_torchcodec(p, num_threads=num_threads))
    if not first_ok:
        notes.append("torchcodec's frame 0 is not the stream's first frame (no keyframe at the start?); "
                     "decoded sequentially with FFmpeg")
        _LOG.info("%s: %s", p, notes[-1])
        return _decode_sequential(p, select, info, dec.stream_index, size, num_threads, notes)
    if error is None and not np.all(np.diff(pts_u) > 0):
        error = "distinct indices returned non-increasing timestamps"
    if error is not None:
        notes.append(f"torchcodec failed while decoding ({error}); decoded sequentially with FFmpeg")
        _LOG.info("%s: %s", p, notes[-1])
        scan_pts = _packet_pts(p, dec.stream_index, n)
        seq = _ffmpeg_sequential(p, dec.stream_index, np.unique(idx), scan_pts=scan_pts, num_threads=num_threads,
                                 size=size)
        if seq.count < n:
            notes.append(f"FFmpeg decoded {seq.count} of {n} frames")
        return _clip_from_sequential(idx, n, seq, info, size, notes)

    if size is not None and resize == "tensor":
        data = resize_frames(data, size)
    rows = torch.from_numpy(np.searchsorted(uniq, idx))
    valid = _duplicate_mask(idx)
    partial = bool(not valid.all())
    if partial:
        notes.insert(0, f"{int(valid.sum())} distinct frames for {len(idx)} rows (video has {n}); repeats masked")
    return DecodedClip(
        frames=data[rows].contiguous(), frame_indices=idx, pts_seconds=pts_u[rows.numpy()], valid=valid,
        num_source_frames=n, partial=partial, info=info, message="; ".join(notes),
        decoder=f"torchcodec-exact-{str(data.device)}",
    )


#: Frames decoded at source resolution before they are resized: bounds peak memory (a 4K RGB frame is 25 MB,
#: and the cache path asks for ~80 distinct frames per video) without changing a single output pixel.
_DECODE_CHUNK = 8


def _frames_at(dec, uniq: np.ndarray, size: tuple[int, int] | None) -> tuple[torch.Tensor, np.ndarray]:
    """``dec.get_frames_at(uniq)`` in chunks, each resized to ``size`` before the next is decoded."""
    datas, pts = [], []
    for start in range(0, len(uniq), _DECODE_CHUNK):
        batch = dec.get_frames_at(uniq[start : start + _DECODE_CHUNK].tolist())
        datas.append(batch.data if size is None else resize_frames(batch.data, size))
        pts.append(batch.pts_seconds.double().cpu().numpy())
        del batch
    return torch.cat(datas), np.concatenate(pts)


def _open_with_device(p: Path, dev: str, num_threads: int, decoder_size, notes: list[str]):
    from torchcodec.decoders import VideoDecoder

    kwargs: dict = dict(seek_mode="exact", num_ffmpeg_threads=num_threads)
    if decoder_size is not None:
        from torchcodec.transforms import Resize

        kwargs["transforms"] = [Resize(decoder_size)]
    if dev.startswith("cuda"):
        try:
            dec = VideoDecoder(str(p), device=dev, **kwargs)
            if dec.cpu_fallback:  # e.g. H.264 4:4:4, which NVDEC cannot decode
                notes.append(f"NVDEC cannot decode this stream ({dec.cpu_fallback}); torchcodec decoded on CPU")
                _LOG.warning("%s: %s", p, notes[-1])
            return dec
        except Exception as e:  # noqa: BLE001 - no NVDEC for this stream/driver: CPU is always there
            notes.append(f"CUDA decode unavailable ({_short(e)}); decoded on CPU")
            _LOG.warning("%s: %s", p, notes[-1])
    return VideoDecoder(str(p), device="cpu", **kwargs)


def _decode_sequential(p: Path, select, info: VideoInfo, stream: int | None, size, num_threads: int,
                       notes: list[str]) -> DecodedClip:
    """File-level fallback: n = frames FFmpeg decodes, frame i = the i-th of them."""
    n = _ffmpeg_frame_count(p, stream)
    info = replace(info, num_frames=n)
    idx = select(n)
    _check_range(p, idx, n)
    seq = _ffmpeg_sequential(p, stream, np.unique(idx), num_threads=num_threads, size=size)
    return _clip_from_sequential(idx, n, seq, info, size, notes)


def _clip_from_sequential(idx: np.ndarray, n: int, seq: _Sequential, info: VideoInfo, size, notes: list[str]):
    valid = _duplicate_mask(idx)
    imgs, pts = [], []
    filled = 0
    for row, i in enumerate(idx.tolist()):
        img, t, real = seq.rows[i]
        if not real:
            valid[row] = False
            filled += 1
        imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        pts.append(t)
    if filled:
        notes.append(f"{filled} rows could not be decoded and repeat the nearest decoded frame")
    target = size if size is not None else tuple(imgs[0].shape[-2:])
    if len({tuple(t.shape) for t in imgs}) == 1:
        frames = resize_frames(torch.stack(imgs), target)
    else:  # the stream changes resolution mid-way: bring every frame to one size
        frames = torch.stack([resize_frames(t, target) for t in imgs])
    partial = bool(not valid.all())
    if partial and not any("distinct" in s for s in notes):
        notes.insert(0, f"{int(valid.sum())} decoded distinct frames for {len(idx)} rows (video has {n})")
    return DecodedClip(
        frames=frames.contiguous(), frame_indices=idx, pts_seconds=np.asarray(pts, dtype=np.float64), valid=valid,
        num_source_frames=n, partial=partial, info=info, message="; ".join(notes), decoder="ffmpeg-sequential",
    )


def inspect_videos(paths, *, decode: int | None = None) -> list[dict]:
    """One JSON-able dict per path for ``arena inspect``: metadata, and with ``decode=K`` whether K frames decode.

    Never raises for a bad file: ``status`` is "ok", "partial" or "error" and ``message`` says why.
    """
    rows = []
    for path in paths:
        row: dict = {"file": str(path)}
        try:
            info = probe(path)
            row.update({k: v for k, v in info.to_dict().items() if k != "path"})
            row["status"], row["message"] = "ok", ""
            if decode:
                clip = decode_uniform(path, decode)
                row.update(decoded=int(clip.valid.sum()), requested=decode, num_source_frames=clip.num_source_frames,
                           decoder=clip.decoder, status="partial" if clip.partial else "ok", message=clip.message)
        except VideoDecodeError as e:
            row.update(status="error", message=e.reason)
        except Exception as e:  # noqa: BLE001 - inspect reports every file, whatever breaks
            row.update(status="error", message=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows
