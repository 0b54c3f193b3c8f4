"""Full-video inference: model loading, decode -> TTA -> backbone -> head per video, evaluation and attention report.

The full-video path uses ``arena.features.ClipDataset`` (decode + TTA views in DataLoader workers) and
``arena.features.encode_views`` (the backbone), the very functions that fill the feature cache, so the
submission and the cache see identical frames. The head is applied by ``head_probabilities``, the one function
used on the full path's features and on cached features alike (see ``arena.submit.verify_against_cache``).

Every video gets a prediction: an out-of-memory error walks a fallback chain (clear the cache and retry, then 16
frames, then one TTA variant, then p_fake = 0.5 with the error recorded); an undecodable video gets 0.5 and its
error. Nothing is dropped; the fallbacks are counted in the run summary.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 24
FALLBACK_FRAMES = 16
FINETUNED_CHECKPOINT = "inception_resnet_v2_best.pt"
HEAD_CHECKPOINT = "best_head.pt"
FRAME_TEST_FILE = "frame_test.json"
ModelKind = Literal["auto", "finetuned", "head-only"]
MODEL_KINDS = ("auto", "finetuned", "head-only")


class PredictError(RuntimeError):
    """The model cannot be loaded or the inputs cannot be predicted; the message says what to do."""


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

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}.")
        if not self.variants:
            raise ValueError("at least one TTA variant is needed (e.g. 'original').")


def resolve_frames(models: str | Path, frames: int | None = None) -> tuple[int, str]:
    """Frames per video: the option when given, else ``frame_test.json``'s recommendation, else 24."""
    if frames is not None:
        if int(frames) < 1:
            raise PredictError(f"--frames must be >= 1, got {frames}; the usual choices are 24, 32 or 48.")
        return int(frames), "--frames option"
    path = Path(models) / FRAME_TEST_FILE
    if path.is_file():
        try:
            k = int(json.loads(path.read_text(encoding="utf-8"))["recommended_frames"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PredictError(
                f"{path}: cannot read recommended_frames ({type(exc).__name__}: {exc}); rerun `arena frame-test` "
                "or pass --frames K."
            ) from exc
        if k < 1:
            raise PredictError(f"{path}: recommended_frames is {k}; rerun `arena frame-test` or pass --frames K.")
        return k, str(path)
    return DEFAULT_FRAMES, f"default ({DEFAULT_FRAMES}; no {FRAME_TEST_FILE})"


def _prov_get(prov: Any, name: str) -> Any:
    return prov[name] if isinstance(prov, dict) else getattr(prov, name)


def recreate_encoder(prov: Any, *, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The encoder a cache's provenance describes (backbone, weights source, seed, input size), hash checked.

    Raises:
        PredictError: the weights cannot be had here, or the recreated weights differ from the cache's.
    """
    from arena.model import WeightsUnavailable, create_encoder

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
    return _prepare(encoder, device)


def _prepare(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    module = module.to(device).eval()
    if hasattr(module, "to_channels_last"):
        module.to_channels_last()
    return module


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; all mean "unusable file"
        raise PredictError(
            f"{path}: cannot be loaded with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "A checkpoint that needs arbitrary pickle code is refused; rerun the stage that writes it."
        ) from exc
    if not isinstance(ckpt, dict):
        raise PredictError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}.")
    return ckpt


def _first(d: dict, names: Sequence[str], path: Path) -> Any:
    for n in names:
        if n in d:
            return d[n]
    raise PredictError(f"{path}: missing {' / '.join(names)} (keys found: {', '.join(sorted(d))}).")


def finetuned_checkpoint(models: str | Path) -> Path:
    """train-full's best checkpoint in ``models``: ``inception_resnet_v2_best.pt``, else the one ``*_best.pt``
    (train-full names it after the backbone), else the newest of several; the default name when there is none."""
    models = Path(models)
    default = models / FINETUNED_CHECKPOINT
    if default.is_file():
        return default
    found = sorted(models.glob("*_best.pt"), key=lambda p: (p.stat().st_mtime, p.name))
    if len(found) > 1:
        log.warning("several fine-tuned checkpoints in %s (%s); using the newest, %s", models,
                    ", ".join(p.name for p in found), found[-1].name)
    return found[-1] if found else default


def load_model(
    models: str | Path,
    *,
    kind: ModelKind = "auto",
    frames: int | None = None,
    tta: bool = True,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The submission model: the fine-tuned checkpoint when present, else the head-only model.

    Args:
        models: the models folder (``<backbone>_best.pt`` of train-full, ``best_head.pt`` of tune-head,
            ``frame_test.json``).
        kind: ``auto`` (fine-tuned if its checkpoint exists, else head-only), ``finetuned`` or ``head-only``.
        frames: frames per video; default from ``frame_test.json``, else 24.
        tta: average the five TTA variants (else the original frames only).
        device: where the model runs.
    """
    from arena.model import Detector, DetectorHead, create_encoder
    from arena.tta import VARIANTS

    if kind not in MODEL_KINDS:
        raise PredictError(f"Invalid model kind ({kind}). Supported values are {', '.join(MODEL_KINDS)}.")
    models = Path(models)
    k, k_source = resolve_frames(models, frames)
    variants = tuple(VARIANTS) if tta else tuple(VARIANTS[:1])
    ft_path, head_path = finetuned_checkpoint(models), models / HEAD_CHECKPOINT
    if kind == "auto":
        if ft_path.is_file():
            kind = "finetuned"
        elif head_path.is_file():
            kind = "head-only"
        else:
            raise PredictError(
                f"no model in {models}: neither {FINETUNED_CHECKPOINT} / *_best.pt (arena train-full) nor "
                f"{HEAD_CHECKPOINT} (arena tune-head) exists. Run one of them first."
            )

    if kind == "finetuned":
        if not ft_path.is_file():
            raise PredictError(f"{ft_path} does not exist; run `arena train-full` or use --model head-only.")
        ckpt = _load_checkpoint(ft_path)
        cfg = _first(ckpt, ("config",), ft_path)
        state = _first(ckpt, ("model_state_dict",), ft_path)
        backbone = cfg.get("backbone") or cfg.get("backbone_name") or cfg.get("model")
        if not backbone:
            raise PredictError(f"{ft_path}: config names no backbone (keys: {', '.join(sorted(cfg))}).")
        head_cfg = cfg.get("head") or cfg.get("head_config")
        if not isinstance(head_cfg, dict):
            raise PredictError(f"{ft_path}: config has no head configuration (keys: {', '.join(sorted(cfg))}).")
        # Random init is enough: every weight comes from the checkpoint right after.
        encoder = create_encoder(backbone, pretrained=False, image_size=cfg.get("image_size"),
                                 seed=int(cfg.get("seed", 0)))
        head = DetectorHead(**head_cfg)
        detector = Detector(encoder, head)
        try:
            detector.load_state_dict(state)
        except RuntimeError as exc:
            raise PredictError(f"{ft_path}: weights do not fit {backbone} + head {head_cfg}: "
                               f"{str(exc).splitlines()[0][:300]}") from exc
        info = {"kind": "finetuned", "checkpoint": str(ft_path), "backbone": backbone, "epoch": ckpt.get("epoch"),
                "val_auc": ckpt.get("val_auc"), "weights_hash": encoder.weights_hash(), "head": head_cfg}
        return LoadedModel("finetuned", _prepare(encoder, device), head.to(device).eval(), k, k_source, variants,
                           ft_path, round_fp16=False, info=info)

    if not head_path.is_file():
        raise PredictError(f"{head_path} does not exist; run `arena tune-head` first.")
    from arena.tune import load_head

    try:
        head, ckpt = load_head(head_path)  # tune-head's own loader: weights_only=True, format checked
    except ValueError as exc:
        raise PredictError(str(exc)) from exc
    head_cfg = head.config()
    prov = _first(ckpt, ("provenance",), head_path)
    if not isinstance(prov, dict):
        raise PredictError(f"{head_path}: the cache provenance must be a dict, got {type(prov).__name__}.")
    encoder = recreate_encoder(prov, device=device)
    info = {"kind": "head-only", "checkpoint": str(head_path), "backbone": prov.get("backbone"),
            "weights_source": prov.get("weights_source"), "weights_hash": prov.get("weights_hash"), "head": head_cfg}
    return LoadedModel("head-only", encoder, head.to(device).eval(), k, k_source, variants, head_path,
                       round_fp16=True, cache_provenance=prov, info=info)


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
) -> tuple[np.ndarray, np.ndarray]:
    """P(fake) and attention per TTA variant from per-frame features: the step shared by both paths.

    Args:
        head: a ``DetectorHead`` in eval mode.
        feats: ``[V, T, d]`` (float16 from the cache, float32 from the encoder).
        valid: bool ``[T]``, False for repeated frames (masked out of the attention).
        device: where the head runs.
        round_fp16: round to float16 first (what storing in the cache does).

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
    p = torch.softmax(logits.float(), dim=-1)[:, 1]
    return p.double().cpu().numpy(), attn.float().cpu().numpy()


@dataclass
class VideoPrediction:
    """The full path's result for one video (one row of the submission and of ``predictions_detail.csv``).

    Attributes:
        key: the video's key. label: 0/1 when known (evaluation), else None.
        p_fake: mean over TTA variants of P(fake); 0.5 when the video could not be predicted.
        variant_p: P(fake) per TTA variant used.
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

    def __post_init__(self) -> None:
        if not (0.0 <= self.p_fake <= 1.0):
            raise ValueError(f"p_fake must be in [0, 1], got {self.p_fake} for {self.key}")

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
        return Counter(p.fallback for p in self.predictions if p.fallback != "none")

    def summary_lines(self) -> list[str]:
        n = len(self.predictions)
        rate = n / self.seconds if self.seconds > 0 else 0.0
        fb = self.fallbacks
        lines = [f"predicted {n} videos in {self.seconds:.1f} s ({rate:.2f} videos/s, "
                 f"{self.frames_encoded / max(self.seconds, 1e-9):.1f} frames/s); "
                 f"{sum(fb.values())} needed a fallback" + (f": {dict(fb)}" if fb else "")]
        lines += [f"  {p.key}: {p.fallback}: {p.error}" for p in self.predictions if p.fallback != "none"][:20]
        return lines


class _Predictor:
    """Runs backbone + head on one decoded clip, walking the OOM fallback chain."""

    def __init__(self, model: LoadedModel, *, device: torch.device, batch_size: int, amp: bool,
                 keep_features: bool) -> None:
        self.model, self.device, self.batch_size, self.amp = model, device, batch_size, amp
        self.keep_features = keep_features
        self.frames_encoded = 0

    def _compute(self, views: torch.Tensor, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from arena.features import encode_views

        feats = encode_views(self.model.encoder, views, device=self.device, batch_size=self.batch_size, amp=self.amp)
        p, attn = head_probabilities(self.model.head, feats, valid, device=self.device,
                                     round_fp16=self.model.round_fp16)
        self.frames_encoded += int(views.shape[0] * views.shape[1])
        return p, attn, feats.numpy()

    def _decode(self, item, frames: int, variants: Sequence[str]):
        from arena.features import ClipDataset

        return ClipDataset([item], size=self.model.encoder.input_size, variants=variants, frames=frames)[0]

    def __call__(self, clip, item) -> VideoPrediction:
        from arena.hardware import empty_cuda_cache, is_oom

        k = self.model.frames
        variants = self.model.variants
        if clip.views is None:
            return failed_prediction(clip.key, label=clip.label, frames=k, fallback="0.5 (decode failed)",
                                     error=clip.message)
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
                p, attn, feats = self._compute(views, current.valid)
            except Exception as exc:  # noqa: BLE001 - one bad video must not end the run; recorded below
                text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                if not is_oom(exc):
                    log.warning("%s: %s; p_fake = 0.5", clip.key, text)
                    return failed_prediction(clip.key, label=clip.label, frames=k, fallback="0.5 (error)",
                                             error="; ".join([*errors, text]))
                errors.append(f"{name}: {text}")
                del exc  # drop the traceback's references to the failed step's tensors before emptying the cache
                empty_cuda_cache()
                log.warning("%s: out of memory (step %s); cache cleared, trying the next fallback.", clip.key, name)
                continue
            valid = np.asarray(current.valid, dtype=bool)
            return VideoPrediction(
                key=clip.key,
                p_fake=float(np.clip(np.mean(p), 0.0, 1.0)),
                variant_p={v: float(x) for v, x in zip(step_variants, p, strict=True)},
                label=clip.label,
                frames_requested=k,
                frames_used=int(views.shape[1]),
                distinct_frames=int(valid.sum()),
                num_source_frames=int(current.num_source_frames),
                frame_indices=np.asarray(current.frame_indices),
                valid=valid,
                attention=attn[0],
                fallback=name,
                status=current.status,
                error="; ".join([*errors, *([current.message] if current.message else [])]),
                features=feats if self.keep_features else None,
            )
        return failed_prediction(clip.key, label=clip.label, frames=k, fallback="0.5 (out of memory)",
                                 error="; ".join(errors))


def predict_items(
    items: Sequence,
    model: LoadedModel,
    *,
    device: torch.device | str = "cpu",
    workers: int = 2,
    batch_size: int = 64,
    amp: bool = True,
    keep_features: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> PredictRun:
    """Predict every item (``key``, ``path``, ``label``) in order; decoding runs ``workers`` videos ahead.

    Never drops an item: failures come back as 0.5 rows with their error.
    """
    from tqdm import tqdm

    from arena.features import ClipDataset, iter_clips

    if workers < 0:
        raise PredictError(f"workers must be >= 0, got {workers}.")
    dev = torch.device(device) if isinstance(device, str) else device
    items = list(items)
    ds = ClipDataset(items, size=model.encoder.input_size, variants=model.variants, frames=model.frames)
    predictor = _Predictor(model, device=dev, batch_size=batch_size, amp=amp, keep_features=keep_features)
    preds: list[VideoPrediction] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit="video", dynamic_ncols=True, disable=not progress)
    for item, clip in zip(items, iter_clips(ds, workers=workers), strict=True):
        if clip.key != item.key:  # the loader is ordered; anything else is a bug worth stopping for
            raise PredictError(f"decoder returned {clip.key} where {item.key} was expected")
        preds.append(predictor(clip, item))
        bar.update(1)
        bar.set_postfix(fallbacks=sum(p.fallback != "none" for p in preds))
    bar.close()
    return PredictRun(preds, time.perf_counter() - t0, predictor.frames_encoded)


# ----------------------------------------------------------------------------------------------------------------
# Test order and labelled folders


@dataclass(frozen=True)
class SubmissionRow:
    """One row of ``test_public.csv``: the name as written there and the video's key (None when missing)."""

    filename: str
    key: str | None
    problem: str = ""


def _name_to_key(name: str, known: set[str]) -> str | None:
    """The data layer's resolution of a CSV name to a key under ``test/`` (bare or relative, extension optional)."""
    from arena.data import VIDEO_EXTENSIONS

    norm = name.strip().replace("\\", "/")
    if not norm:
        return None
    norm = str(PurePosixPath(norm))
    candidates = [norm] if "/" in norm else [f"test/{norm}"]
    if not PurePosixPath(norm).suffix:
        candidates += [c + ext for c in candidates for ext in VIDEO_EXTENSIONS]
    return next((c for c in candidates if c in known), None)


def submission_rows(dataset) -> list[SubmissionRow]:
    """Rows of the submission: ``test_public.csv``'s names in its order (first occurrence of each), mapped to keys.

    Names whose video the data layer skipped (missing, empty, refused) keep their row with ``key=None`` and the
    reason, so the submission never drops a row. Without ``test_public.csv``: every test video, by key.
    """
    return [SubmissionRow(v.name, v.key, v.problem) for v in dataset.test_listing]


def labelled_items(dataset, labels_csv: str | Path) -> list:
    """Test items with labels from a CSV such as the demo's ``test_labels.csv`` (evaluation only)."""
    import dataclasses

    from arena.data import DataError, parse_label, read_csv_rows

    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise DataError(f"{labels_csv}: labels file not found (the demo writes test_labels.csv beside test/).")
    by_key = {it.key: it for it in dataset.test}
    out, problems = [], []
    for line_no, name, raw in read_csv_rows(labels_csv, need_label=True):
        label = parse_label(raw)
        key = _name_to_key(name, set(by_key))
        if label is None:
            problems.append(f"row {line_no}: label {raw!r} is not 0/1/REAL/FAKE")
        elif key is None:
            problems.append(f"row {line_no}: {name!r} is not a usable test video")
        else:
            out.append(dataclasses.replace(by_key[key], label=label))
    if problems:
        log.warning("%s: %d rows skipped: %s", labels_csv, len(problems), "; ".join(problems[:5]))
    if not out:
        raise DataError(f"{labels_csv}: no labelled test video found ({'; '.join(problems[:3])}).")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and attention report


def evaluation_metrics(predictions: Sequence[VideoPrediction]) -> dict[str, Any]:
    """Video-level metrics with TTA (mean over variants) and without (``original`` only), from one pass."""
    from arena.metrics import summary

    y = np.array([p.label for p in predictions], dtype=np.int64)
    p_tta = np.array([p.p_fake for p in predictions])
    p_orig = np.array([p.variant_p.get("original", p.p_fake) for p in predictions])
    out: dict[str, Any] = {"tta": summary(y, p_tta), "no_tta": summary(y, p_orig)}
    gain = {}
    for name in ("auc", "log_loss", "accuracy", "f1"):
        a, b = out["tta"][name], out["no_tta"][name]
        gain[name] = None if a is None or b is None else a - b
    out["tta_minus_no_tta"] = gain
    return out


def attention_strip(frames: torch.Tensor, weights: np.ndarray, valid: np.ndarray, indices: np.ndarray,
                    out: str | Path, *, title: str) -> Path:
    """PNG of the sampled frames side by side with each frame's attention weight under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = frames.shape[0]
    cols = min(t, 12)
    rows = (t + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.75 * rows + 0.4), squeeze=False)
    top = float(np.max(weights)) if len(weights) else 0.0
    for i, ax in enumerate(axes.flat):
        if i >= t:
            ax.axis("off")
            continue
        ax.imshow(frames[i].permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        w = float(weights[i])
        # xlabel (not a title below the image) so tight_layout makes room for it
        ax.set_xlabel(f"frame {int(indices[i])}\nw = {w:.3f}" + ("" if valid[i] else " (repeat)"), fontsize=7,
                      color="crimson" if w == top else "black")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def attention_report(
    predictions: Sequence[VideoPrediction], items: Sequence, model: LoadedModel, out_dir: str | Path
) -> list[dict[str, Any]]:
    """Per-frame attention (``original`` variant) and a PNG strip per video; the frames are decoded again with
    the same decoder and indices as the prediction."""
    from arena.features import ClipDataset

    out_dir = Path(out_dir)
    item_by_key = {it.key: it for it in items}
    report = []
    for pred in predictions:
        entry: dict[str, Any] = {"key": pred.key, "label": pred.label, "p_fake": pred.p_fake}
        if pred.attention is None:
            entry["error"] = pred.error or "no prediction"
            report.append(entry)
            continue
        k = pred.frames_used
        clip = ClipDataset([item_by_key[pred.key]], size=model.encoder.input_size, variants=model.variants[:1],
                           frames=k)[0]
        entry.update(frame_indices=[int(i) for i in pred.frame_indices],
                     attention=[round(float(w), 6) for w in pred.attention], valid=[bool(v) for v in pred.valid])
        if clip.views is not None:
            png = attention_strip(clip.views[0], pred.attention, pred.valid, pred.frame_indices,
                                  out_dir / f"{_safe_name(pred.key)}.png",
                                  title=f"{pred.key}  p_fake={pred.p_fake:.3f}  label={pred.label}")
            entry["png"] = str(png)
        report.append(entry)
    return report


def evaluate(
    *,
    data: str | Path,
    models: str | Path,
    split: Literal["val"] | None = "val",
    labels: str | Path | None = None,
    out: str | Path | None = None,
    attention: Sequence[str] = (),
    attention_first: int = 0,
    kind: ModelKind = "auto",
    frames: int | None = None,
    device: str = "auto",
    workers: int = 2,
    batch_size: int = 64,
    amp: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics with and without TTA on the validation split or a labelled folder; writes ``evaluation.json``.

    Args:
        data: the data folder.
        models: the models folder (model, split file).
        split: ``val``: the persisted validation split (ignored when ``labels`` is given).
        labels: a CSV of test labels (e.g. the demo's ``test_labels.csv``): evaluate on the test videos instead.
        out: the JSON file (default ``<models>/evaluation.json``); attention PNGs go to ``<out folder>/attention``.
        attention: keys to report attention for; ``attention_first`` adds the first N evaluated videos.
    """
    from arena.data import load_dataset, load_split
    from arena.runtime import resolve_device

    torch.manual_seed(seed)
    dev = resolve_device(device)
    if labels is not None:
        dataset = load_dataset(data)
        items, where = labelled_items(dataset, labels), f"labelled test videos ({labels})"
    elif split == "val":
        dataset = load_dataset(data, require_test=False)
        items, where = load_split(dataset, models).val, "validation split"
    else:
        raise PredictError("evaluate needs --split val or --labels CSV.")
    unknown = [k for k in attention if k not in {it.key for it in items}]
    if unknown:
        raise PredictError(f"--attention keys not among the evaluated videos: {unknown[:5]} "
                           f"(e.g. {items[0].key!r}).")
    model = load_model(models, kind=kind, frames=frames, tta=True, device=dev)
    run = predict_items(items, model, device=dev, workers=workers, batch_size=batch_size, amp=amp,
                        progress=progress, desc="evaluate")
    preds = run.predictions
    result: dict[str, Any] = {
        "data": str(data), "on": where, "n": len(preds), "model": model.info, "frames": model.frames,
        "frames_source": model.frames_source, "variants": list(model.variants),
        "failed": {p.key: p.error for p in preds if p.status == "failed"},
        "fallbacks": dict(run.fallbacks), "seconds": round(run.seconds, 3),
        "metrics": evaluation_metrics(preds),
        "videos": [{"key": p.key, "label": p.label, "p_fake": round(p.p_fake, 6),
                    "p_original": round(p.variant_p.get("original", p.p_fake), 6), "status": p.status}
                   for p in preds],
    }
    out = Path(out) if out is not None else Path(models) / "evaluation.json"
    chosen = list(dict.fromkeys([*attention, *[p.key for p in preds[: max(0, attention_first)]]]))
    if chosen:
        by_key = {p.key: p for p in preds}
        result["attention"] = attention_report([by_key[k] for k in chosen], items, model, out.parent / "attention")
    from arena.submit import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    result["path"] = str(out)
    return result


def metrics_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable table of ``evaluate``'s metrics."""
    def fmt(x):
        return "  n/a " if x is None else f"{x:6.3f}"

    lines = [f"evaluated {result['n']} videos ({result['on']}), {result['frames']} frames, "
             f"model {result['model'].get('kind')}; {len(result['failed'])} failed"]
    lines.append(f"{'':8} {'AUC':>6} {'logloss':>7} {'acc':>6} {'F1':>6}  confusion (tn fp fn tp)")
    for name in ("tta", "no_tta"):
        m = result["metrics"][name]
        c = m["confusion"]
        lines.append(f"{name:8} {fmt(m['auc'])} {fmt(m['log_loss']):>7} {fmt(m['accuracy'])} {fmt(m['f1'])}  "
                     f"{c['tn']} {c['fp']} {c['fn']} {c['tp']}")
    g = result["metrics"]["tta_minus_no_tta"]
    lines.append(f"TTA gain: AUC {fmt(g['auc'])}, log loss {fmt(g['log_loss'])} (negative is better)")
    for entry in result.get("attention", []):
        lines.append(f"attention {entry['key']}: {entry.get('png', entry.get('error', ''))}")
    lines.append(f"wrote {result['path']}")
    return lines
