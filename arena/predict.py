"""Full-video inference: the model (fine-tuned or head-only), decode -> TTA -> backbone -> head per video.

The full-video path uses `arena.clips.ClipDataset` (decode + TTA views in isolated workers) and
`arena.clips.encode_views` (the backbone), the very functions that fill the feature cache, so the submission and
the cache see identical frames. The head is applied by `head_probabilities`, the one function used on the full
path's features and on cached features alike (see `arena.verify`); heads that read one encoder's features (an
ensemble's fold heads, `arena.ensemble`) share its backbone pass (`Predictor`).

Every video gets a prediction: an out-of-memory error walks a fallback chain (clear the cache and retry, then 16
frames, then one TTA variant, then p_fake = 0.5 with the error recorded); an undecodable video gets 0.5 and its
error. Nothing is dropped; the fallbacks are counted in the run summary.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from arena.cache.provenance import NO_CROP
from arena.calibration import temperature_of
from arena.clips import ClipDataset, ClipViews, encode_views, iter_clips
from arena.errors import ArenaError, ModelsError, OptionError, PredictError, WeightsUnavailable
from arena.faces import modes as crop_modes
from arena.faces.modes import face_cropper
from arena.hardware import empty_cuda_cache, is_oom
from arena.model import create_encoder
from arena.models_folder import (
    BEST_HEAD_FILE,
    FINETUNED_SUFFIX,
    DetectorCheckpoint,
    HeadCheckpoint,
    find_finetuned,
    resolve_frames,
)
from arena.runtime import Precision, autocast_dtype
from arena.tta import VARIANTS

log = logging.getLogger(__name__)

FALLBACK_FRAMES = 16
ModelKind = Literal["auto", "finetuned", "head-only"]
MODEL_KINDS = ("auto", "finetuned", "head-only")


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class LoadedModel:
    """An encoder + head ready for the full-video path.

    Attributes:
        kind: ``finetuned`` (train-full checkpoint: encoder and head trained together) or ``head-only`` (the
            cache's encoder recreated exactly + the tuned head).
        encoder: the frame encoder (eval mode, on its device).
        head: the detector head (eval mode, on its device).
        frames: frames per video for the full path.
        frames_source: where ``frames`` came from (option, frame_test.json, default).
        variants: TTA variants averaged (all five, or ``original`` alone).
        source: the checkpoint file.
        round_fp16: round features to float16 before the head. True for head-only models: the head was tuned on
            the cache's float16 features, so the full path feeds it the same quantisation the cache path does.
        cache_provenance: head-only: the provenance of the cache the head was tuned on (a dict).
        info: JSON-able description for outputs.
        crop: how frames are cut for this model (``{"mode": "none"}`` or the face-crop settings it was trained with,
            `arena.faces.modes`).
        max_faces: face tracks scored per video (face crops); the video's P(fake) is the maximum over them.
        temperature: the logits are divided by it before the softmax (`arena.calibration`); 1: uncalibrated.
    """

    kind: Literal["finetuned", "head-only"]
    encoder: torch.nn.Module
    head: torch.nn.Module
    frames: int
    frames_source: str
    variants: tuple[str, ...]
    source: Path
    round_fp16: bool
    cache_provenance: dict | None = None
    info: dict = field(default_factory=dict)
    crop: dict = field(default_factory=lambda: dict(NO_CROP))
    max_faces: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}.")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}.")
        if not self.variants:
            raise ValueError("at least one TTA variant is needed (e.g. 'original').")


def _prov_get(prov: Any, name: str) -> Any:
    return prov[name] if isinstance(prov, dict) else getattr(prov, name)


def recreate_encoder(prov: Any, *, device: torch.device | str = "cpu", encoders: dict | None = None
                     ) -> torch.nn.Module:
    """The encoder a cache's provenance (a dict or a ``Provenance``) describes: backbone, weights source and seed,
    input size; its weights hash is checked against the cache's.

    ``encoders`` (a dict the caller keeps) returns the encoder already recreated for the same provenance: heads
    tuned on one cache (the folds of a K-fold study) then share one encoder, in memory and in the backbone pass.

    Raises:
        PredictError: the weights cannot be had here, or the recreated weights differ from the cache's.
    """
    memo_key = tuple(str(_prov_get(prov, n)) for n in ("backbone", "weights_source", "weights_hash", "input_size"))
    if encoders is not None and memo_key in encoders:
        return encoders[memo_key]
    backbone = str(_prov_get(prov, "backbone"))
    source = str(_prov_get(prov, "weights_source"))
    size = tuple(int(s) for s in _prov_get(prov, "input_size"))
    want_hash = str(_prov_get(prov, "weights_hash"))
    if size[0] != size[1]:
        raise PredictError(f"the cache's input size {size} is not square; create_encoder only builds square inputs.")
    kwargs: dict[str, Any] = {"image_size": size[0]}
    if source.startswith("hub:"):
        kwargs["pretrained"] = True
    elif source.startswith("file:"):
        kwargs.update(pretrained=False, weights=source[len("file:"):])
    elif source.startswith("random:"):
        match = re.search(r"seed=(-?\d+)", source)
        if match is None:
            raise PredictError(f"cannot read the seed from the cache's weights source {source!r}.")
        kwargs.update(pretrained=False, seed=int(match.group(1)))
    else:
        raise PredictError(f"unknown weights source {source!r} in the cache provenance (want hub:, file: or random:).")
    try:
        encoder = create_encoder(backbone, **kwargs)
    except WeightsUnavailable as exc:
        raise PredictError(f"cannot recreate the cache's encoder {backbone} ({source}): {exc}") from exc
    got = encoder.weights_hash()
    if got != want_hash:
        raise PredictError(
            f"the recreated encoder {backbone} ({source}) has weights hash {got[:12]}, the cache was built with "
            f"{want_hash[:12]}: the head was tuned on other features. Use the same weights (or rebuild the cache and "
            "rerun tune-head)."
        )
    encoder = _prepare(encoder, device)
    if encoders is not None:
        encoders[memo_key] = encoder
    return encoder


def _prepare(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    module = module.to(device).eval()
    if hasattr(module, "to_channels_last"):
        module.to_channels_last()
    return module


def _load_finetuned(path: Path, device: torch.device | str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Encoder, head and info of train-full's checkpoint (`DetectorCheckpoint`)."""
    ckpt = DetectorCheckpoint.load(path)
    try:
        detector = ckpt.build()
    except ArenaError:
        raise
    except (RuntimeError, TypeError, ValueError) as exc:  # load_state_dict / DetectorHead(**config) mismatches
        raise ModelsError(f"{path}: the weights do not fit {ckpt.backbone} + head {ckpt.config['head']}: "
                          f"{(str(exc).splitlines() or [''])[0][:300]}; rerun {DetectorCheckpoint.RERUN}.") from exc
    info = {"kind": "finetuned", "checkpoint": str(path), "backbone": ckpt.backbone, "epoch": ckpt.epoch,
            "val_auc": ckpt.val_auc, "weights_hash": detector.encoder.weights_hash(), "head": ckpt.config["head"],
            "crop": ckpt.config.get("crop") or dict(NO_CROP), "calibration": ckpt.config.get("calibration") or {}}
    return _prepare(detector.encoder, device), detector.head.to(device).eval(), info


def load_model(
    models: str | Path,
    *,
    kind: ModelKind = "auto",
    frames: int | None = None,
    tta: bool = True,
    device: torch.device | str = "cpu",
    crop: str | None = None,
    max_faces: int | None = None,
    calibration: bool = True,
    encoders: dict | None = None,
) -> LoadedModel:
    """The submission model: the fine-tuned checkpoint when present, else the head-only model.

    Args:
        models: the models folder (``<backbone>_best.pt`` of train-full, ``best_head.pt`` of tune-head,
            ``frame_test.json``; `arena.models_folder` names and reads them), or one of those two checkpoint files
            (`checkpoint_kind`), its frame count read from its folder's ``frame_test.json``.
        kind: ``auto`` (fine-tuned if its checkpoint exists, else head-only), ``finetuned`` or ``head-only``.
        frames: frames per video; default from ``frame_test.json``, else 24 (`resolve_frames`).
        tta: average the five TTA variants (else the original frames only).
        device: where the model runs.
        crop: ``none`` or ``faces``: must be the crop mode the model was trained with (None: the model's).
        max_faces: face tracks scored per video (face-crop models); None: the model's setting, else 1.
        calibration: apply the checkpoint's temperature (T = 1 when it has none); False: T = 1 (``--no-calibration``).
        encoders: head-only: share recreated encoders between calls (`recreate_encoder`).

    Raises:
        ModelsError: no model, or a checkpoint that is unsafe, incomplete, of another kind or does not fit its
            configuration.
        PredictError: ``crop`` differs from the model's crop mode.
        PredictError: the head-only model's encoder cannot be recreated exactly.
    """
    if kind not in MODEL_KINDS:
        raise OptionError(f"Invalid model kind ({kind}). Supported values are {', '.join(MODEL_KINDS)}.")
    models = Path(models)
    k, k_source = resolve_frames(models.parent if models.is_file() else models, frames)
    variants = tuple(VARIANTS) if tta else tuple(VARIANTS[:1])
    ft_path, head_path = find_finetuned(models), models / BEST_HEAD_FILE
    if models.is_file():
        file_kind = checkpoint_kind(models)
        if kind not in ("auto", file_kind):
            raise ModelsError(f"{models} is a {file_kind} checkpoint, but --model {kind} was asked for.")
        kind, ft_path, head_path = file_kind, models, models
    if kind == "auto":
        if ft_path is not None:
            kind = "finetuned"
        elif head_path.is_file():
            kind = "head-only"
        else:
            raise ModelsError(
                f"no model in {models}: neither <backbone>_best.pt (arena train-full) nor {BEST_HEAD_FILE} "
                "(arena tune-head) exists. Run one of them first."
            )

    if kind == "finetuned":
        if ft_path is None:
            raise ModelsError(f"no <backbone>_best.pt in {models}; run `arena train-full` or use --model head-only.")
        encoder, head, info = _load_finetuned(ft_path, device)
        model_crop = dict(info.pop("crop"))
        _check_crop(ft_path, model_crop, crop)
        t = _temperature(info, calibration)
        return LoadedModel("finetuned", encoder, head, k, k_source, variants, ft_path, round_fp16=False, info=info,
                           crop=model_crop, max_faces=_max_faces(model_crop, max_faces), temperature=t)

    if not head_path.is_file():
        raise ModelsError(f"{head_path} does not exist; run `arena tune-head` first.")
    ckpt = HeadCheckpoint.load(head_path)  # weights_only=True, format and fit checked
    prov = ckpt.provenance
    if not prov:
        raise ModelsError(f"{head_path}: no cache provenance, so the encoder it needs is unknown; rerun "
                          f"{HeadCheckpoint.RERUN}.")
    model_crop = dict(prov.get("crop") or NO_CROP)
    _check_crop(head_path, model_crop, crop)
    encoder = recreate_encoder(prov, device=device, encoders=encoders)
    info = {"kind": "head-only", "checkpoint": str(head_path), "backbone": prov.get("backbone"),
            "weights_source": prov.get("weights_source"), "weights_hash": prov.get("weights_hash"),
            "head": ckpt.config, "crop": model_crop, "calibration": ckpt.calibration}
    t = _temperature(info, calibration)
    return LoadedModel("head-only", encoder, ckpt.build().to(device), k, k_source, variants, head_path,
                       round_fp16=True, cache_provenance=prov, info=info, crop=model_crop,
                       max_faces=_max_faces(model_crop, max_faces), temperature=t)


def checkpoint_kind(path: str | Path) -> Literal["finetuned", "head-only"]:
    """``head-only`` for tune-head's ``best_head.pt``, ``finetuned`` for train-full's ``<backbone>_best.pt``.

    Raises:
        ModelsError: the file is missing or is neither (``last.pt`` is train-full's resume state, not a model).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelsError(f"{path}: checkpoint not found.")
    if path.name == BEST_HEAD_FILE:
        return "head-only"
    if path.name.endswith(FINETUNED_SUFFIX):
        return "finetuned"
    raise ModelsError(f"{path}: not a model checkpoint; give tune-head's {BEST_HEAD_FILE} or train-full's "
                      f"<backbone>{FINETUNED_SUFFIX}.")


def _temperature(info: dict, calibration: bool) -> float:
    """The temperature to predict with (recorded in ``info``): the checkpoint's, or 1 without calibration."""
    info["temperature"] = temperature_of(info.get("calibration")) if calibration else 1.0
    return info["temperature"]


def _check_crop(path: Path, model_crop: dict, requested: str | None) -> None:
    """Refuse a ``--crop`` other than the one the model was trained with: its numbers would mean nothing."""
    mode = model_crop.get("mode", "none")
    if requested is not None and requested != mode:
        raise PredictError(
            f"{path} was trained on {crop_modes.describe(model_crop)}, but --crop {requested} was asked for: a model "
            f"only scores frames cut the way it was trained. Drop --crop (the model's mode is used) or train a "
            f"model with --crop {requested}.")


def _max_faces(model_crop: dict, requested: int | None) -> int:
    if model_crop.get("mode", "none") == "none":
        if requested not in (None, 1):
            raise OptionError(f"--max-faces {requested} needs a face-crop model (this one uses whole frames).")
        return 1
    return int(requested or model_crop.get("max_faces") or 1)


# ----------------------------------------------------------------------------------------------------------------
# One video


@torch.inference_mode()
def head_probabilities(
    head: torch.nn.Module,
    feats: np.ndarray | torch.Tensor,
    valid: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    round_fp16: bool = False,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """P(fake) and attention per TTA variant from per-frame features: the step shared by both paths.

    Args:
        head: a ``DetectorHead`` in eval mode.
        feats: ``[V, T, d]`` (float16 from the cache, float32 from the encoder).
        valid: bool ``[T]``, False for repeated frames (masked out of the attention).
        device: where the head runs.
        round_fp16: round to float16 first (what storing in the cache does).
        temperature: the logits are divided by it before the softmax (calibration, `arena.calibration`).

    Returns:
        (p_fake float64 ``[V]``, attention float32 ``[V, T]``). The head runs in float32 without autocast so both
        paths give the same numbers for the same features.
    """
    x = torch.as_tensor(np.asarray(feats)) if isinstance(feats, np.ndarray) else feats.detach().cpu()
    if x.ndim != 3:
        raise ValueError(f"features must be [V, T, d], got shape {tuple(x.shape)}")
    if round_fp16:
        x = x.to(torch.float16)
    x = x.to(torch.float32).to(device)
    m = torch.as_tensor(np.asarray(valid, dtype=bool)).to(device)
    if m.shape != x.shape[1:2]:
        raise ValueError(f"valid mask {tuple(m.shape)} does not match {x.shape[1]} frames")
    mask = m.unsqueeze(0).expand(x.shape[0], -1)
    logits, attn = head(x, mask)
    p = torch.softmax(logits.float() / float(temperature), dim=-1)[:, 1]
    return p.double().cpu().numpy(), attn.float().cpu().numpy()


@dataclass
class VideoPrediction:
    """The full path's result for one video (one row of the submission and of ``predictions_detail.csv``).

    Attributes:
        key: the video's key. label: 0/1 when known (evaluation), else None.
        p_fake: mean over TTA variants of P(fake) (calibrated with the model's temperature); 0.5 when the video
            could not be predicted.
        variant_p: P(fake) per TTA variant used (calibrated).
        p_uncalibrated: ``p_fake`` at temperature 1 (equal to it for an uncalibrated model).
        frames_requested / frames_used: k asked / rows the head saw (16 after the frame fallback).
        distinct_frames: rows that are distinct decoded frames (the attention mask's True count).
        num_source_frames: frames the video yields.
        frame_indices / valid: the rows' source indices and mask.
        attention: per-frame attention weights of the first variant (``original``).
        fallback: ``none``, ``retry``, ``16 frames``, ``one variant``, ``0.5 (out of memory)``,
            ``0.5 (decode failed)``, ``0.5 (missing file)`` or ``0.5 (error)``.
        status: ``ok``, ``partial`` (fewer distinct frames than asked) or ``failed``.
        error: decode/OOM/other error text, empty when none.
        features: float32 ``[V, T, d]`` when asked to keep them (verification).
        track_p: face crops: P(fake) of each face track (main first); ``p_fake`` is their maximum.
        faces_found: face crops: False when no face was found (the whole frame, letterboxed); None without crops.
        boxes: face crops: float32 ``[T, 4]`` crop boxes of the main face track (source pixels; NaN: no face).
    """

    key: str
    p_fake: float
    variant_p: dict[str, float] = field(default_factory=dict)
    label: int | None = None
    frames_requested: int = 0
    frames_used: int = 0
    distinct_frames: int = 0
    num_source_frames: int = 0
    frame_indices: np.ndarray | None = None
    valid: np.ndarray | None = None
    attention: np.ndarray | None = None
    fallback: str = "none"
    status: str = "ok"
    error: str = ""
    features: np.ndarray | None = None
    track_p: list[float] = field(default_factory=list)
    faces_found: bool | None = None
    boxes: np.ndarray | None = None
    p_uncalibrated: float | None = None

    @property
    def main_p(self) -> float:
        """P(fake) of the main face track (of the whole frames without face crops): what the cache path computes."""
        return self.track_p[0] if self.track_p else self.p_fake

    def __post_init__(self) -> None:
        if not (0.0 <= self.p_fake <= 1.0):
            raise ValueError(f"p_fake must be in [0, 1], got {self.p_fake} for {self.key}")
        if self.p_uncalibrated is None:
            self.p_uncalibrated = self.p_fake

    def __repr__(self) -> str:
        return (f"VideoPrediction(key={self.key!r}, p_fake={self.p_fake:.4f}, frames={self.frames_used}, "
                f"fallback={self.fallback!r}, status={self.status!r})")


def failed_prediction(key: str, *, label: int | None, frames: int, fallback: str, error: str) -> VideoPrediction:
    """The 0.5 row for a video that could not be predicted."""
    return VideoPrediction(key=key, p_fake=0.5, label=label, frames_requested=frames, fallback=fallback,
                           status="failed", error=error)


@dataclass
class PredictRun:
    """Predictions in input order plus what the run did."""

    predictions: list[VideoPrediction]
    seconds: float
    frames_encoded: int

    @property
    def fallbacks(self) -> Counter:
        """How many videos ended at each fallback step (``none`` left out)."""
        return Counter(p.fallback for p in self.predictions if p.fallback != "none")

    def summary_lines(self) -> list[str]:
        """Throughput and the fallbacks, with the first 20 videos that needed one and why."""
        n = len(self.predictions)
        rate = n / self.seconds if self.seconds > 0 else 0.0
        fb = self.fallbacks
        lines = [f"predicted {n} videos in {self.seconds:.1f} s ({rate:.2f} videos/s, "
                 f"{self.frames_encoded / max(self.seconds, 1e-9):.1f} frames/s); "
                 f"{sum(fb.values())} needed a fallback" + (f": {dict(fb)}" if fb else "")]
        lines += [f"  {p.key}: {p.fallback}: {p.error}" for p in self.predictions if p.fallback != "none"][:20]
        return lines


class Predictor:
    """Runs one backbone pass and the head of every model on one decoded clip, walking the OOM fallback chain.

    The models share the encoder (one set of weights: heads tuned on one cache), the frames, the TTA variants and
    the crop, so a clip costs one backbone pass however many heads read its features.
    """

    def __init__(self, models: Sequence[LoadedModel], *, device: torch.device, frame_batch: int, precision: Precision,
                 keep_features: Sequence[bool], decoder: str = "cpu", views_on: str = "cpu") -> None:
        # Options no video could run with are the user's fault, not one video's failure: refused here.
        if frame_batch < 1:
            raise OptionError(f"--frame-batch must be >= 1, got {frame_batch}.")
        autocast_dtype(device, precision)
        self.models, self.device, self.frame_batch, self.precision = list(models), device, frame_batch, precision
        self.model = self.models[0]
        self.keep_features = list(keep_features)
        self.frames_encoded, self.decoding = 0, {"decoder": decoder, "views_on": views_on}  # decoding: as the run's
        self.faces = face_cropper(self.model.crop, device, max_faces=self.model.max_faces)  # 16-frame fallback

    def _compute(self, views: torch.Tensor, valid: np.ndarray) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray]:
        """Per model: P(fake) per variant at its temperature and at 1, and attention; and the shared features."""
        feats = encode_views(self.model.encoder, views, device=self.device, frame_batch=self.frame_batch,
                             precision=self.precision)
        self.frames_encoded += int(views.shape[0] * views.shape[1])
        out = []
        for m in self.models:
            p, attn = head_probabilities(m.head, feats, valid, device=self.device, round_fp16=m.round_fp16,
                                         temperature=m.temperature)
            p1 = p if m.temperature == 1.0 else head_probabilities(
                m.head, feats, valid, device=self.device, round_fp16=m.round_fp16)[0]
            out.append((p, p1, attn))
        return out, feats.numpy()

    def _decode(self, item: Any, frames: int, variants: Sequence[str]) -> ClipViews:
        ds = ClipDataset([item], size=self.model.encoder.input_size, variants=variants, frames=frames,
                         faces=self.faces, **self.decoding)
        return next(iter_clips(ds, workers=0, device=self.device if ds.views_on == "device" else None))

    def __call__(self, clip: ClipViews, item: Any) -> list[VideoPrediction]:
        k = self.model.frames
        variants = self.model.variants

        def failed(fallback: str, error: str) -> list[VideoPrediction]:
            return [failed_prediction(clip.key, label=clip.label, frames=k, fallback=fallback, error=error)
                    for _ in self.models]

        if clip.views is None:
            return failed("0.5 (decode failed)", clip.message)
        # (name, how to get the clip, which variants): each step runs only after the previous ran out of memory.
        steps: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = [
            ("none", lambda: clip, variants),
            ("retry", lambda: clip, variants),
        ]
        if k > FALLBACK_FRAMES:
            steps.append(("16 frames", lambda: self._decode(item, FALLBACK_FRAMES, variants), variants))
        steps.append(("one variant", None, variants[:1]))
        errors: list[str] = []
        current = clip
        for name, get_clip, step_variants in steps:
            try:
                if get_clip is not None:
                    fresh = get_clip()
                    if fresh.views is None:
                        errors.append(f"{name}: decode failed ({fresh.message})")
                        continue
                    current = fresh
                views = current.views[: len(step_variants)]
                heads, feats = self._compute(views, current.valid)
                # Other face tracks (--max-faces): each scored alike; the video is as fake as its most fake face.
                others = [self._compute(t[: len(step_variants)], current.valid)[0] for t in current.track_views]
            except Exception as exc:  # noqa: BLE001 - one bad video must not end the run; recorded below
                text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                if not is_oom(exc):
                    log.warning("%s: %s; p_fake = 0.5", clip.key, text)
                    return failed("0.5 (error)", "; ".join([*errors, text]))
                errors.append(f"{name}: {text}")
                del exc  # drop the traceback's references to the failed step's tensors before emptying the cache
                empty_cuda_cache()
                log.warning("%s: out of memory (step %s); cache cleared, trying the next fallback.", clip.key, name)
                continue
            valid = np.asarray(current.valid, dtype=bool)
            preds = []
            for j, (p, p1, attn) in enumerate(heads):
                track_p = [float(np.mean(p))] + [float(np.mean(o[j][0])) for o in others]
                track_p1 = [float(np.mean(p1))] + [float(np.mean(o[j][1])) for o in others]
                preds.append(VideoPrediction(
                    key=clip.key, label=clip.label,
                    p_fake=float(np.clip(max(track_p), 0.0, 1.0)),
                    p_uncalibrated=float(np.clip(max(track_p1), 0.0, 1.0)),
                    variant_p={v: float(x) for v, x in zip(step_variants, p, strict=True)},
                    frames_requested=k, frames_used=int(views.shape[1]), distinct_frames=int(valid.sum()),
                    num_source_frames=int(current.num_source_frames),
                    frame_indices=np.asarray(current.frame_indices), valid=valid, attention=attn[0],
                    fallback=name, status=current.status,
                    error="; ".join([*errors, *([current.message] if current.message else [])]),
                    features=feats if self.keep_features[j] else None,
                    track_p=track_p if current.faces_found is not None else [],
                    faces_found=current.faces_found, boxes=None if current.boxes is None else current.boxes[0],
                ))
            return preds
        return failed("0.5 (out of memory)", "; ".join(errors))


def predict_items(
    items: Sequence,
    model: LoadedModel,
    *,
    device: torch.device | str = "cpu",
    workers: int = 2,
    frame_batch: int = 64,
    precision: Precision = "auto",
    keep_features: bool = False,
    progress: bool = True,
    desc: str = "predict",
    decoder: str = "cpu",
    views_on: str = "cpu",
) -> PredictRun:
    """Predict every item (``key``, ``path``, ``label``) in order; decoding runs ``workers`` videos ahead.

    Args:
        items: the videos (``arena.data.VideoItem``). model: from `load_model`.
        device: where the model runs (the model's device).
        workers: decoding processes running ahead of the model (0: decode in this process).
        frame_batch: frames per backbone forward pass (all views of a video are flattened into these).
        precision: autocast policy of `arena.runtime` (``auto``, ``fp32``, ``bf16``, ``fp16``).
        keep_features: keep each video's float32 features (verification of a fine-tuned model).
        progress: show a progress bar. desc: its label. decoder, views_on: as `decoded_clips`.

    Never drops an item: failures come back as 0.5 rows with their error.
    """
    dev, items = torch.device(device) if isinstance(device, str) else device, list(items)
    predictor = Predictor([model], device=dev, frame_batch=frame_batch, precision=precision,
                          keep_features=[keep_features], decoder=decoder, views_on=views_on)
    preds: list[VideoPrediction] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit="video", dynamic_ncols=True, disable=not progress)
    for item, clip in decoded_clips(items, model, device=dev, workers=workers, decoder=decoder, views_on=views_on):
        preds.append(predictor(clip, item)[0])
        bar.update(1)
        bar.set_postfix(fallbacks=sum(p.fallback != "none" for p in preds))
    bar.close()
    return PredictRun(preds, time.perf_counter() - t0, predictor.frames_encoded)


def decoded_clips(items: Sequence, model: LoadedModel, *, device: torch.device, workers: int, decoder: str = "cpu",
                  views_on: str = "cpu") -> Iterator[tuple[Any, ClipViews]]:
    """``(item, clip)`` in item order, decoded as ``model`` sees them (its frames, views, size and crop) by
    ``workers`` processes running ahead, with ``decoder``; ``views_on="device"``: the views made on ``device``."""
    if workers < 0:
        raise OptionError(f"--workers must be >= 0, got {workers}.")
    ds = ClipDataset(list(items), size=model.encoder.input_size, variants=model.variants, frames=model.frames,
                     faces=face_cropper(model.crop, device, max_faces=model.max_faces), decoder=decoder,
                     views_on=views_on)
    clips = iter_clips(ds, workers=workers, device=device if views_on == "device" else None)
    for item, clip in zip(ds.items, clips, strict=True):
        if clip.key != item.key:  # the loader is ordered; anything else is a bug worth stopping for
            raise PredictError(f"decoder returned {clip.key} where {item.key} was expected")
        yield item, clip
