"""The one clip pipeline: decode -> (augment) -> views, shared by ``features``, ``train-full`` and ``submit``.

``ClipDataset`` holds only paths (decoders are created inside the worker process that decodes: `arena.isolation`,
which turns a crash, a hang or a runaway allocation into that one video's failure) and yields one ``ClipViews`` per
video: uint8 views ``[V, T, 3, H, W]``, the source frame indices and the attention mask.

* Cache and submission: ``views`` are the TTA variants (``arena.tta``) of the uniformly sampled frames.
* Training: the same decode, then the ``augment`` hook (one random draw per clip from a generator seeded by
  (seed, epoch, index)) gives a single view; validation clips use the ``original`` variant, as the cache does.
* Face crops (``faces``, `arena.faces.FaceCropper`): the frames are decoded at full resolution, together with the
  cropper's detection frames unless the cropper already holds the video's detections (`FaceCropper.prepare`, as
  train-full does once before its epochs), and each sampled frame becomes a face-centred crop at the backbone's
  input size before the TTA views or the augmentation; ``views`` is the main face track, ``track_views`` the others.

``encode_views`` runs the backbone over every view: the same function for the cache and for the full-video path.

GPU pipeline (issue 16): ``views_on="device"`` makes the workers return the decoded frames only, and `iter_clips`
makes the TTA views on the model's device with `arena.tta_tensor` (equal to albumentations' within 1 level);
``decoder`` picks the CPU decoder or NVDEC (`arena.nvdec`). Given the model's ``device``, `iter_clips` hands over
clips whose tensors are already there: pinned host memory, copied on a second CUDA stream one clip ahead of the
model, no host synchronisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from arena.errors import OptionError, VideoDecodeError
from arena.faces.stage import FaceCropper, FaceCrops
from arena.faults import before_decode
from arena.isolation import isolated
from arena.nvdec import check_decoder, use_nvdec
from arena.runtime import autocast
from arena.sampling import first_occurrence, uniform_indices
from arena.tta import tta_views
from arena.tta_tensor import tensor_views
from arena.video import decode_selected

Augment = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]  # uint8 [T,3,H,W], rng -> uint8 [T,3,H,W]
STATUSES = ("ok", "partial", "failed")
VIEWS_ON = ("cpu", "device")


@dataclass
class ClipViews:
    """One decoded video, ready for the backbone.

    Attributes:
        key: the video's key (path relative to the data folder).
        views: uint8 ``[V, T, 3, H, W]`` (one row per TTA variant, or the one augmented view), None when failed.
        frame_indices: int64 ``[T]`` source frame index of each row.
        valid: bool ``[T]``: False where a row repeats an earlier frame (the attention mask).
        num_source_frames: frames the video really yields (the n of ``linspace(0, n-1, k)``); 0 when failed.
        status: ``ok``, ``partial`` (fewer distinct frames than asked, repeated) or ``failed``.
        message: why partial or failed.
        label: 0 real, 1 fake, None unknown.
        index: position of the video in its dataset.
        boxes: face crops only: float32 ``[N, T, 4]`` crop boxes (x1, y1, x2, y2 in source pixels) of the N face
            tracks (main first), NaN where the video had no face and the letterboxed whole frame was used.
        faces_found: face crops only: False when no face was found (the whole frame, letterboxed); None without
            face crops.
        track_views: face crops with ``max_faces > 1``: the views of the other face tracks, each like ``views``.
        pending: the TTA variants still to be made (``views_on="device"``): ``views`` and ``track_views`` then hold
            the frames alone, ``[1, T, 3, H, W]``, until `iter_clips` makes the views where the model is.
    """

    key: str
    views: torch.Tensor | None
    frame_indices: np.ndarray
    valid: np.ndarray
    num_source_frames: int
    status: str
    message: str = ""
    label: int | None = None
    index: int = -1
    boxes: np.ndarray | None = None
    faces_found: bool | None = None
    track_views: tuple[torch.Tensor, ...] = ()
    pending: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Invalid status ({self.status}). Supported values are {', '.join(STATUSES)}.")
        if self.views is not None:
            if self.views.dtype != torch.uint8 or self.views.ndim != 5:
                got = f"{self.views.dtype} {tuple(self.views.shape)}"
                raise ValueError(f"views must be uint8 [V, T, 3, H, W], got {got}")
            if self.views.shape[1] != len(self.frame_indices) or len(self.valid) != len(self.frame_indices):
                raise ValueError("views, frame_indices and valid disagree on the number of frames")

    @property
    def ok(self) -> bool:
        return self.views is not None

    def pin_memory(self) -> ClipViews:
        """The clip with its tensors in page-locked memory (the decode supervisor of `arena.isolation` calls this),
        so the copy to the GPU runs asynchronously."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ClipViews:
        if self.views is None:
            return self
        return replace(self, views=fn(self.views), track_views=tuple(fn(t) for t in self.track_views))

    def __repr__(self) -> str:
        shape = None if self.views is None else tuple(self.views.shape)
        return f"ClipViews(key={self.key!r}, views={shape}, status={self.status!r}, n={self.num_source_frames})"


class ClipDataset(Dataset):
    """Decode -> views for a list of videos; safe for worker processes (`arena.isolation`).

    Args:
        items: objects with ``key``, ``path`` and ``label`` (``arena.data.VideoItem``).
        size: (height, width) the decoder resizes to: the backbone's input size.
        variants: TTA variant names (``arena.tta.VARIANTS`` or a subset); ignored when ``augment`` is given.
        frames: decode ``k`` uniformly spaced frames (the full-video and training paths).
        frame_counts: decode the union of the uniform indices of every k (the cache path). Give exactly one of
            ``frames`` and ``frame_counts``.
        augment: training hook ``augment(frames, rng) -> frames``; with it the clip has one view, augmented with a
            generator seeded by ``(seed, epoch, index)``, so a clip is the same whichever worker decodes it and
            whether or not the run was resumed. Index the dataset with ``(epoch, index)`` keys then.
        seed: the augmentation seed.
        num_threads: FFmpeg threads per decoder.
        decode_device: ``cpu`` or ``cuda`` (NVDEC; the decoder falls back to CPU by itself where it cannot).
        faces: face-centred crops (`arena.faces.FaceCropper`) instead of the whole frame resized; None: whole frames.
        decoder: ``cpu``, ``nvdec`` or ``auto`` (`arena.nvdec`; NVDEC decodes in the workers, which then start by
            ``spawn``).
        views_on: ``cpu`` (albumentations, in the workers: every cache so far) or ``device`` (`arena.tta_tensor`,
            made by `iter_clips` on the model's device; items then come with ``pending`` views). Ignored with
            ``augment``.
    """

    def __init__(
        self,
        items: Sequence,
        *,
        size: tuple[int, int],
        variants: Sequence[str] = ("original",),
        frames: int | None = None,
        frame_counts: Sequence[int] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        num_threads: int = 1,
        decode_device: str = "cpu",
        faces: FaceCropper | None = None,
        decoder: str = "cpu",
        views_on: str = "cpu",
    ) -> None:
        if (frames is None) == (frame_counts is None):
            raise ValueError("Give exactly one of frames (full-video path) and frame_counts (cache path).")
        counts = [frames] if frames is not None else list(frame_counts)
        if any(int(k) < 1 for k in counts):
            raise ValueError(f"Frame counts must be >= 1, got {counts}.")
        if not variants and augment is None:
            raise ValueError("at least one TTA variant is needed (e.g. 'original').")
        if views_on not in VIEWS_ON:
            raise OptionError(f"Invalid views_on ({views_on}). Supported values are {', '.join(VIEWS_ON)}.")
        self.items = list(items)
        self.size = (int(size[0]), int(size[1]))
        self.variants = tuple(variants)
        self.frames = frames
        self.frame_counts = tuple(sorted({int(k) for k in frame_counts})) if frame_counts is not None else None
        self.augment = augment
        self.seed = int(seed)
        self.num_threads = num_threads
        self.decode_device = decode_device
        self.faces = faces
        self.decoder = check_decoder(decoder)
        self.views_on = views_on if augment is None else "cpu"

    def __len__(self) -> int:
        return len(self.items)

    def indices_for(self, num_source_frames: int) -> np.ndarray:
        """Source frame indices this dataset decodes for a video of ``num_source_frames`` frames."""
        if self.frames is not None:
            return uniform_indices(num_source_frames, self.frames)
        return np.unique(np.concatenate([uniform_indices(num_source_frames, k) for k in self.frame_counts]))

    def _decode_indices(self, num_source_frames: int, path: str | os.PathLike) -> np.ndarray:
        """What the decoder reads: the sampled frames, plus the detection frames when cropping faces on a video
        whose detections were not prepared (`FaceCropper.prepare`)."""
        want = self.indices_for(num_source_frames)
        if self.faces is None or self.faces.detections(path, num_source_frames) is not None:
            return want
        return np.union1d(want, self.faces.detection_indices(num_source_frames))

    def failed(self, key: int | tuple[int, ...], message: str) -> ClipViews:
        """The clip that stands for ``self[key]`` when the video could not be used: ``message`` says why."""
        i = key[1] if isinstance(key, tuple) else key
        item, empty = self.items[i], np.zeros(0, dtype=np.int64)
        return ClipViews(item.key, None, empty, empty.astype(bool), 0, "failed", message, item.label, index=i)

    def __getitem__(self, key: int | tuple[int, int]) -> ClipViews:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        item = self.items[i]
        try:
            before_decode(item.path)  # the fault switch (`arena.faults`): armed in decode workers only
            clip = decode_selected(
                item.path, lambda n: self._decode_indices(n, item.path),
                size=None if self.faces is not None else self.size, device=self.decode_device,
                num_threads=self.num_threads, decoder=self.decoder,
            )
            tracks, valid, face = self._frames(clip, item.path)
            if self.augment is not None:
                views = [self.augment(t, np.random.default_rng([self.seed, epoch, i])).unsqueeze(0) for t in tracks]
            elif self.views_on == "device":
                views = [t.unsqueeze(0) for t in tracks]
            else:
                views = [tta_views(t, self.variants) for t in tracks]
        except VideoDecodeError as exc:
            # A broken video costs its own row or training step, never the run: recorded as failed with the reason.
            return self.failed(key, str(exc))
        message = "; ".join(m for m in (clip.message, face.message if face is not None and not face.found else "")
                            if m)
        return ClipViews(
            key=item.key,
            views=views[0],
            frame_indices=self.indices_for(clip.num_source_frames) if face is not None
            else np.asarray(clip.frame_indices, dtype=np.int64),
            valid=valid,
            num_source_frames=int(clip.num_source_frames),
            status="ok" if valid.all() else "partial",
            message=message,
            label=item.label,
            index=i,
            boxes=None if face is None else face.boxes,
            faces_found=None if face is None else bool(face.found),
            track_views=tuple(views[1:]),
            pending=self.variants if self.views_on == "device" else (),
        )

    def _frames(self, clip, path: str | os.PathLike) -> tuple[list[torch.Tensor], np.ndarray, FaceCrops | None]:
        """The frames to make views of (one tensor per face track, or the resized frames), the valid mask, the
        face crops (None without ``faces``)."""
        if self.faces is None:
            return [clip.frames.cpu()], np.asarray(clip.valid, dtype=bool), None
        want = self.indices_for(clip.num_source_frames)
        rows = np.searchsorted(clip.frame_indices, want)
        # A row is valid when its frame was really decoded and is not a repeat of the row before (the mask the
        # whole-frame path gets from the decoder).
        valid = np.asarray(clip.valid, dtype=bool)[rows] & first_occurrence(want)
        face = self.faces.crop(clip.frames.cpu(), clip.frame_indices, want, self.size,
                               num_source_frames=clip.num_source_frames, path=path)
        return list(face.crops), valid, face


def start_method(dataset: ClipDataset) -> str | None:
    """How decode workers start: ``spawn`` when they use CUDA (a face detector on CUDA, NVDEC; CUDA cannot be used
    in a forked process), else the platform's default."""
    cuda = (dataset.faces is not None and dataset.faces.device.startswith("cuda")) or use_nvdec(dataset.decoder)
    return "spawn" if cuda else None


def iter_clips(dataset: ClipDataset, *, workers: int, device: torch.device | None = None) -> Iterator[ClipViews]:
    """Decoded clips in dataset order, decoding in ``workers`` isolated processes while the caller computes.

    Each worker decodes one video at a time under a time and a memory limit (`arena.isolation`): a video whose
    worker crashes, hangs or runs out of memory, or whose decode raises anything, comes back failed with the
    reason, and the others are decoded as usual. Every clip comes with its views made (``pending`` empty), also
    with ``views_on="device"``: there they are made on ``device`` (on the CPU without one). With a ``device``, the
    clips' tensors are moved there: on a GPU from pinned memory on a second stream, one clip ahead, so the copy
    of the next clip runs under the model's work on this one.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    clips = isolated(dataset, range(len(dataset)), workers=workers, pin_memory=cuda,
                     pin_device=torch.device(device).index if cuda else None, start_method=start_method(dataset))
    if not cuda:
        yield from (_made(clip if device is None else clip._map(lambda t: t.to(device))) for clip in clips)
        return
    device = torch.device(device)
    copy = torch.cuda.Stream(device)
    ahead: tuple[ClipViews, torch.cuda.Event] | None = None
    for clip in clips:
        with torch.cuda.stream(copy):
            moved = clip._map(lambda t: t.to(device, non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(copy)
        if ahead is not None:
            yield _made(_arrived(*ahead, device))
        ahead = (moved, copied)
    if ahead is not None:
        yield _made(_arrived(*ahead, device))


def _arrived(clip: ClipViews, copied: torch.cuda.Event, device: torch.device) -> ClipViews:
    """``clip`` once its copy is done, as far as the model's stream is concerned (no host wait)."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(copied)
    for t in (clip.views, *clip.track_views):
        if t is not None:
            t.record_stream(stream)  # made on the copy stream, used on this one: not freed before this one is done
    return clip


def _made(clip: ClipViews) -> ClipViews:
    """``clip`` with its pending TTA views made where its frames are (`arena.tta_tensor`)."""
    if not clip.pending or clip.views is None:
        return clip
    return replace(clip._map(lambda t: tensor_views(t[0], clip.pending)), pending=())


@torch.inference_mode()
def encode_views(
    encoder: torch.nn.Module,
    views: torch.Tensor,
    *,
    device: torch.device,
    frame_batch: int = 64,
    precision: str = "auto",
) -> torch.Tensor:
    """Run the backbone over every frame of every view: uint8 ``[V, T, 3, H, W]`` -> float32 ``[V, T, d]``.

    Frames of all variants are flattened into batches of ``frame_batch`` frames, so the backbone sees full batches
    whatever the number of frames per video. ``precision`` follows `arena.runtime.autocast_dtype`. ``views`` may
    already be on ``device`` (`iter_clips` with a device): then no batch is copied at all. The one host sync is the
    copy of the features back, once per video.

    Raises:
        ValueError: a feature is NaN or infinite (callers record it as the video's failure).
    """
    v, t = views.shape[:2]
    flat = views.reshape(v * t, *views.shape[2:])
    out = []
    with autocast(device, precision):
        for start in range(0, flat.shape[0], frame_batch):
            chunk = flat[start : start + frame_batch].to(device, non_blocking=True)
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            out.append(encoder(chunk).float())  # stays on the device: one copy back per video, not a sync per batch
    feats = torch.cat(out).cpu().reshape(v, t, -1)
    if not torch.isfinite(feats).all():  # a damaged frame or a broken backbone: this video's failure, not a NaN row
        raise ValueError("the backbone gave non-finite features (NaN or inf)")
    return feats
