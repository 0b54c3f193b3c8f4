"""Stage one: decode every video once, make the TTA views, run the backbone, store per-frame features.

The clip pipeline (`arena.clips`: decode -> TTA views -> backbone) is the one the submission and training use, so
the cache holds exactly what the full-video path computes. The cache's provenance (`provenance_for`) records what
determines those numbers -- never the split: one cache serves every split and fold, and this stage neither reads
nor writes the models folder.

With ``pseudo`` (``--pseudo-fakes sbi:K``, `arena.pseudo.CachePseudoFakes`) every labelled real also gets K
self-blended copies, cached as items ``<key>#sbi<i>`` labelled fake: blended from the real's decoded frames (no
second decode), every TTA view made from the blended frames, stored with the real's frame indices and boxes. They
are made for every labelled real, whatever the split; `arena.pseudo.pseudo_items` lets a consumer take those of its
training part.

Under torchrun (`arena.distributed.launched`) every rank is one shard, ``(RANK, WORLD_SIZE)``, written to its shard
file exactly as ``--shard`` would (so a rank that dies keeps its finished videos); rank 0 then merges the shards
into the cache (`arena.cache.absorb_shards`), which is byte-identical to one process's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arena.cache import (
    FEATURE_FORMAT,
    CacheError,
    CacheWriter,
    Provenance,
    absorb_shards,
    cached_statuses,
    shard_files,
    shard_items,
    shard_path,
)
from arena.clips import ClipDataset, ClipViews, encode_views, iter_clips
from arena.data import load_dataset
from arena.distributed import Dist, gather, launched, shared_run
from arena.errors import OptionError
from arena.faces.modes import crop_provenance, face_cropper
from arena.faces.stage import FaceCropConfig
from arena.isolation import describe
from arena.model import DEFAULT_BACKBONE, FrameEncoder, create_encoder
from arena.nvdec import use_nvdec
from arena.pseudo import CachePseudoFakes, blend_clip, face_box
from arena.runtime import resolve_device
from arena.sampling import FRAME_CHOICES, sampling_spec
from arena.tta import VARIANTS, tta_spec, tta_views
from arena.tta_tensor import tensor_views
from arena.video import DEFAULT_RESIZE

#: The resize the decoder applies with either backend (`arena.video.resize_frames` or torchcodec's Resize); which
#: implementation ran is the decoder's ``resize`` setting. The backbone's nominal (timm) interpolation is not used.
APPLIED_INTERPOLATION = "bilinear-antialias"


@dataclass
class RunSummary:
    """What a stage did: counts, failures with reasons, time and throughput."""

    done: int = 0
    skipped: int = 0
    partial: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    seconds: float = 0.0
    no_face: list[str] = field(default_factory=list)  # face crops: videos with no face (whole frame, letterboxed)
    excluded: list[str] = field(default_factory=list)  # videos/CSV rows the data check skipped, with reasons
    warnings: list[str] = field(default_factory=list)  # other data-check warnings (e.g. a missing CSV)
    pseudo: int = 0  # pseudo-fake items written (--pseudo-fakes)
    processes: int = 1  # torchrun ranks that shared the work (`combined`)

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"done {self.done} (partial {self.partial}), skipped (already cached) {self.skipped}, "
            f"failed {len(self.failed)}; {self.seconds:.1f} s, {rate:.2f} videos/s, {fps:.1f} frames/s"
            + (f" ({self.processes} processes)" if self.processes > 1 else "")
        ]
        out += [f"  failed {k}: {msg}" for k, msg in sorted(self.failed.items())]
        if self.pseudo:
            out.append(f"pseudo-fake items written: {self.pseudo}")
        if self.no_face:
            out.append(f"no face found in {len(self.no_face)} video(s), whole frame used (letterboxed): "
                       + ", ".join(self.no_face[:10]) + (" ..." if len(self.no_face) > 10 else ""))
        out += [f"data check: {msg}" for msg in self.warnings]
        if self.excluded:
            out.append(f"not in the data set (skipped by the data check) {len(self.excluded)}:")
            out += [f"  - {msg}" for msg in self.excluded[:20]]
            if len(self.excluded) > 20:
                out.append(f"  ... and {len(self.excluded) - 20} more (arena doctor --data DIR lists all)")
        return out

    @classmethod
    def combined(cls, summaries: Sequence[RunSummary]) -> RunSummary:
        """One summary of several ranks' runs over their shares of one data set (its data check is every rank's)."""
        first = summaries[0]
        return cls(done=sum(s.done for s in summaries), skipped=sum(s.skipped for s in summaries),
                   partial=sum(s.partial for s in summaries),
                   failed={k: v for s in summaries for k, v in s.failed.items()},
                   frames=sum(s.frames for s in summaries), seconds=max(s.seconds for s in summaries),
                   no_face=[k for s in summaries for k in s.no_face], excluded=first.excluded,
                   warnings=first.warnings, pseudo=sum(s.pseudo for s in summaries),
                   processes=sum(s.processes for s in summaries))


def decoder_provenance(decoder: str = "cpu", views_on: str = "cpu") -> dict:
    """The provenance's ``decoder`` field: what decoded the pixels (``cpu``, or ``nvdec`` -- ``auto`` recorded as
    what it picks here) and, only when the views were made on the model's device (`arena.tta_tensor`),
    ``views_on: device``. NVDEC's pixels and the tensor views may differ slightly from the CPU's, so a cache built
    one way is not resumed another way; a cache built the default way records exactly what it always did."""
    spec = {"device": "nvdec" if use_nvdec(decoder) else "cpu", "resize": DEFAULT_RESIZE}
    return spec | ({"views_on": "device"} if views_on == "device" else {})


def built_with(prov: Provenance) -> tuple[str, str]:
    """``(decoder, views_on)`` that decode as the cache ``prov`` describes was built (`decoder_provenance`'s
    inverse): what `arena submit --verify` re-decodes with."""
    return ("nvdec" if prov.decoder.get("device") == "nvdec" else "cpu"), str(prov.decoder.get("views_on", "cpu"))


def provenance_for(encoder: FrameEncoder, *, variants: Sequence[str], frame_counts: Sequence[int],
                   crop: FaceCropConfig | None = None, pseudo: CachePseudoFakes | None = None,
                   seed: int = 0, decoder: str = "cpu", views_on: str = "cpu") -> Provenance:
    """The cache provenance that describes features made by ``encoder`` with these options (``seed``: the
    pseudo-fakes' seed, recorded with them; ``decoder``, ``views_on``: `decoder_provenance`)."""
    return Provenance(
        backbone=encoder.name,
        weights_source=encoder.weights_source,
        weights_hash=encoder.weights_hash(),
        input_size=tuple(int(s) for s in encoder.input_size),
        mean=tuple(float(x) for x in encoder.mean.flatten().tolist()),
        std=tuple(float(x) for x in encoder.std.flatten().tolist()),
        interpolation=APPLIED_INTERPOLATION,
        decoder=decoder_provenance(decoder, views_on),
        tta=tta_spec(),
        variants=tuple(variants),
        sampling=sampling_spec(),
        frame_counts=tuple(sorted(int(k) for k in frame_counts)),
        feature_dim=int(encoder.feature_dim),
        feature_format=FEATURE_FORMAT,
        crop=crop_provenance(crop),
        pseudo_fakes=None if pseudo is None else pseudo.provenance(seed),
    )


def extract_features(
    *,
    data: str | Path,
    cache: str | Path,
    frame_counts: Sequence[int] = FRAME_CHOICES,
    tta: bool = True,
    backbone: str | None = None,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    frame_batch: int = 64,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    precision: str = "auto",
    crop: FaceCropConfig | None = None,
    pseudo: CachePseudoFakes | None = None,
    decoder: str = "cpu",
    views_on: str = "cpu",
) -> RunSummary:
    """Build (or resume) the feature cache for every train and test video of ``data``.

    Videos already in the cache are skipped; a video that cannot be used is recorded as failed with the reason
    and the run goes on: one that cannot be decoded, whose decode worker crashes, hangs or runs out of memory
    (`arena.isolation`), or whose processing raises (a NaN feature, ...).
    A cache with nothing to add is left untouched (not rewritten).

    Under torchrun (``WORLD_SIZE`` > 1) each rank is shard ``(RANK, WORLD_SIZE)`` on its own device (GPU
    ``LOCAL_RANK`` on CUDA) and skips what ``cache`` and earlier runs' shard files already hold; rank 0 then merges
    every shard file into ``cache`` and deletes them (`arena.cache.absorb_shards`). With several machines the
    cache's folder must be one they all share. Every rank returns the summary of the whole run; ``limit`` counts
    per rank.

    Args:
        frame_batch: frames per backbone forward (all views of a video are flattened into these).
        shard: ``(i, n)``: process every n-th video, into ``cache.shard-i-of-n.h5`` (refused under torchrun, where
            each rank is a shard).
        precision: autocast policy of `arena.runtime` (``auto`` or ``fp32``, ...).
        crop: face-centred crops (`arena.faces.FaceCropConfig`) instead of whole frames; None: whole frames. The
            detector runs in the decoding workers on the CPU, or batched on the GPU when ``device`` is CUDA.
        pseudo: also cache K self-blended copies of every labelled real (seeded by ``seed``, the key and the
            copy); a video whose copies are missing is decoded again, one that failed gets none.
        decoder: ``cpu``, ``nvdec`` or ``auto`` (`arena.nvdec`); recorded in the provenance as what decoded.
        views_on: ``cpu`` (albumentations in the decoding workers) or ``device`` (`arena.tta_tensor` on ``device``);
            ``device`` is recorded in the provenance. A cache is resumed only with the settings it was built with.

    Returns:
        The run summary; the cache is complete when ``summary.failed`` is empty. Videos and CSV rows the data
        check skipped (empty files, names listed but missing, bad labels, ...) are in ``summary.excluded``.
    """
    if launched().enabled and shard is not None:
        raise OptionError(f"--shard {shard[0]}/{shard[1]} under torchrun (WORLD_SIZE={launched().world}): each rank "
                          "already takes shard RANK/WORLD_SIZE. Drop --shard, or run one process per shard without "
                          "torchrun.")
    with shared_run(resolve_device(device)) as (dist, dev):
        summary = _extract(data=data, cache=Path(cache), frame_counts=frame_counts, tta=tta, backbone=backbone,
                           pretrained=pretrained, weights=weights, image_size=image_size, seed=seed, dev=dev,
                           workers=workers, frame_batch=frame_batch, limit=limit,
                           shard=(dist.rank, dist.world) if dist.enabled else shard, precision=precision, crop=crop,
                           pseudo=pseudo, dist=dist, decoder=decoder, views_on=views_on)
        if not dist.enabled:
            return summary
        summaries = gather(summary, dist)
        if dist.main:
            missing = [p for p in (shard_path(cache, r, dist.world) for r in range(dist.world)) if not p.exists()]
            if missing:
                raise CacheError(f"Rank 0 cannot see {', '.join(map(str, missing))}: the other ranks wrote them on "
                                 "their machines. Put the cache on a folder every machine shares, or run `arena "
                                 "features --shard i/n` on each machine and `arena cache merge` the shards.")
            absorb_shards(cache, shard_files(cache))
        return RunSummary.combined(summaries)


def _extract(*, data: str | Path, cache: Path, frame_counts: Sequence[int], tta: bool, backbone: str | None,
             pretrained: bool, weights: str | None, image_size: int | None, seed: int, dev: torch.device,
             workers: int, frame_batch: int, limit: int | None, shard: tuple[int, int] | None, precision: str,
             crop: FaceCropConfig | None, pseudo: CachePseudoFakes | None, dist: Dist, decoder: str,
             views_on: str) -> RunSummary:
    """`extract_features` of one process (one shard under torchrun, which also skips what ``cache`` and other
    runs' shard files hold)."""
    dataset = load_dataset(data)
    encoder = create_encoder(
        backbone or DEFAULT_BACKBONE, pretrained=pretrained, weights=weights, image_size=image_size, seed=seed
    )
    encoder = encoder.to(dev).eval().to(memory_format=torch.channels_last)
    variants = VARIANTS if tta else VARIANTS[:1]
    prov = provenance_for(encoder, variants=variants, frame_counts=frame_counts, crop=crop, pseudo=pseudo, seed=seed,
                          decoder=decoder, views_on=views_on)

    items = list(dataset.train) + list(dataset.test)
    if shard is not None:
        items = shard_items(items, *shard)
    excluded = dataset.report.skipped_items
    summary = RunSummary(excluded=excluded, warnings=[w for w in dataset.report.warnings if w not in excluded])
    t0 = time.perf_counter()
    ours = {shard_path(cache, r, dist.world) for r in range(dist.world)}
    prior = cached_statuses([cache, *(p for p in shard_files(cache) if p not in ours)], prov) if dist.enabled else {}
    with CacheWriter(cache, prov, shard=shard) as writer:
        done = writer.done_keys() | prior.keys()
        usable = writer.done_keys(retry_failed=True) | {k for k, status in prior.items() if status != "failed"}

        def copies(it) -> list[tuple[int, str]]:  # the pseudo-fake copies a video still needs (none once it failed)
            if pseudo is None or it.label != 0 or (it.key in done and it.key not in usable):
                return []
            return [(i, k) for i, k in enumerate(pseudo.keys(it.key)) if k not in done]

        todo = [it for it in items if it.key not in done or copies(it)]
        summary.skipped = sum(it.key in done for it in items)
        if limit is not None:
            todo = todo[:limit]
        clips = ClipDataset(todo, size=prov.input_size, variants=variants, frame_counts=frame_counts,
                            faces=face_cropper(crop, dev), decoder=decoder, views_on=views_on)
        make_views = tensor_views if views_on == "device" else tta_views  # the pseudo-fakes' views, made alike
        margin = None if crop is None else crop.margin
        encode = dict(encoder=encoder, device=dev, frame_batch=frame_batch, precision=precision)
        bar = tqdm(total=len(todo), desc="features" + (f" (rank 0 of {dist.world})" if dist.enabled else ""),
                   unit="video", dynamic_ncols=True, disable=not dist.main)
        for clip in iter_clips(clips, workers=workers, device=dev if views_on == "device" else None):
            stored: list[tuple[str, int | None, np.ndarray]] = []
            if clip.views is not None:
                try:  # everything of one video before anything is written: it is stored whole or failed
                    if clip.key not in done:
                        stored.append((clip.key, clip.label, _encode(clip.views, **encode)))
                    for i, key in copies(clip):  # from the decoded frames: every view is made from the blend
                        frames = blend_clip(clip.views[variants.index("original")], pseudo.rng(seed, clip.key, i),
                                            box=face_box(prov.input_size, margin, clip.faces_found),
                                            config=pseudo.config)
                        stored.append((key, 1, _encode(make_views(frames, variants), **encode)))
                except Exception as exc:  # noqa: BLE001 - a damaged frame, a NaN feature: this video's failure
                    clip = replace(clip, views=None, status="failed", message=describe(exc))
            if clip.views is None:
                if clip.key not in done:
                    writer.write_failure(clip.key, label=clip.label, message=clip.message)
                summary.failed[clip.key] = clip.message
            else:
                for key, label, feats in stored:
                    _write(writer, clip, key, feats, label)
                if clip.key not in done:
                    if clip.faces_found is False:
                        summary.no_face.append(clip.key)
                    summary.done += 1
                    summary.partial += clip.status == "partial"
                    summary.frames += int(clip.views.shape[0] * clip.views.shape[1])
                summary.pseudo += sum(key != clip.key for key, _, _ in stored)
            bar.update(1)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(fps=f"{summary.frames / max(elapsed, 1e-9):.1f}", failed=len(summary.failed))
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _encode(views: torch.Tensor, *, encoder: FrameEncoder, device: torch.device, frame_batch: int,
            precision: str) -> np.ndarray:
    """The float16 features the cache stores for ``views``.

    Raises:
        ValueError: a feature is NaN or infinite, or beyond float16's range.
    """
    feats = encode_views(encoder, views, device=device, frame_batch=frame_batch, precision=precision)
    half = feats.numpy().astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"features beyond float16's range (largest |x| {float(feats.abs().max()):.3g})")
    return half


def _write(writer: CacheWriter, clip: ClipViews, key: str, features: np.ndarray, label: int | None) -> None:
    """Write ``features`` (the clip's, or its pseudo-fake's) under ``key`` with the clip's frame indices, mask,
    status and main-track boxes."""
    writer.write(
        key,
        features=features,
        frame_indices=clip.frame_indices,
        num_source_frames=clip.num_source_frames,
        label=label,
        status=clip.status,
        message=clip.message,
        valid=clip.valid,
        boxes=None if clip.boxes is None else clip.boxes[0],
    )
