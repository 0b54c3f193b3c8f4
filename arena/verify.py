"""`arena submit --verify`: prove the full-video path and the cache path compute the same thing.

Same weights (a head-only model, whose encoder is the cache's): P(fake) recomputed from the cached features of
every variant with the same head must equal the full path's within the tolerance, which proves decode, frame
indices, TTA, resize and normalisation agree. A fine-tuned backbone (its features are not in the cache): the
cache's encoder, recreated from the provenance, runs on the frames the full path decodes and is compared with the
cached features, and the fine-tuned head is run on the full path's own features through the cache-path logic.
Both sides apply the model's calibration temperature.

An ensemble verifies every member against the cache that fits it (`verify_cache_for`: the cache a head was tuned on,
or one at a fine-tuned backbone's input size), on one shared sample; the fine-tuned check's first half (decode the
sample again, run the cache's encoder) depends on the cache and the frames only, so it runs once for all the
fine-tuned members that share them (``reference``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arena.cache import FeatureCache
from arena.clips import ClipDataset, encode_views, iter_clips
from arena.errors import CacheError, OptionError, SubmissionError
from arena.faces import modes as crop_modes
from arena.faces.modes import face_cropper
from arena.features import built_with, decoder_provenance
from arena.nvdec import unavailable
from arena.predict import LoadedModel, VideoPrediction, head_probabilities, recreate_encoder
from arena.runtime import Precision, resolve_device

VERIFY_TOLERANCE = 1e-3


#: Crop boxes are computed by the same code from the same detection frames on both paths: they must agree exactly
#: (a float32 rounding at most).
BOX_TOLERANCE_PX = 1e-3


@dataclass
class VerifyResult:
    """Outcome of `verify_against_cache`.

    Attributes:
        mode: ``cache-features`` (same weights: p_fake from cached features vs the full path) or ``finetuned``
            (the backbone changed: cache encoder on the full path's frames vs cached features, and the head on the
            full path's own features through the cache-path logic vs the full path).
        keys: the videos compared.
        max_abs_diff: largest |p_fake difference| (the criterion, tolerance ``tolerance``).
        tolerance: the largest allowed |p_fake difference|.
        max_feature_diff: finetuned mode: largest |feature difference| relative to the feature scale (allowed: ten
            times ``tolerance``).
        max_box_diff: face crops: largest |difference| in pixels between the cached and the full path's crop boxes
            of the main face track (allowed: `BOX_TOLERANCE_PX`: both paths must cut the same pixels).
        skipped: videos not compared, with reasons (failed decode, not in cache, a fallback changed the frames).
        lines: human-readable report.
    """

    mode: str
    keys: list[str]
    max_abs_diff: float
    tolerance: float
    max_feature_diff: float | None = None
    max_box_diff: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.keys) and self.max_abs_diff <= self.tolerance and (
            self.max_feature_diff is None or self.max_feature_diff <= self.tolerance * 10
        ) and (self.max_box_diff is None or self.max_box_diff <= BOX_TOLERANCE_PX)


def sample_keys(keys: Sequence[str], n: int | None, *, seed: int) -> list[str]:
    """``n`` keys drawn without replacement with ``seed`` (all of them when n is None or >= len), in input order."""
    keys = list(keys)
    if n is None or n >= len(keys):
        return keys
    if n < 1:
        raise OptionError(f"--verify-sample must be >= 1, got {n}.")
    pick = np.random.default_rng(seed).choice(len(keys), size=n, replace=False)
    return [keys[i] for i in sorted(pick)]


def open_verify_cache(model: LoadedModel, cache_path: str | Path) -> FeatureCache:
    """Open the cache ``--verify`` names and check it can verify this model (frame count, variants, weights).

    Called before predicting, so a wrong cache fails in seconds, not after the whole test set.

    Raises:
        SubmissionError: the cache cannot be opened or cannot verify this model (the message says what to change).
    """
    try:
        cache = FeatureCache.open(cache_path)
    except (CacheError, OSError) as exc:
        raise SubmissionError(f"--verify {cache_path}: {exc}") from exc
    prov = cache.provenance
    k = model.frames
    if k not in tuple(prov.frame_counts):
        raise SubmissionError(
            f"Cannot verify against {cache_path}: it holds frame counts {tuple(prov.frame_counts)}, the submission "
            f"uses {k} frames. Rebuild the cache with --frames including {k}, or submit with --frames "
            f"{prov.frame_counts[0]}."
        )
    missing_variants = [v for v in model.variants if v not in tuple(prov.variants)]
    if missing_variants:
        raise SubmissionError(
            f"Cannot verify against {cache_path}: variants {missing_variants} are not in the cache "
            f"(it has {tuple(prov.variants)}). Rebuild the cache with TTA, or submit with --no-tta."
        )
    if prov.crop != {k: v for k, v in model.crop.items() if k != "max_faces"}:
        raise SubmissionError(
            f"Cannot verify against {cache_path}: it was built with crop {crop_modes.describe(prov.crop)}, the model "
            f"uses {crop_modes.describe(model.crop)}. Pass a cache built with the model's crop settings."
        )
    nvdec_missing = unavailable() if built_with(prov)[0] == "nvdec" else None
    if model.kind == "finetuned" and nvdec_missing:  # its check decodes the sample again, as the cache was
        raise SubmissionError(
            f"Cannot verify against {cache_path}: it was decoded with NVDEC, and verifying a fine-tuned model "
            f"decodes videos again the same way, but NVDEC cannot be used here ({nvdec_missing}). Verify on a "
            "machine with NVDEC, or against a cache built with --decoder cpu."
        )
    if model.kind == "head-only" and model.encoder.weights_hash() != prov.weights_hash:
        raise SubmissionError(
            f"Cannot verify against {cache_path}: the submission encoder's weights hash "
            f"{model.encoder.weights_hash()[:12]} differs from the cache's {prov.weights_hash[:12]} (the head was "
            "tuned on another cache?). Pass the cache tune-head used."
        )
    return cache


def verify_cache_for(model: LoadedModel, caches: Sequence[str | Path]) -> Path:
    """The cache of ``caches`` (``--verify``, repeatable) that can verify ``model``, checked as `open_verify_cache`
    does; of several, the one a head-only model was tuned on (same provenance), or the one at a fine-tuned
    model's input size.

    Raises:
        SubmissionError: no cache fits; the message gives each cache's reason.
    """
    fits, problems = [], []
    for path in caches:
        try:
            prov = open_verify_cache(model, path).provenance
        except SubmissionError as exc:
            problems.append(str(exc))
            continue
        same = (prov.to_dict() == model.cache_provenance if model.kind == "head-only"
                else tuple(prov.input_size) == tuple(model.encoder.input_size))
        fits.append((not same, len(fits), Path(path)))
    if not fits:
        raise SubmissionError(problems[0] if len(problems) == 1 else
                              f"no --verify cache can verify {model.source}: " + " | ".join(problems))
    return min(fits)[2]


def _cached_views(cache: FeatureCache, key: str, k: int, variants: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cached features of every variant: float16 ``[V, k, d]`` and the mask ``[k]``."""
    feats, mask = [], None
    for v in variants:
        f, m = cache.features(key, k, v)
        feats.append(np.asarray(f))
        mask = np.asarray(m, dtype=bool) if mask is None else mask
    return np.stack(feats), mask


def _box_diff(cached: np.ndarray | None, full: np.ndarray | None) -> float:
    """Largest |difference| (px) between two sets of crop boxes; NaN (no face) must match NaN; inf if one is missing."""
    if cached is None or full is None:
        return float("inf")
    a, b = np.asarray(cached, dtype=np.float64), np.asarray(full, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    both = ~np.isnan(a)
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def verify_against_cache(
    model: LoadedModel,
    cache_path: str | Path,
    predictions: Sequence[VideoPrediction],
    *,
    items: Sequence[Any],
    sample: int | None = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    frame_batch: int = 64,
    precision: Precision = "auto",
    tolerance: float = VERIFY_TOLERANCE,
    reference: dict | None = None,
    decoded: tuple[str, str] = ("cpu", "cpu"),
) -> VerifyResult:
    """Compare the full path's predictions with the cache path on a sample of the test videos.

    Args:
        model: the submission model. cache_path: the feature cache. predictions: the full path's results.
        items: the predicted videos (to decode again for a fine-tuned model).
        sample: videos compared (None: every comparable one). seed: draws the sample.
        device, frame_batch, precision: how the cache's encoder runs (fine-tuned model only).
        tolerance: largest allowed |p_fake difference|.
        reference: a dict the caller keeps across members: the fine-tuned check's cache-encoder half, computed once
            per cache, frame count, variants and sample.
        decoded: ``(decoder, views_on)`` of the full path; when the cache was built otherwise, a line says so (the
            tolerance is the same: NVDEC's pixels and the tensor views are meant to be that close). The fine-tuned
            check decodes the sample again as the cache was built (its provenance), whatever this says.

    Videos where the full path failed or used a fallback (other frames or variants) are skipped with the reason.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device or "auto")
    cache = open_verify_cache(model, cache_path)
    prov = cache.provenance
    by_key = {p.key: p for p in predictions}
    item_by_key = {it.key: it for it in items}
    cached = set(cache.keys)
    variants = tuple(model.variants)
    skipped: dict[str, str] = {}
    k = model.frames
    candidates = []
    for key, pred in by_key.items():
        if key not in cached:
            skipped[key] = "not in the cache"
        elif pred.status == "failed" or pred.fallback != "none" or pred.frames_used != k:
            skipped[key] = f"full path used a fallback ({pred.fallback}, status {pred.status})"
        elif cache.status(key) == "failed":
            skipped[key] = "failed in the cache"
        else:
            candidates.append(key)
    keys = sample_keys(candidates, sample, seed=seed)
    lines = []
    box_diffs: list[float] = []
    if model.kind == "head-only":
        diffs = []
        for key in keys:
            feats, mask = _cached_views(cache, key, k, variants)
            p_var, _ = head_probabilities(model.head, feats, mask, device=dev, round_fp16=False,
                                          temperature=model.temperature)
            diffs.append(abs(float(np.mean(p_var)) - by_key[key].main_p))
            box_diffs.append(_box_diff(cache.boxes(key, k), by_key[key].boxes))
        max_diff = max(diffs, default=float("inf"))
        result = VerifyResult("cache-features", keys, max_diff, tolerance, skipped=skipped)
        lines.append(
            f"verify (same weights {prov.weights_hash[:12]}): p_fake from cached features vs full path on "
            f"{len(keys)} videos: max |diff| = {max_diff:.2e} (tolerance {tolerance:.0e})"
        )
        if decoder_provenance(*decoded) != prov.decoder:
            lines.append(f"verify: the full path decoded with {decoder_provenance(*decoded)}, the cache was built "
                         f"with {prov.decoder}")
    else:
        memo, memo_key = reference if reference is not None else {}, (str(cache_path), k, variants, tuple(keys))
        if memo_key not in memo:
            memo[memo_key] = _cache_encoder_check(cache, [item_by_key[key] for key in keys], k, variants, device=dev,
                                                  frame_batch=frame_batch, precision=precision)
        checked = memo[memo_key]
        feat_diffs, p_diffs = [], []
        for key in keys:
            if isinstance(checked[key], str):
                skipped[key] = checked[key]
                continue
            feat_diffs.append(checked[key][0])
            box_diffs.append(checked[key][1])
            full = by_key[key].features
            if full is None:
                skipped[key] = "full path kept no features for this video"
                continue
            # The cache-path logic: float16 storage round trip, the per-k mask, the mean over variants.
            p_var, _ = head_probabilities(model.head, full.astype(np.float16), by_key[key].valid, device=dev,
                                          round_fp16=False, temperature=model.temperature)
            p_diffs.append(abs(float(np.mean(p_var)) - by_key[key].main_p))
        max_diff = max(p_diffs, default=float("inf"))
        max_feat = max(feat_diffs, default=float("inf"))
        result = VerifyResult("finetuned", [key for key in keys if key not in skipped], max_diff, tolerance,
                              max_feature_diff=max_feat, skipped=skipped)
        lines.append(
            f"verify (fine-tuned backbone): cache encoder {prov.backbone} on the full path's frames vs cached "
            f"features: max relative |diff| = {max_feat:.2e} (tolerance {tolerance * 10:.0e}) -> decode/TTA/"
            "preprocess agree"
        )
        lines.append(
            f"verify: fine-tuned head on the full path's own features through the cache-path logic: max |p diff| "
            f"= {max_diff:.2e} (tolerance {tolerance:.0e})"
        )
    if prov.crop_mode != "none":
        max_box = max(box_diffs, default=float("inf"))
        result.max_box_diff = max_box
        lines.append(f"verify: face crop boxes of the main track, cache vs full path: max |diff| = {max_box:.2g} px "
                     f"over {len(box_diffs)} videos (the crops are cut from the same boxes)")
    if skipped:
        lines.append(f"verify: {len(skipped)} videos not compared: " + "; ".join(
            f"{key}: {why}" for key, why in list(skipped.items())[:5]))
    result.lines = lines
    return result


def _cache_encoder_check(cache: FeatureCache, items: Sequence[Any], k: int, variants: Sequence[str], *,
                         device: torch.device, frame_batch: int, precision: Precision
                         ) -> dict[str, tuple[float, float] | str]:
    """The cache's encoder, recreated, on the frames the full path decodes, against the cached features: per video
    (relative max |feature difference|, crop box difference), or why it was not compared."""
    prov = cache.provenance
    enc = recreate_encoder(prov, device=device)
    decoder, views_on = built_with(prov)  # the frames the cache saw, not those the submission was asked to decode
    ds = ClipDataset(items, size=tuple(prov.input_size), variants=variants, frames=k,
                     faces=face_cropper(prov.crop, device), decoder=decoder, views_on=views_on)
    out: dict[str, tuple[float, float] | str] = {}
    clips = iter_clips(ds, workers=0, device=device if views_on == "device" else None)
    for item, clip in zip(items, clips, strict=True):
        if clip.views is None:
            out[item.key] = f"decode failed now: {clip.message}"
            continue
        ours = encode_views(enc, clip.views, device=device, frame_batch=frame_batch, precision=precision).numpy()
        theirs, _ = _cached_views(cache, item.key, k, variants)
        scale = float(np.abs(theirs).max()) or 1.0
        out[item.key] = (float(np.abs(ours - theirs.astype(np.float32)).max()) / scale,
                         _box_diff(cache.boxes(item.key, k), None if clip.boxes is None else clip.boxes[0]))
    return out
