"""Optional GPU decoding with NVIDIA's PyNvVideoCodec (NVDEC): the pixels of chosen frame indices, on the GPU.

PyPI's torchcodec is a CPU build, so ``decode(device="cuda")`` falls back to the CPU; PyNvVideoCodec (PyPI,
``pip install 'arena[gpu]'``) drives NVDEC itself, with random access by frame index and batch retrieval, and its
frames reach torch through DLPack without leaving the GPU.

`arena.video` keeps deciding *which* frames: ``n`` and the indices come from torchcodec's exact scan, as on the
CPU path, so both decoders return the same frame indices; this module only makes their pixels. Choice
(``decoder=``, the ``--decoder`` option):

* ``cpu``: torchcodec, FFmpeg for damaged files (the default of the library: the feature cache's pixels).
* ``nvdec``: NVDEC on the CUDA device; refused with `OptionError` where there is no CUDA GPU or the package does
  not import.
* ``auto``: NVDEC where CUDA is present and PyNvVideoCodec imports, the CPU otherwise.

Either way a file NVDEC cannot be trusted with goes to the CPU decoder, with a note in the clip's message: a
rotated stream (NVDEC ignores the display matrix), a pixel format other than 8-bit 4:2:0 (10-bit, 4:2:2, 4:4:4),
a stream PyNvVideoCodec does not open (unsupported codec, an elementary stream without an index), a frame count
other than the scan's (its indices would not be the CPU path's), frames missing from a batch, or timestamps that
do not increase. NVDEC converts YUV to RGB with its own kernels, not FFmpeg's, so pixels may differ slightly:
the decode step of ``tools/gpu_check.py`` measures by how much (not measured yet: no GPU was at hand).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from arena.errors import OptionError

DECODERS = ("auto", "cpu", "nvdec")
PACKAGE = "PyNvVideoCodec"
#: What NVDEC decodes here (8-bit 4:2:0); torchcodec's names, as `arena.video.VideoInfo.pixel_format` gives them.
PIXEL_FORMATS = ("yuv420p", "yuvj420p", "nv12")
#: Frame indices per ``get_batch_frames_by_index`` call: bounds the full-size frames held on the GPU before the
#: resize (16 frames of 4K RGB are 400 MB).
CHUNK = 16


class NvdecUnsupported(Exception):
    """NVDEC cannot decode this file as the CPU path would; the message says why. `arena.video` catches it and
    decodes the file on the CPU, so it never reaches the user."""


def check_decoder(name: str) -> str:
    """``name`` when it is one of `DECODERS`, else `OptionError` naming them."""
    if name not in DECODERS:
        raise OptionError(f"Invalid decoder ({name}). Supported values are {', '.join(DECODERS)}.")
    return name


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """PyNvVideoCodec, or None and why not (looked up once per process)."""
    try:
        return importlib.import_module(PACKAGE), ""
    except Exception as exc:  # noqa: BLE001 - missing package, missing driver library, ABI mismatch: all "no"
        return None, f"{PACKAGE} does not import ({type(exc).__name__}: {_short(exc)}); pip install 'arena[gpu]'"


def unavailable() -> str | None:
    """Why NVDEC cannot be used in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return _load()[1] or None


def use_nvdec(decoder: str) -> bool:
    """Whether ``decoder`` (`DECODERS`) means NVDEC here.

    Raises:
        OptionError: an unknown name, or ``nvdec`` where CUDA or PyNvVideoCodec is missing.
    """
    if check_decoder(decoder) == "cpu":
        return False
    why = unavailable()
    if why is not None and decoder == "nvdec":
        raise OptionError(f"--decoder nvdec cannot be used: {why}. Use --decoder auto (NVDEC where it works, the "
                          "CPU elsewhere) or --decoder cpu.")
    return why is None


def gpu_index(device: str) -> int:
    """The GPU a ``cuda:N`` device names; 0 for ``cuda`` and for anything else."""
    m = re.fullmatch(r"cuda:(\d+)", str(device))
    return int(m.group(1)) if m else 0


def unsupported_reason(rotation: float, pixel_format: str | None) -> str | None:
    """Why a stream with this display rotation and pixel format goes to the CPU decoder, or None."""
    if rotation:
        return f"the stream is displayed rotated by {rotation:g} degrees, which NVDEC does not apply"
    if pixel_format not in PIXEL_FORMATS:
        return (f"pixel format {pixel_format} (NVDEC is used for 8-bit 4:2:0 streams only; 10-bit, 4:2:2 and "
                "4:4:4 go to the CPU)")
    return None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _chw(frame: torch.Tensor) -> torch.Tensor:
    """One decoded RGB frame as ``[3, H, W]`` (planar output), accepting interleaved ``[H, W, 3]`` too."""
    if frame.ndim == 3 and frame.shape[0] == 3:
        return frame
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return frame.permute(2, 0, 1)
    raise NvdecUnsupported(f"NVDEC returned a frame of shape {tuple(frame.shape)}, not RGB")


def decode(path: str | os.PathLike, indices: np.ndarray, *, num_frames: int, gpu: int,
           transform: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """The frames at sorted unique ``indices``, decoded by NVDEC on GPU ``gpu``.

    Args:
        path: the video file.
        indices: sorted unique frame indices (``0 <= i < num_frames``).
        num_frames: the exact scan's frame count; NVDEC must count the same, or its index ``i`` may be another
            frame than the CPU path's.
        gpu: the CUDA device index.
        transform: applied to each chunk of uint8 ``[k, 3, H, W]`` frames as it is decoded (the resize), so no
            more than `CHUNK` full-size frames exist at a time.

    Returns:
        uint8 ``[len(indices), 3, h, w]`` on the GPU, and NVDEC's timestamps (its own units; strictly increasing).

    Raises:
        NvdecUnsupported: the file cannot be decoded here as the CPU path would (the message says why).
    """
    nvc = _load()[0]
    if nvc is None:
        raise NvdecUnsupported(_load()[1])
    try:
        dec = nvc.SimpleDecoder(str(path), gpu_id=gpu, use_device_memory=True,
                                output_color_type=nvc.OutputColorType.RGBP)
    except Exception as exc:  # noqa: BLE001 - unsupported codec, no index, no decoder session: the CPU decodes it
        raise NvdecUnsupported(f"PyNvVideoCodec cannot open the file ({_short(exc)})") from None
    if len(dec) != num_frames:
        raise NvdecUnsupported(f"NVDEC counts {len(dec)} frames where the exact scan counts {num_frames}")
    frames, stamps = [], []
    for start in range(0, len(indices), CHUNK):
        chunk = [int(i) for i in indices[start : start + CHUNK]]
        try:
            got = dec.get_batch_frames_by_index(chunk)
        except Exception as exc:  # noqa: BLE001 - a damaged stream: the CPU path has the FFmpeg fallback for it
            raise NvdecUnsupported(f"NVDEC failed while decoding ({_short(exc)})") from None
        if len(got) != len(chunk):
            raise NvdecUnsupported(f"NVDEC returned {len(got)} of the {len(chunk)} frames asked for")
        batch = torch.stack([_chw(torch.from_dlpack(f)) for f in got])  # a copy: the decoder reuses its surfaces
        if batch.is_cuda:  # the copy must be done before the next call hands those surfaces back to the decoder
            torch.cuda.synchronize(batch.device)
        frames.append(transform(batch))
        stamps += [int(f.timestamp) for f in got]
    ts = np.asarray(stamps, dtype=np.int64)
    if not np.all(np.diff(ts) > 0):
        raise NvdecUnsupported("NVDEC returned timestamps that do not increase with the frame index")
    return torch.cat(frames), ts
