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

**NVDEC** (``decoder="nvdec"|"auto"``, `arena.nvdec`): torchcodec's scan still gives ``n`` and the indices (and
frame 0 is checked as in path 1); NVDEC decodes the pixels of those indices on the GPU. A file it cannot be trusted
with takes the paths above, with a note in the clip's message.

Fill rule (paths 2, 3): an index with no decoded frame repeats the nearest decoded frame before it (after it if
there is none) and is marked ``valid=False``; repeated indices (``k > n``) are invalid after their first row.
``n = source_frame_count(path)`` and the fill depend on the file and the index only, never on which other
indices were asked for, so rows of a decoded union equal a direct decode of any subset (tested). Undecodable
files raise `VideoDecodeError` naming the file and the reason. Paths 2 and 3 live in `arena._ffmpeg`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchcodec.decoders import VideoDecoder
from torchcodec.transforms import Resize
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from arena import nvdec
from arena._ffmpeg import Sequential, decode_sequential, ffprobe, frame_count, packet_pts, stream_fields, video_stream
from arena.errors import OptionError, VideoDecodeError
from arena.limits import FRAME_PIXEL_BUDGET, MAX_STREAM_PIXELS
from arena.runtime import check_device_name, resolve_device
from arena.sampling import first_occurrence, uniform_indices

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
]

_LOG = logging.getLogger(__name__)

ResizeBackend = Literal["tensor", "decoder"]
#: Where ``size`` is applied. "tensor" (antialiased bilinear on the decoded uint8 tensor, `resize_frames`) was
#: measured faster or equal to torchcodec's decoder-side Resize here (see tools/bench_decode.py) and is the same
#: function on every path (torchcodec, FFmpeg fallback, CUDA), so it is the default.
DEFAULT_RESIZE: ResizeBackend = "tensor"


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


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 ``[..., 3, H, W]`` frames to ``size=(height, width)``: bilinear with antialias, uint8 out.

    The one resize used by every decode path (and by anyone else who needs the model input size).
    """
    h, w = _check_size(size)
    if tuple(frames.shape[-2:]) == (h, w):
        return frames
    return tvf.resize(frames, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _hwc_resizer(size: tuple[int, int] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """`resize_frames` for one ``[H, W, 3]`` frame of the FFmpeg path (None: keep the display size)."""
    if size is None:
        return None
    return lambda img: resize_frames(torch.from_numpy(img).permute(2, 0, 1), size).permute(1, 2, 0).numpy()


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise OptionError(f"size must be (height, width) with positive ints, got {size!r}")
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


def _open_torchcodec(path: Path, *, num_threads: int = 1) -> VideoDecoder:
    return VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=num_threads, device="cpu")


def _info_from_ffprobe(path: Path, meta: dict, stream: dict, num_frames: int | None) -> VideoInfo:
    return VideoInfo(path=str(path), num_frames=num_frames, **stream_fields(path, meta, stream))


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


def probe(path: str | os.PathLike) -> VideoInfo:
    """Metadata of the video stream that would be decoded (display geometry). Raises `VideoDecodeError`."""
    p = _check_file(path)
    meta = ffprobe(p)
    stream = video_stream(p, meta)
    try:
        dec = _open_torchcodec(p)
    except Exception:  # noqa: BLE001 - torchcodec cannot open it; the FFmpeg path counts frames instead
        return _info_from_ffprobe(p, meta, stream, frame_count(p, stream.get("index")))
    info = _info_from_torchcodec(p, dec, meta.get("format", {}).get("format_name", p.suffix.lstrip(".")))
    if not info.num_frames or not _first_frame_ok(dec):  # same n as decode_uniform would use
        info = replace(info, num_frames=frame_count(p, dec.stream_index))
    return info


# ---------------------------------------------------------------------------------------------- decoding


def _classify_open_failure(path: Path, exc: Exception) -> int | None:
    """torchcodec could not open ``path``: raise the typed error, or return the stream FFmpeg should decode."""
    meta = ffprobe(path)  # raises "not a readable media file" for text files etc.
    stream = video_stream(path, meta)
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
        return frame_count(p, _classify_open_failure(p, e))
    n = int(dec.metadata.num_frames or 0)
    if n < 1 or not _first_frame_ok(dec):
        n = frame_count(p, dec.stream_index)
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


def _resolve_device(device: str) -> str:
    """``auto|cpu|cuda|cuda:N`` (`arena.runtime`'s names) -> the decode device; CPU, with a warning, without CUDA."""
    name = check_device_name(device)  # OptionError for anything else
    if name == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if name != "auto":
            _LOG.warning("device=%r requested but CUDA is not available; decoding on CPU", device)
        return "cpu"
    return str(resolve_device(name))  # cuda:N beyond the GPUs present is an OptionError


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
    decoder: str = "cpu",
) -> DecodedClip:
    """Decode the frames at source ``indices`` (any order, duplicates allowed).

    Args:
        path: video file.
        indices: source frame indices, ``0 <= i < source_frame_count(path)``.
        size: ``(height, width)`` to resize to (antialiased bilinear), or None for the display size.
        device: "cpu" or "cuda[:N]" (NVDEC; falls back to CPU, with a log message, where it cannot decode).
        num_threads: FFmpeg threads per decoder (1 is best when several files are decoded in parallel; 0 = auto).
        resize: "tensor" (`resize_frames`, every path) or "decoder" (torchcodec's decoder-side Resize).
        decoder: "cpu" (torchcodec, FFmpeg fallback), "nvdec" (PyNvVideoCodec on ``device`` when it is a GPU, else
            cuda:0; frames come back on that GPU) or "auto" (NVDEC where it loads). `arena.nvdec` lists the files
            that go to the CPU decoder all the same.

    Raises:
        VideoDecodeError: no frame can be decoded (names the file and the reason).
        ValueError: an index is out of range or an option is invalid (`OptionError`: also ``decoder="nvdec"``
            without a CUDA GPU or PyNvVideoCodec).
    """
    idx = _as_indices(indices)
    return _decode(path, lambda n: idx, size=size, device=device, num_threads=num_threads, resize=resize,
                   decoder=decoder)


def decode_uniform(
    path: str | os.PathLike,
    k: int,
    *,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    num_threads: int = 1,
    resize: ResizeBackend = DEFAULT_RESIZE,
    decoder: str = "cpu",
) -> DecodedClip:
    """Decode ``k`` frames at ``uniform_indices(source_frame_count(path), k)``; options as `decode_indices`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _decode(path, lambda n: uniform_indices(n, k), size=size, device=device, num_threads=num_threads,
                   resize=resize, decoder=decoder)


def decode_selected(
    path: str | os.PathLike,
    select: Callable[[int], np.ndarray],
    *,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    num_threads: int = 1,
    resize: ResizeBackend = DEFAULT_RESIZE,
    decoder: str = "cpu",
) -> DecodedClip:
    """Decode the indices ``select(n)`` picks once the file's ``n`` (`source_frame_count`) is known.

    One open of the file does both, where `source_frame_count` followed by `decode_indices` opens and scans it
    twice. `decode_uniform` is ``decode_selected(path, lambda n: uniform_indices(n, k))``; the feature cache asks
    for the union of several k this way.
    """
    return _decode(path, select, size=size, device=device, num_threads=num_threads, resize=resize, decoder=decoder)


def _decode(path, select, *, size, device: str, num_threads: int, resize: str, decoder: str) -> DecodedClip:
    """Shared body of `decode_indices` / `decode_uniform`: ``select(n)`` gives the indices once n is known."""
    if size is not None:
        size = _check_size(size)
    if resize not in ("tensor", "decoder"):
        raise OptionError(f"Invalid resize ({resize}). Supported values are tensor, decoder.")
    if num_threads < 0:
        raise OptionError(f"num_threads must be >= 0 (0 lets FFmpeg choose), got {num_threads}")
    p = _check_file(path)
    on_nvdec = nvdec.use_nvdec(decoder)
    dev = _resolve_device(device)
    notes: list[str] = []

    try:  # with NVDEC, torchcodec only scans (on the CPU): the pixels come from NVDEC
        dec = _open_with_device(p, "cpu" if on_nvdec else dev, num_threads, size if resize == "decoder" else None,
                                notes)
    except Exception as e:  # noqa: BLE001 - torchcodec cannot open it: typed error or the FFmpeg path
        stream = _classify_open_failure(p, e)
        notes.append(f"torchcodec cannot open the file ({_short(e)}); decoded sequentially with FFmpeg")
        meta = ffprobe(p)
        info = _info_from_ffprobe(p, meta, video_stream(p, meta), None)
        return _decode_sequential(p, select, info, stream, size, num_threads, notes)

    info = _info_from_torchcodec(p, dec, p.suffix.lstrip(".").lower())
    budget = budget_size(p, info.width, info.height)
    if on_nvdec:
        clip = _decode_nvdec(p, dec, select, info, size, budget, nvdec.gpu_index(dev), notes)
        if clip is not None:
            return clip
    if budget is not None:  # reopened with the decoder's own resize: no full-size frame ever reaches Python
        notes.append(f"{info.width}x{info.height} frames exceed the pixel budget; decoded at "
                     f"{budget[1]}x{budget[0]}")
        _LOG.info("%s: %s", p, notes[-1])
        size_in_decoder = budget if size is None or resize == "tensor" else size
        dec = _open_with_device(p, dev, num_threads, size_in_decoder, notes)  # info keeps the stream's size
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
        scan_pts = packet_pts(p, dec.stream_index, n)
        seq_size = size if size is not None else budget  # FFmpeg's frames are full size: the same budget
        seq = decode_sequential(p, dec.stream_index, np.unique(idx), scan_pts=scan_pts, num_threads=num_threads,
                                transform=_hwc_resizer(seq_size))
        if seq.count < n:
            notes.append(f"FFmpeg decoded {seq.count} of {n} frames")
        return _clip_from_sequential(idx, n, seq, info, seq_size, notes)

    if size is not None and resize == "tensor":
        data = resize_frames(data, size)
    rows = torch.from_numpy(np.searchsorted(uniq, idx))
    valid = first_occurrence(idx)
    partial = bool(not valid.all())
    if partial:
        notes.insert(0, f"{int(valid.sum())} distinct frames for {len(idx)} rows (video has {n}); repeats masked")
    return DecodedClip(
        frames=data[rows].contiguous(), frame_indices=idx, pts_seconds=pts_u[rows.numpy()], valid=valid,
        num_source_frames=n, partial=partial, info=info, message="; ".join(notes),
        decoder=f"torchcodec-exact-{str(data.device)}",
    )


def _decode_nvdec(p: Path, dec, select, info: VideoInfo, size, budget, gpu: int, notes: list[str]):
    """The clip with NVDEC's pixels at the scan's indices, or None (with the reason in ``notes``) when the file
    must go to the CPU path. Frames over the pixel budget are brought within it, then to ``size``, on the GPU."""
    n = int(dec.metadata.num_frames or 0)
    why = nvdec.unsupported_reason(info.rotation, info.pixel_format)
    if why is None and (n < 1 or not _first_frame_ok(dec)):
        why = "the scan found no frames or frame 0 is not the stream's first frame"
    if why is None:
        idx = select(n)
        _check_range(p, idx, n)
        uniq = np.unique(idx)
        try:
            data, _ = nvdec.decode(p, uniq, num_frames=n, gpu=gpu, transform=lambda b: _resized(b, budget, size))
        except nvdec.NvdecUnsupported as e:
            why = str(e)
    if why is not None:
        notes.append(f"NVDEC not used ({why}); decoded on the CPU")
        _LOG.info("%s: %s", p, notes[-1])
        return None
    if budget is not None:
        notes.append(f"{info.width}x{info.height} frames exceed the pixel budget; decoded at {budget[1]}x{budget[0]}")
    valid = first_occurrence(idx)
    if not valid.all():
        notes.insert(0, f"{int(valid.sum())} distinct frames for {len(idx)} rows (video has {n}); repeats masked")
    # pts from the mean frame rate (NVDEC's timestamps have no documented unit; the pipeline never reads pts)
    pts = (float(dec.metadata.begin_stream_seconds) + idx / (info.fps or np.nan)).astype(np.float64)
    return DecodedClip(frames=data[torch.from_numpy(np.searchsorted(uniq, idx))].contiguous(), frame_indices=idx,
                       pts_seconds=pts, valid=valid, num_source_frames=n, partial=bool(not valid.all()), info=info,
                       message="; ".join(notes), decoder=f"nvdec-{data.device}")


def _resized(frames: torch.Tensor, *sizes) -> torch.Tensor:
    for s in sizes:  # resize_frames to each size that is not None, in turn
        frames = frames if s is None else resize_frames(frames, s)
    return frames


def budget_size(path: str | os.PathLike, width: int, height: int) -> tuple[int, int] | None:
    """``(height, width)`` to decode a ``width`` x ``height`` stream at when it exceeds
    `arena.limits.FRAME_PIXEL_BUDGET` (aspect kept, even sides), else None.

    Raises:
        VideoDecodeError: the stream exceeds `arena.limits.MAX_STREAM_PIXELS` (refused: too large to decode safely).
    """
    pixels = int(width) * int(height)
    if pixels > MAX_STREAM_PIXELS:
        raise VideoDecodeError(path, f"{width}x{height} frames ({pixels / 1e6:.0f} Mpx) exceed the "
                                     f"{MAX_STREAM_PIXELS / 1e6:.0f} Mpx limit (16K UHD); downscale the file first, "
                                     "e.g. ffmpeg -i IN -vf scale=-2:2160 OUT.mp4")
    if pixels <= FRAME_PIXEL_BUDGET:
        return None
    scale = (FRAME_PIXEL_BUDGET / pixels) ** 0.5
    return max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2)


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
    kwargs: dict = dict(seek_mode="exact", num_ffmpeg_threads=num_threads)
    if decoder_size is not None:
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
    """File-level fallback: n = frames FFmpeg decodes, frame i = the i-th of them. Frames over the pixel budget
    are brought within it as each one arrives (FFmpeg hands over one frame at a time)."""
    budget = budget_size(p, info.width, info.height) if info.width and info.height else None
    if size is None and budget is not None:
        size = budget
        notes.append(f"{info.width}x{info.height} frames exceed the pixel budget; decoded at {size[1]}x{size[0]}")
    n = frame_count(p, stream)
    info = replace(info, num_frames=n)
    idx = select(n)
    _check_range(p, idx, n)
    seq = decode_sequential(p, stream, np.unique(idx), num_threads=num_threads, transform=_hwc_resizer(size))
    return _clip_from_sequential(idx, n, seq, info, size, notes)


def _clip_from_sequential(idx: np.ndarray, n: int, seq: Sequential, info: VideoInfo, size, notes: list[str]):
    valid = first_occurrence(idx)
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
