"""Stage one: decode every video once, make the TTA views, run the backbone, store per-frame features.

The functions here are also the full-video path of the submission: ``ClipDataset`` (decode -> TTA views) and
``encode_views`` (views -> backbone features). Cache, training and submission therefore share one preprocessing
path: the same decoder, the same frame indices, the same TTA and the same normalisation (inside the encoder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from arena.runtime import autocast

log = logging.getLogger(__name__)


@dataclass
class ClipViews:
    """One decoded video, ready for the backbone.

    Attributes:
        key: the video's key (path relative to the data folder).
        views: uint8 ``[V, T, 3, H, W]`` (one row per TTA variant), or None when decoding failed.
        frame_indices: int64 ``[T]`` source frame index of each row.
        valid: bool ``[T]``: False where a row repeats an earlier frame (the attention mask).
        num_source_frames: frames the video really yields (the n of ``linspace(0, n-1, k)``); 0 when failed.
        status: ``ok``, ``partial`` (fewer distinct frames than asked, repeated) or ``failed``.
        message: why partial or failed.
        label: 0 real, 1 fake, None unknown.
        decode_seconds: wall time of decode + TTA in the worker.
    """

    key: str
    views: torch.Tensor | None
    frame_indices: np.ndarray
    valid: np.ndarray
    num_source_frames: int
    status: str
    message: str = ""
    label: int | None = None
    decode_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in ("ok", "partial", "failed"):
            raise ValueError(f"Invalid status ({self.status}). Supported values are ok, partial, failed.")
        if self.views is not None:
            if self.views.dtype != torch.uint8 or self.views.ndim != 5:
                got = f"{self.views.dtype} {tuple(self.views.shape)}"
                raise ValueError(f"views must be uint8 [V, T, 3, H, W], got {got}")
            if self.views.shape[1] != len(self.frame_indices) or len(self.valid) != len(self.frame_indices):
                raise ValueError("views, frame_indices and valid disagree on the number of frames")

    def __repr__(self) -> str:
        shape = None if self.views is None else tuple(self.views.shape)
        return f"ClipViews(key={self.key!r}, views={shape}, status={self.status!r}, n={self.num_source_frames})"


class ClipDataset(Dataset):
    """Decode -> TTA views for a list of videos; safe for DataLoader worker processes.

    The dataset holds only paths: decoders are created inside ``__getitem__``, i.e. inside the worker.

    Args:
        items: objects with ``key``, ``path`` and ``label`` (``arena.data.VideoItem``).
        size: (height, width) the decoder resizes to: the backbone's input size.
        variants: TTA variant names (``arena.tta.VARIANTS`` or a subset).
        frames: decode ``k`` uniformly spaced frames (the full-video path).
        frame_counts: decode the union of the uniform indices of every k (the cache path). Give exactly one of
            ``frames`` and ``frame_counts``.
        num_threads: FFmpeg threads per decoder.
        decode_device: ``cpu`` or ``cuda`` (NVDEC; the decoder falls back to CPU by itself where it cannot).
    """

    def __init__(
        self,
        items: Sequence,
        *,
        size: tuple[int, int],
        variants: Sequence[str],
        frames: int | None = None,
        frame_counts: Sequence[int] | None = None,
        num_threads: int = 1,
        decode_device: str = "cpu",
    ) -> None:
        if (frames is None) == (frame_counts is None):
            raise ValueError("Give exactly one of frames (full-video path) and frame_counts (cache path).")
        counts = [frames] if frames is not None else list(frame_counts)
        if any(int(k) < 1 for k in counts):
            raise ValueError(f"Frame counts must be >= 1, got {counts}.")
        self.items = list(items)
        self.size = (int(size[0]), int(size[1]))
        self.variants = tuple(variants)
        self.frames = frames
        self.frame_counts = tuple(sorted({int(k) for k in frame_counts})) if frame_counts is not None else None
        self.num_threads = num_threads
        self.decode_device = decode_device

    def __len__(self) -> int:
        return len(self.items)

    def indices_for(self, num_source_frames: int) -> np.ndarray:
        """Source frame indices this dataset decodes for a video of ``num_source_frames`` frames."""
        from arena.video import uniform_indices

        if self.frames is not None:
            return uniform_indices(num_source_frames, self.frames)
        return np.unique(np.concatenate([uniform_indices(num_source_frames, k) for k in self.frame_counts]))

    def __getitem__(self, i: int) -> ClipViews:
        from arena.tta import tta_views
        from arena.video import VideoDecodeError, decode_selected

        item = self.items[i]
        t0 = time.perf_counter()
        empty = np.zeros(0, dtype=np.int64)
        try:
            clip = decode_selected(
                item.path, self.indices_for, size=self.size, device=self.decode_device, num_threads=self.num_threads
            )
            views = tta_views(clip.frames.cpu(), self.variants)
        except VideoDecodeError as exc:
            return ClipViews(item.key, None, empty, empty.astype(bool), 0, "failed", str(exc), item.label)
        return ClipViews(
            key=item.key,
            views=views,
            frame_indices=np.asarray(clip.frame_indices, dtype=np.int64),
            valid=np.asarray(clip.valid, dtype=bool),
            num_source_frames=int(clip.num_source_frames),
            status="partial" if clip.partial else "ok",
            message=clip.message,
            label=item.label,
            decode_seconds=time.perf_counter() - t0,
        )


def make_loader(dataset: ClipDataset, *, workers: int, prefetch: int = 2) -> DataLoader:
    """A DataLoader yielding one ``ClipViews`` at a time, decoding ``workers`` videos ahead of the model."""
    return DataLoader(
        dataset,
        batch_size=None,  # one video per item: videos have different frame counts
        shuffle=False,
        num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
        collate_fn=_identity,
    )


def _identity(x):
    return x


@torch.inference_mode()
def encode_views(
    encoder: torch.nn.Module,
    views: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = True,
) -> torch.Tensor:
    """Run the backbone over every frame of every view: uint8 ``[V, T, 3, H, W]`` -> float32 ``[V, T, d]``.

    Frames of all variants are flattened into batches of ``batch_size`` so the backbone sees full batches
    whatever the number of frames per video.
    """
    v, t = views.shape[:2]
    flat = views.reshape(v * t, *views.shape[2:])
    out = []
    for start in range(0, flat.shape[0], batch_size):
        chunk = flat[start : start + batch_size].to(device, non_blocking=True)
        chunk = chunk.contiguous(memory_format=torch.channels_last)
        with autocast(device, enabled=amp):
            feats = encoder(chunk)
        out.append(feats.float())  # stays on the device: one copy back per video, not a GPU sync per batch
    return torch.cat(out).cpu().reshape(v, t, -1)


@dataclass
class RunSummary:
    """What a stage did: counts, failures with reasons, time and throughput."""

    done: int = 0
    skipped: int = 0
    partial: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    seconds: float = 0.0
    excluded: list[str] = field(default_factory=list)  # videos/CSV rows the data check skipped, with reasons
    warnings: list[str] = field(default_factory=list)  # other data-check warnings (e.g. a missing CSV)

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"done {self.done} (partial {self.partial}), skipped (already cached) {self.skipped}, "
            f"failed {len(self.failed)}; {self.seconds:.1f} s, {rate:.2f} videos/s, {fps:.1f} frames/s"
        ]
        out += [f"  failed {k}: {msg}" for k, msg in sorted(self.failed.items())]
        out += [f"data check: {msg}" for msg in self.warnings]
        if self.excluded:
            out.append(f"not in the data set (skipped by the data check) {len(self.excluded)}:")
            out += [f"  - {msg}" for msg in self.excluded[:20]]
            if len(self.excluded) > 20:
                out.append(f"  ... and {len(self.excluded) - 20} more (arena doctor --data DIR lists all)")
        return out


def iter_clips(dataset: ClipDataset, *, workers: int) -> Iterator[ClipViews]:
    """Decoded clips in dataset order, decoding in ``workers`` processes while the caller computes."""
    yield from make_loader(dataset, workers=workers)


def provenance_for(encoder, *, variants: Sequence[str], frame_counts: Sequence[int], split_sha256: str):
    """The cache provenance that describes features made by ``encoder`` with these options."""
    import arena
    from arena.cache import Provenance
    from arena.tta import tta_spec

    return Provenance(
        backbone=encoder.name,
        weights_source=encoder.weights_source,
        weights_hash=encoder.weights_hash(),
        input_size=tuple(int(s) for s in encoder.input_size),
        mean=tuple(float(x) for x in encoder.mean.flatten().tolist()),
        std=tuple(float(x) for x in encoder.std.flatten().tolist()),
        interpolation=str(encoder.interpolation),
        tta=tta_spec(),
        variants=tuple(variants),
        frame_counts=tuple(sorted(int(k) for k in frame_counts)),
        arena_version=arena.__version__,
        split_sha256=split_sha256,
        feature_dim=int(encoder.feature_dim),
    )


def extract_features(
    *,
    data: str | Path,
    cache: str | Path,
    models: str | Path,
    frame_counts: Sequence[int] = (24, 32, 48),
    tta: bool = True,
    backbone: str | None = None,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    batch_size: int = 64,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    amp: bool = True,
) -> RunSummary:
    """Build (or resume) the feature cache for every train and test video of ``data``.

    Videos already in the cache are skipped; a video that cannot be decoded is recorded as failed and the run
    goes on. Returns the run summary; the cache is complete when ``summary.failed`` is empty; videos and CSV rows the
    data check skipped (empty files, names listed but missing, bad labels, ...) are in ``summary.excluded``.
    """
    from tqdm import tqdm

    from arena.cache import CacheWriter
    from arena.data import load_dataset, make_split
    from arena.model import DEFAULT_BACKBONE, create_encoder
    from arena.runtime import resolve_device
    from arena.tta import VARIANTS

    dev = resolve_device(device)
    dataset = load_dataset(data)
    split = make_split(dataset, models)
    encoder = create_encoder(
        backbone or DEFAULT_BACKBONE, pretrained=pretrained, weights=weights, image_size=image_size, seed=seed
    )
    encoder = encoder.to(dev).eval().to(memory_format=torch.channels_last)
    variants = VARIANTS if tta else VARIANTS[:1]
    prov = provenance_for(encoder, variants=variants, frame_counts=frame_counts, split_sha256=split.sha256)

    items = list(dataset.train) + list(dataset.test)
    if shard is not None:
        i, n = shard
        items = items[i::n]
    excluded = dataset.report.skipped_items
    summary = RunSummary(excluded=excluded, warnings=[w for w in dataset.report.warnings if w not in excluded])
    t0 = time.perf_counter()
    with CacheWriter(cache, prov, shard=shard) as writer:
        done = writer.done_keys()
        todo = [it for it in items if it.key not in done]
        summary.skipped = len(items) - len(todo)
        if limit is not None:
            todo = todo[:limit]
        ds = ClipDataset(todo, size=prov.input_size, variants=variants, frame_counts=frame_counts,
                         decode_device="cpu")
        bar = tqdm(total=len(todo), desc="features", unit="video", dynamic_ncols=True)
        for clip in iter_clips(ds, workers=workers):
            if clip.views is None:
                writer.write_failure(clip.key, label=clip.label, message=clip.message)
                summary.failed[clip.key] = clip.message
            else:
                feats = encode_views(encoder, clip.views, device=dev, batch_size=batch_size, amp=amp)
                writer.write(
                    clip.key,
                    features=feats.numpy().astype(np.float16),
                    frame_indices=clip.frame_indices,
                    num_source_frames=clip.num_source_frames,
                    label=clip.label,
                    status=clip.status,
                    message=clip.message,
                    valid=clip.valid,
                )
                summary.done += 1
                summary.partial += clip.status == "partial"
                summary.frames += int(clip.views.shape[0] * clip.views.shape[1])
            bar.update(1)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(fps=f"{summary.frames / max(elapsed, 1e-9):.1f}", failed=len(summary.failed))
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
