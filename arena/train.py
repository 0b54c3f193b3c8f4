"""End-to-end fine-tuning of backbone + attention head (the seed's second path), readable top to bottom.

    split.json ─► TrainClips (decode_uniform -> train_augment, in DataLoader workers) ─► Detector ─► AdamW
                                                          └── val: tta_view "original" ─► metrics ─► plateau/ES

One epoch = one pass over the training part of the persisted split, then one evaluation on its validation part.
At the end of every epoch the run state goes to ``last.pt`` (atomically), so a killed run continues from the last
finished epoch and ends exactly where an uninterrupted run with the same seed ends: the data order, every
augmentation draw and dropout come from generators seeded by (seed, epoch, index) or restored from the file.

Outputs (models folder): ``<backbone>_best.pt`` (the seed's keys only), ``last.pt``, ``training_summary.json``,
``training_curves.png`` and ``train.log``. Under ``torchrun`` the model is wrapped in DistributedDataParallel and
only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from arena._files import atomic_write
from arena.hardware import GpuGuard, halving_schedule, hardware_summary, run_with_oom_fallback

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 24
CHECKPOINT_KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "val_acc", "val_f1", "val_auc", "history",
                   "config")
LAST_FORMAT = "arena-train-last-v1"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = ("data", "models", "resume", "workers", "device", "epochs", "temp_pause_c", "temp_resume_c",
               "vram_warn_frac", "empty_cache_each_video")


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``None`` fields are resolved from the models folder or defaults.

    Attributes:
        data: dataset folder (the competition layout).
        models: output folder; holds ``split.json`` and, when present, ``frame_test.json`` / ``best_head.pt``.
        frames: frames per video; None: ``frame_test.json``'s recommendation, else 24.
        lr / head_lr / weight_decay / head_weight_decay: AdamW; the head's defaults come from the tuned head.
        head_init: ``auto`` (the tuned head of ``tune-head`` when it exists), ``tuned`` (require it) or
            ``default`` (a fresh head with the seed's sizes).
        head_stats: the head's input standardisation. ``keep`` the tuned head's (or 0/1 for a fresh head);
            ``train`` recomputes it from train-mode features of 16 training clips; ``auto`` = ``train`` for a tuned
            head on a random-init backbone, whose cached (eval-mode) features are ~30x smaller than the train-mode
            features it will see, else ``keep``.
        amp: ``auto`` = fp16 + GradScaler on CUDA, bf16 on CPU; ``off`` = float32.
        resume: ``auto`` continues an unfinished ``last.pt`` made with the same settings (refuses a different
            one), ``yes`` requires ``last.pt``, ``no`` starts over.
        balanced: class-balanced training order (real and fake alternate; see `EpochSampler`).
        limit_train / limit_val: use at most this many videos of each part (quick runs, tests).
        min_frames: the fewest frames an out-of-memory retry may fall back to.
    """

    data: str
    models: str = "models"
    backbone: str = "inception_resnet_v2.tf_in1k"
    pretrained: bool = True
    weights: str | None = None
    image_size: int | None = None
    frames: int | None = None
    batch_size: int = 1
    accum_steps: int = 4
    lr: float = 1e-4
    head_lr: float | None = None
    weight_decay: float = 1e-5
    head_weight_decay: float | None = None
    epochs: int = 30
    lr_patience: int = 2
    es_patience: int = 3
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"
    grad_checkpointing: bool = False
    head_init: Literal["auto", "tuned", "default"] = "auto"
    head_stats: Literal["auto", "keep", "train"] = "auto"
    balanced: bool = True
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    resume: Literal["auto", "yes", "no"] = "auto"
    limit_train: int | None = None
    limit_val: int | None = None
    min_frames: int = 4
    temp_pause_c: float = 78.0
    temp_resume_c: float = 72.0
    vram_warn_frac: float = 0.9
    empty_cache_each_video: bool = False

    def __post_init__(self) -> None:
        # Plain strings: the config is stored in checkpoints that must load with weights_only=True.
        self.data, self.models = str(self.data), str(self.models)
        self.weights = None if self.weights is None else str(self.weights)

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {what}")

        need(self.frames is None or 1 <= self.frames <= 512, f"frames must be in 1..512, got {self.frames}")
        need(1 <= self.batch_size <= 256, f"batch_size must be in 1..256, got {self.batch_size}")
        need(1 <= self.accum_steps <= 1024, f"accum_steps must be in 1..1024, got {self.accum_steps}")
        need(self.lr > 0 and (self.head_lr is None or self.head_lr > 0), f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(1 <= self.epochs <= 10_000, f"epochs must be in 1..10000, got {self.epochs}")
        need(self.lr_patience >= 0 and self.es_patience >= 1,
             f"lr_patience must be >= 0 and es_patience >= 1, got {self.lr_patience} and {self.es_patience}")
        for name, allowed in (("amp", ("auto", "fp16", "bf16", "off")), ("resume", ("auto", "yes", "no")),
                              ("head_init", ("auto", "tuned", "default")), ("head_stats", ("auto", "keep", "train"))):
            need(getattr(self, name) in allowed,
                 f"invalid {name} ({getattr(self, name)}). Supported values are {', '.join(allowed)}.")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        for name in ("limit_train", "limit_val"):
            value = getattr(self, name)
            need(value is None or value >= 2, f"{name} must be >= 2 (one video of each class), got {value}")
        need(self.min_frames >= 1, f"min_frames must be >= 1, got {self.min_frames}")

    @property
    def short_name(self) -> str:
        """The backbone without its pretrained tag: ``inception_resnet_v2.tf_in1k`` -> ``inception_resnet_v2``."""
        return self.backbone.split(".")[0]

    @property
    def best_path(self) -> Path:
        return Path(self.models) / f"{self.short_name}_best.pt"

    @property
    def last_path(self) -> Path:
        return Path(self.models) / "last.pt"


def resolve_frames(models: str | Path) -> tuple[int, str]:
    """Frames per video: ``frame_test.json``'s ``recommended_frames`` when present, else 24; plus where from."""
    path = Path(models) / "frame_test.json"
    if path.is_file():
        try:
            frames = int(json.loads(path.read_text(encoding="utf-8"))["recommended_frames"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: cannot read recommended_frames ({type(exc).__name__}: {exc}); "
                             "rerun `arena frame-test` or pass --frames.") from exc
        return frames, str(path)
    return DEFAULT_FRAMES, "default"


@dataclass
class TunedHead:
    """The starting head from ``tune-head``: constructor arguments, weights, optimiser settings and provenance."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    lr: float | None
    weight_decay: float | None
    provenance: dict[str, Any]
    source: str


def load_tuned_head(models: str | Path) -> TunedHead | None:
    """Read ``best_head.pt`` (written by ``arena tune-head``) from the models folder; None when absent."""
    from arena.tune import BEST_HEAD_FILE, load_head

    path = Path(models) / BEST_HEAD_FILE
    if not path.is_file():
        return None
    head, ckpt = load_head(path)  # weights_only; raises ValueError naming the file
    params = dict(ckpt.get("params", {}))
    lr, wd = params.get("lr"), params.get("weight_decay")
    return TunedHead(config=head.config(), state_dict=head.state_dict(), lr=None if lr is None else float(lr),
                     weight_decay=None if wd is None else float(wd), provenance=dict(ckpt.get("provenance", {})),
                     source=f"file:{path}")


def tuned_head_mismatch(tuned: TunedHead, encoder: Any) -> list[str]:
    """Why the tuned head does not fit this backbone (its features came from another one), or []."""
    prov = tuned.provenance
    wanted = {"backbone": encoder.name, "weights_source": encoder.weights_source,
              "input_size": list(encoder.input_size), "feature_dim": encoder.feature_dim}
    have = {"backbone": prov.get("backbone"), "weights_source": prov.get("weights_source"),
            "input_size": list(prov["input_size"]) if prov.get("input_size") is not None else None,
            "feature_dim": tuned.config.get("dim", prov.get("feature_dim"))}
    return [f"{k}: tuned on {have[k]!r}, training {wanted[k]!r}" for k in wanted if have[k] != wanted[k]]


# ----------------------------------------------------------------------------------------------------------------
# Data: the dataset holds only paths; decoders are created inside the worker that decodes.


class TrainClips(Dataset):
    """Decoded clips of a list of videos, indexed by ``(epoch, index)``.

    Training clips get ``train_augment`` with one draw per video from a generator seeded by (seed, epoch, index),
    so the same run gives the same clips whichever worker decodes them and whenever the run was resumed.
    Validation clips get the ``original`` TTA view (the same path as the cache and the submission).
    """

    def __init__(self, items: list, *, frames: int, size: tuple[int, int], train: bool, seed: int) -> None:
        self.items, self.frames, self.size, self.train, self.seed = list(items), frames, size, train, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        from arena.tta import train_augment, tta_view
        from arena.video import VideoDecodeError, decode_uniform

        epoch, i = key
        item = self.items[i]
        try:
            clip = decode_uniform(item.path, self.frames, size=self.size)
        except VideoDecodeError as exc:
            # A broken video must not end a run of hours: it is skipped (and reported), not silently replaced.
            h, w = self.size
            return {"frames": torch.zeros(self.frames, 3, h, w, dtype=torch.uint8),
                    "valid": torch.ones(self.frames, dtype=torch.bool), "label": int(item.label), "index": i,
                    "ok": False, "key": item.key, "message": str(exc)}
        frames = clip.frames
        if self.train:
            frames = train_augment(frames, rng=np.random.default_rng([self.seed, epoch, i]))
        else:
            frames = tta_view(frames, "original")
        return {"frames": frames, "valid": torch.as_tensor(np.asarray(clip.valid, dtype=bool)),
                "label": int(item.label), "index": i, "ok": True, "key": item.key, "message": clip.message}


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "frames": torch.stack([s["frames"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "ok": torch.tensor([s["ok"] for s in samples], dtype=torch.bool),
        "key": [s["key"] for s in samples],
        "message": [s["message"] for s in samples],
    }


class EpochSampler(Sampler):
    """DistributedSampler (also with one process) that yields ``(epoch, index)`` keys.

    The epoch travels with each key because worker processes hold a copy of the dataset made when the epoch
    started; keys are the one thing every worker sees fresh.

    With ``labels`` (training), the order is class-balanced: a shuffled real and a shuffled fake alternate, so every
    batch of an even size (and every pair of steps at batch 1) holds both classes. Train-mode BatchNorm then
    normalises real and fake clips together, which is what makes a subtle local artefact learnable from few clips.
    Each video still appears once per epoch (the larger class's surplus comes last); under DDP each rank gets whole
    pairs.
    """

    def __init__(self, dataset: Dataset, *, world: int, rank: int, shuffle: bool, seed: int,
                 labels: list[int] | None = None) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.world, self.rank, self.seed = world, rank, seed
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def _balanced(self) -> list[int]:
        g = np.random.default_rng([self.seed, self.epoch, 17])
        real = g.permutation(np.flatnonzero(self.labels == 0)).tolist()
        fake = g.permutation(np.flatnonzero(self.labels == 1)).tolist()
        m = min(len(real), len(fake))
        pairs = [[real[i], fake[i]] for i in range(m)]
        rest = g.permutation(np.array(real[m:] + fake[m:], dtype=np.int64)).tolist()
        pairs += [rest[i:i + 2] for i in range(0, len(rest), 2)]
        while len(pairs) % self.world:  # every rank the same number of steps (DDP), like DistributedSampler's padding
            pairs.append(pairs[len(pairs) % max(1, m)])
        return [i for pair in pairs[self.rank::self.world] for i in pair]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._balanced() if self.labels is not None else self.inner
        return ((self.epoch, int(i)) for i in order)

    def __len__(self) -> int:
        return len(self._balanced()) if self.labels is not None else len(self.inner)


def _limit(items: list, n: int | None, seed: int) -> list:
    """A seeded, class-balanced subset of at most ``n`` items (the split file is sorted by key, i.e. by class)."""
    if n is None or n >= len(items):
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    by_class = {c: [items[j] for j in order if items[j].label == c] for c in (0, 1)}
    picked: list = []
    while len(picked) < n and (by_class[0] or by_class[1]):
        for c in (0, 1):
            if by_class[c] and len(picked) < n:
                picked.append(by_class[c].pop(0))
    return sorted(picked, key=lambda it: it.key)


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU); one process: nothing to do."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist = Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist


def gather(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one item without DDP)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: TrainConfig, tuned: TunedHead | None) -> torch.nn.Module:
    """Backbone (timm) + attention head: the tuned head (sizes, weights, feature statistics) when it was tuned on
    this very backbone, else a fresh head with the seed's sizes. ``model.head_init_source`` says which."""
    from arena.model import Detector, DetectorHead, create_encoder

    encoder = create_encoder(cfg.backbone, pretrained=cfg.pretrained and cfg.weights is None, weights=cfg.weights,
                             image_size=cfg.image_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's init, whatever the backbone consumed
    source = "default"
    if tuned is not None:
        mismatch = tuned_head_mismatch(tuned, encoder)
        if mismatch and cfg.head_init == "tuned":
            raise ValueError(f"{tuned.source} was tuned on other features: {'; '.join(mismatch)}. Rerun features "
                             "and tune-head with this backbone, or pass --head-init default.")
        if mismatch:
            log.warning("not starting from %s (its features came from another backbone: %s); fresh head instead",
                        tuned.source, "; ".join(mismatch))
            tuned = None
    if tuned is not None:
        head = DetectorHead(**tuned.config)
        head.load_state_dict(tuned.state_dict)
        source = tuned.source
    else:
        head = DetectorHead(encoder.feature_dim)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    model = Detector(encoder, head)
    model.head_init_source = source
    return model


@torch.no_grad()
def calibrate_head_stats(model: torch.nn.Module, items: list, *, frames: int, device: torch.device,
                         amp_dtype: torch.dtype | None, videos: int = 16, seed: int = 0) -> int:
    """Set the head's input standardisation from train-mode backbone features of a few training clips.

    BatchNorm runs in train mode as in training (its running statistics are restored afterwards, so the only
    effect is on the head's ``feat_mean``/``feat_std``). Returns the number of frames the statistics came from.
    """
    encoder, head = model.encoder, model.head
    ds = TrainClips(_limit(items, videos, seed), frames=frames, size=tuple(encoder.input_size), train=False, seed=seed)
    saved = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    was_training = encoder.training
    encoder.train()
    feats = []
    try:
        for i in range(len(ds)):
            clip = ds[(0, i)]
            if not clip["ok"]:
                continue
            with (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
                f = encoder(clip["frames"].to(device)).float()
            feats.append(f[clip["valid"].to(device)])
    finally:
        encoder.load_state_dict(saved)
        encoder.train(was_training)
    if not feats:
        raise RuntimeError("no training clip could be decoded to calibrate the head's input statistics")
    x = torch.cat(feats)
    head.set_feature_stats(x.mean(0), x.std(0))
    return int(x.shape[0])


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: float32)."""
    from arena.runtime import amp_dtype

    if amp == "off":
        return None
    if amp == "auto":
        return amp_dtype(device)
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device (GradScaler); on CPU use --amp bf16 or --amp off.")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one evaluation


@dataclass
class StepContext:
    """What the step functions share: device, precision, the guard and the (sticky) frame budget."""

    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    guard: GpuGuard
    dist: Dist
    frames: int
    min_frames: int
    oom_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _fewer_frames(batch: dict[str, Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the decoded clip at ``uniform_indices(T, k)``: the same spread over the video with fewer frames."""
    from arena.video import uniform_indices

    t = batch["frames"].shape[1]
    if k >= t:
        return batch["frames"], batch["valid"]
    rows = torch.as_tensor(uniform_indices(t, k))
    return batch["frames"][:, rows], batch["valid"][:, rows]


def train_one_epoch(model, loader: DataLoader, optimizer, ctx: StepContext, *, epoch: int, accum_steps: int,
                    show: bool) -> dict[str, float | None]:
    """One pass over the training loader with gradient accumulation; returns loss/accuracy/AUC of the epoch."""
    from tqdm import tqdm

    from arena import metrics

    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    losses: list[float] = []
    probs: list[float] = []
    labels: list[int] = []
    indices: list[int] = []
    t0 = time.perf_counter()
    videos = 0
    bar = tqdm(loader, total=n_batches, desc=f"epoch {epoch} train", unit="batch", dynamic_ncols=True,
               disable=not show, leave=False)
    window_start = 0
    for step, batch in enumerate(bar):
        ctx.guard.check()
        ok = batch["ok"]
        for key, msg, good in zip(batch["key"], batch["message"], ok.tolist(), strict=True):
            if not good:
                ctx.skipped[key] = msg
        if step % accum_steps == 0:
            window_start = step
        window = min(accum_steps, n_batches - window_start)  # the last window may be shorter
        last_in_window = step == window_start + window - 1
        if not ok.any() and not ctx.dist.enabled:
            # Nothing decodable and nobody to stay in step with: skip (but still close the window).
            if last_in_window:
                _optimizer_step(optimizer, ctx)
            continue
        labels_dev = batch["label"].to(ctx.device)
        weight = ok.to(ctx.device, torch.float32)

        def run(k: int, batch=batch, labels_dev=labels_dev, weight=weight, last_in_window=last_in_window,
                window=window):
            frames, valid = _fewer_frames(batch, k)
            frames, valid = frames.to(ctx.device, non_blocking=True), valid.to(ctx.device, non_blocking=True)
            # DDP: all-reduce gradients only on the micro-step that closes the accumulation window.
            sync = contextlib.nullcontext() if (last_in_window or not ctx.dist.enabled) else model.no_sync()
            with sync:
                with ctx.autocast():
                    logits, _ = model(frames, valid)
                per_video = F.cross_entropy(logits.float(), labels_dev, reduction="none")
                # Failed decodes weigh 0 (under DDP they still run so every rank does the same collectives).
                loss = (per_video * weight).sum() / weight.sum().clamp_min(1.0)
                ctx.scaler.scale(loss / window).backward()
            return per_video.detach(), torch.softmax(logits.detach().float(), dim=1)[:, 1]

        def dropped(k: int, exc: BaseException, step=step) -> None:
            # Part of this micro-step's gradient may already be in .grad: drop the whole window's gradient
            # rather than step on a half-added one.
            optimizer.zero_grad(set_to_none=True)
            ctx.oom_events.append({"epoch": epoch, "step": step, "frames": k, "error": str(exc).splitlines()[0][:200]})

        (per_video, p), used = run_with_oom_fallback(
            run, halving_schedule(ctx.frames, minimum=min(ctx.min_frames, ctx.frames)), what="frames",
            log=log.warning, on_oom=dropped)
        if used < ctx.frames:
            log.warning("frames per video lowered from %d to %d for the rest of the run after out-of-memory",
                        ctx.frames, used)
            ctx.frames = used
        if last_in_window:
            _optimizer_step(optimizer, ctx)
        ctx.guard.after_video()
        keep = ok.numpy()
        losses += per_video.cpu().numpy()[keep].tolist()
        probs += p.cpu().numpy()[keep].tolist()
        labels += batch["label"].numpy()[keep].tolist()
        indices += batch["index"].numpy()[keep].tolist()
        videos += int(keep.sum())
        rate = videos / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}" if losses else "-", videos_per_s=f"{rate * ctx.dist.world:.2f}")
    bar.close()

    # Metrics over every rank's videos (DistributedSampler pads with repeats: keep each index once).
    rows = {}
    for part in gather(list(zip(indices, labels, probs, losses, strict=True)), ctx.dist):
        for i, y, q, loss in part:
            rows.setdefault(i, (y, q, loss))
    y = np.array([r[0] for r in rows.values()], dtype=np.int64)
    q = np.array([r[1] for r in rows.values()], dtype=np.float64)
    out = {"loss": float(np.mean([r[2] for r in rows.values()])) if rows else float("nan"), "acc": None, "auc": None,
           "videos": len(rows), "seconds": time.perf_counter() - t0}
    if rows:
        s = metrics.summary(y, q)
        out["acc"], out["auc"] = s["accuracy"], s["auc"]
    return out


def _optimizer_step(optimizer, ctx: StepContext) -> None:
    # A window whose every video failed (or whose gradient an OOM dropped) has no gradient: nothing to step.
    if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, loader: DataLoader, ctx: StepContext, *, show: bool, desc: str = "val") -> dict[str, Any]:
    """Predict every validation video (eval mode, ``original`` view); metrics over all ranks."""
    from tqdm import tqdm

    from arena import metrics

    model = _unwrap(model).eval()
    rows: list[tuple[int, int, float]] = []
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=not show, leave=False):
        ctx.guard.check()
        frames, valid = _fewer_frames(batch, ctx.frames)
        with ctx.autocast():
            logits, _ = model(frames.to(ctx.device), valid.to(ctx.device))
        p = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        for i, y, q, ok, key, msg in zip(batch["index"].tolist(), batch["label"].tolist(), p.tolist(),
                                         batch["ok"].tolist(), batch["key"], batch["message"], strict=True):
            if ok:
                rows.append((i, y, q))
            else:
                ctx.skipped[key] = msg
    merged: dict[int, tuple[int, float]] = {}
    for part in gather(rows, ctx.dist):
        for i, y, q in part:
            merged.setdefault(i, (y, q))
    if not merged:
        raise RuntimeError("no validation video could be decoded; see the skipped videos in train.log")
    y = np.array([v[0] for v in merged.values()], dtype=np.int64)
    q = np.array([v[1] for v in merged.values()], dtype=np.float64)
    s = metrics.summary(y, q)
    return {"loss": s["log_loss"], "acc": s["accuracy"], "auc": s["auc"], "f1": s["f1"], "videos": len(merged),
            "prob_spread": float(q.max() - q.min())}


# ----------------------------------------------------------------------------------------------------------------
# Outputs: atomic files, checkpoints, summary, curves


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8"))


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Loss, accuracy and AUC per epoch, train and validation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(axes, ("loss", "acc", "auc"), ("loss (log loss)", "accuracy", "ROC AUC"),
                                 strict=True):
        for part, style in (("train", "o-"), ("val", "s--")):
            values = [np.nan if h[f"{part}_{metric}"] is None else h[f"{part}_{metric}"] for h in history]
            ax.plot(epochs, values, style, label=part)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def config_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a saved run and this one, ignoring those that may change on resume."""
    keys = sorted((set(saved) | set(current)) - set(RESUME_FREE))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_last(path: Path) -> dict[str, Any]:
    """Read ``last.pt`` (weights_only: a file that would run code is refused)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: say which file and what to do
        raise ValueError(f"{path}: cannot be loaded as a training state ({type(exc).__name__}: {str(exc)[:200]}). "
                         "Delete it or pass --resume no to start over.") from exc
    if not isinstance(state, dict) or state.get("format") != LAST_FORMAT:
        raise ValueError(f"{path}: not an arena training state (format {LAST_FORMAT} expected); "
                         "pass --resume no to start over.")
    return state


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    """Where the outputs are and how the run ended."""

    best_path: Path
    last_path: Path
    summary_path: Path
    curves_path: Path
    best_epoch: int
    epochs_run: int
    stop_reason: str
    history: list[dict[str, Any]]
    resumed_from: int = 0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    oom_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    main: bool = True

    def lines(self) -> list[str]:
        """A short human summary: how the run ended, the best epoch and where the outputs are."""
        if not self.history:
            return ["no epoch was run"]
        best = self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]
        out = [f"train-full: {self.stop_reason or 'stopped'} after epoch {self.history[-1]['epoch']}"
               + (f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""),
               f"best epoch {self.best_epoch}: val loss {best['val_loss']:.4f}, AUC {_fmt(best['val_auc'])}, "
               f"accuracy {best['val_acc']:.3f}, F1 {best['val_f1']:.3f}",
               f"outputs: {self.best_path}, {self.last_path}, {self.summary_path}, {self.curves_path}"]
        if self.oom_events:
            out.append(f"{len(self.oom_events)} out-of-memory event(s) survived with fewer frames (see train.log)")
        out += [f"skipped (could not decode) {k}: {msg}" for k, msg in sorted(self.skipped.items())]
        return out


def _setup_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("arena")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def train(cfg: TrainConfig, *, guard: GpuGuard | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Fine-tune backbone + head end to end; resumable, DDP-aware. See the module docstring for the outputs.

    Args:
        cfg: the run's settings.
        guard: the GPU guard (default: one from cfg's thresholds, NVML on this process's GPU).
        on_epoch_end: called after every epoch's outputs are written, with (epoch, history row).
    """
    from arena.data import load_dataset, load_split, make_split
    from arena.runtime import resolve_device

    device = resolve_device(cfg.device)
    dist = setup_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    models = Path(cfg.models)
    handler = None
    if dist.main:
        models.mkdir(parents=True, exist_ok=True)
        handler = _setup_file_log(models / "train.log")
        for name in (cfg.best_path.name, cfg.last_path.name, "training_summary.json", "training_curves.png"):
            for stale in models.glob(f".{name}.*.tmp"):  # left by a run killed in the middle of a write
                stale.unlink(missing_ok=True)
    try:
        return _train(cfg, device=device, dist=dist, guard=guard, on_epoch_end=on_epoch_end,
                      load_dataset=load_dataset, make_split=make_split, load_split=load_split)
    finally:
        if handler is not None:
            logging.getLogger("arena").removeHandler(handler)
            handler.close()
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg, *, device, dist, guard, on_epoch_end, load_dataset, make_split, load_split) -> TrainResult:
    models = Path(cfg.models)

    # --- data: the persisted split (rank 0 makes it, the others read it)
    dataset = load_dataset(cfg.data, require_test=False)
    if dist.main:
        split = make_split(dataset, models)
    if dist.enabled:
        torch.distributed.barrier()
    if not dist.main:
        split = load_split(dataset, models)
    train_items = _limit(split.train, cfg.limit_train, cfg.seed)
    val_items = _limit(split.val, cfg.limit_val, cfg.seed + 1)

    # --- model, head init, optimiser
    frames, frames_source = (cfg.frames, "option") if cfg.frames is not None else resolve_frames(models)
    tuned = None if cfg.head_init == "default" else load_tuned_head(models)
    if cfg.head_init == "tuned" and tuned is None:
        raise ValueError(f"--head-init tuned: no {models / 'best_head.pt'}; run `arena tune-head` first.")
    model = build_model(cfg, tuned).to(device)
    if device.type == "cuda":
        model.encoder.to_channels_last()
    amp = resolve_amp(cfg.amp, device)
    if model.head_init_source == "default":
        tuned = None  # not used (tuned on other features): its optimiser settings do not apply either
    head_lr = cfg.head_lr or (tuned.lr if tuned and tuned.lr else cfg.lr)
    head_wd = cfg.head_weight_decay if cfg.head_weight_decay is not None else (
        tuned.weight_decay if tuned and tuned.weight_decay is not None else cfg.weight_decay)
    optimizer = torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": head_wd},
    ])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    resolved = {
        **dataclasses.asdict(cfg),
        "frames": frames, "frames_source": frames_source, "input_size": list(model.encoder.input_size),
        "image_size": int(model.encoder.input_size[0]), "amp_dtype": str(amp).replace("torch.", "") if amp else "off",
        "head": model.head.config(), "head_init_source": model.head_init_source,
        "head_lr": head_lr, "head_weight_decay": head_wd, "weights_source": model.encoder.weights_source,
        "split_sha256": split.sha256, "train_videos": len(train_items), "val_videos": len(val_items),
        "world_size": dist.world, "optimizer": "AdamW", "scheduler": "ReduceLROnPlateau(val loss, factor 0.1)",
        "early_stopping": "val loss", "checkpoint": cfg.best_path.name,
    }
    head_stats = cfg.head_stats
    if head_stats == "auto":
        random_init = model.encoder.weights_source.startswith("random:")
        head_stats = "train" if random_init and model.head_init_source != "default" else "keep"
    resolved["head_stats"] = head_stats
    from arena.tta import train_augment_spec

    resolved["train_augment"] = train_augment_spec()

    # --- resume
    history: list[dict[str, Any]] = []
    es = {"best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    start_epoch, elapsed_before, resumed_from, stop_reason = 1, 0.0, 0, ""
    last = None
    if cfg.resume != "no" and cfg.last_path.is_file():
        last = load_last(cfg.last_path)
        diff = config_difference(last["config"], resolved)
        if diff:
            raise ValueError(f"{cfg.last_path} was made with other settings: {'; '.join(diff)}. Rerun with those "
                             "settings to continue it, or pass --resume no to start over (it will be replaced).")
        if last["finished"] and not (last["stop_reason"] == "max_epochs" and cfg.epochs > last["epoch"]):
            log.warning("%s: this run already finished at epoch %d (%s); nothing to train. Pass --resume no to "
                        "train again, or more --epochs to extend a run that stopped at its epoch limit.",
                        cfg.last_path, last["epoch"], last["stop_reason"])
    elif cfg.resume == "yes":
        raise ValueError(f"--resume: no {cfg.last_path} to continue from; run without --resume to start.")
    if last is not None:
        _unwrap(model).load_state_dict(last["model_state_dict"])
        optimizer.load_state_dict(last["optimizer_state_dict"])
        scheduler.load_state_dict(last["scheduler_state_dict"])
        scaler.load_state_dict(last["scaler_state_dict"])
        history, es = list(last["history"]), dict(last["early_stopping"])
        start_epoch = int(last["epoch"]) + 1
        resumed_from = int(last["epoch"])
        elapsed_before = float(last["elapsed_seconds"])
        stop_reason = last["stop_reason"] if last["finished"] else ""
        if stop_reason == "max_epochs" and cfg.epochs > last["epoch"]:
            stop_reason = ""
        _set_rng_state(last["rng"], device)
        log.info("resuming from %s after epoch %d", cfg.last_path, resumed_from)
    else:
        if resolved["head_stats"] == "train":
            n = calibrate_head_stats(_unwrap(model), train_items, frames=frames, device=device, amp_dtype=amp,
                                     seed=cfg.seed)
            log.info("head input statistics recomputed from %d train-mode frames", n)
        torch.manual_seed(cfg.seed + 1)  # the data loaders' and dropout's stream, independent of the init's

    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- loaders (workers decode; the sampler hands them (epoch, index) keys)
    size = tuple(_unwrap(model).encoder.input_size)
    train_ds = TrainClips(train_items, frames=frames, size=size, train=True, seed=cfg.seed)
    val_ds = TrainClips(val_items, frames=frames, size=size, train=False, seed=cfg.seed)
    train_sampler = EpochSampler(train_ds, world=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed,
                                 labels=[it.label for it in train_items] if cfg.balanced else None)
    val_sampler = EpochSampler(val_ds, world=dist.world, rank=dist.rank, shuffle=False, seed=cfg.seed)

    def loader(ds, sampler):
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                          collate_fn=collate_clips, pin_memory=device.type == "cuda",
                          prefetch_factor=2 if cfg.workers > 0 else None, persistent_workers=False)

    train_loader, val_loader = loader(train_ds, train_sampler), loader(val_ds, val_sampler)
    guard = guard or GpuGuard(temp_pause_c=cfg.temp_pause_c, temp_resume_c=cfg.temp_resume_c,
                              vram_warn_frac=cfg.vram_warn_frac, empty_cache_each_video=cfg.empty_cache_each_video,
                              device_index=device.index or 0, log=log.warning)
    ctx = StepContext(device=device, amp_dtype=amp, scaler=scaler, guard=guard, dist=dist, frames=frames,
                      min_frames=cfg.min_frames)
    if dist.main:
        log.info("train-full: %d train / %d val videos, %d frames at %s, batch %d x accum %d x %d process(es), "
                 "amp %s, device %s; outputs in %s", len(train_items), len(val_items), frames, size, cfg.batch_size,
                 cfg.accum_steps, dist.world, resolved["amp_dtype"], device, models)
        log.info("resolved config: %s", json.dumps(resolved, sort_keys=True))

    # --- epochs
    best_path, last_path = cfg.best_path, cfg.last_path
    summary_path, curves_path = models / "training_summary.json", models / "training_curves.png"
    epoch = start_epoch - 1
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop_reason:
            break
        train_sampler.set_epoch(epoch)
        tr = train_one_epoch(model, train_loader, optimizer, ctx, epoch=epoch, accum_steps=cfg.accum_steps,
                             show=dist.main)
        va = evaluate(model, val_loader, ctx, show=dist.main)
        lrs = [g["lr"] for g in optimizer.param_groups]
        scheduler.step(va["loss"])
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "train_auc": tr["auc"],
               "val_loss": va["loss"], "val_acc": va["acc"], "val_auc": va["auc"], "val_f1": va["f1"],
               "val_prob_spread": va["prob_spread"], "lr": lrs[0], "head_lr": lrs[1],
               "train_seconds": round(tr["seconds"], 3), "frames": ctx.frames}
        history.append(row)
        improved = va["loss"] < es["best_val_loss"]
        if improved:
            es = {"best_val_loss": va["loss"], "best_epoch": epoch, "bad_epochs": 0}
        else:
            es["bad_epochs"] += 1
        if es["bad_epochs"] >= cfg.es_patience:
            stop_reason = "early_stopping"
        elif epoch == cfg.epochs:
            stop_reason = "max_epochs"
        elapsed = elapsed_before + time.perf_counter() - t_run
        if dist.main:
            log.info("epoch %d/%d: train loss %.4f acc %s auc %s | val loss %.4f acc %.3f auc %s f1 %.3f | lr %.2e | "
                     "%.1f s%s", epoch, cfg.epochs, tr["loss"], _fmt(tr["acc"]), _fmt(tr["auc"]), va["loss"],
                     va["acc"], _fmt(va["auc"]), va["f1"], lrs[0], tr["seconds"], " (best)" if improved else "")
            model_state = _unwrap(model).state_dict()
            if improved:
                # Exactly the seed's keys: tools written for the seed's checkpoint keep working.
                save_torch({"epoch": epoch, "model_state_dict": model_state,
                            "optimizer_state_dict": optimizer.state_dict(), "val_acc": float(va["acc"]),
                            "val_f1": float(va["f1"]), "val_auc": _num(va["auc"]), "history": history,
                            "config": resolved}, best_path)
            save_torch({"format": LAST_FORMAT, "epoch": epoch, "model_state_dict": model_state,
                        "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
                        "scaler_state_dict": scaler.state_dict(), "early_stopping": es, "history": history,
                        "config": resolved, "rng": _rng_state(device), "elapsed_seconds": elapsed,
                        "finished": bool(stop_reason), "stop_reason": stop_reason, "val_acc": float(va["acc"]),
                        "val_f1": float(va["f1"]), "val_auc": _num(va["auc"])}, last_path)
            _write_summary(summary_path, resolved, history, es, elapsed, guard, ctx, stop_reason, resumed_from,
                           best_path, curves_path)
            plot_curves(history, curves_path, title=f"{cfg.short_name} train-full ({frames} frames, "
                        f"{resolved['image_size']} px, seed {cfg.seed})")
        if dist.enabled:
            torch.distributed.barrier()  # nobody starts the next epoch before the files of this one exist
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop_reason:
            break

    if dist.main:
        if not history:
            raise RuntimeError("no epoch was run (epochs already reached); nothing written")
        elapsed = elapsed_before + time.perf_counter() - t_run
        _write_summary(summary_path, resolved, history, es, elapsed, guard, ctx, stop_reason, resumed_from,
                       best_path, curves_path)
        best = history[es["best_epoch"] - 1] if es["best_epoch"] else history[-1]
        log.info("done (%s) after epoch %d in %.0f s; best epoch %d: val loss %.4f, AUC %s, acc %.3f -> %s",
                 stop_reason or "stopped", history[-1]["epoch"], elapsed, es["best_epoch"], best["val_loss"],
                 _fmt(best["val_auc"]), best["val_acc"], best_path)
    return TrainResult(best_path=best_path, last_path=last_path, summary_path=summary_path, curves_path=curves_path,
                       best_epoch=int(es["best_epoch"]), epochs_run=len(history), stop_reason=stop_reason,
                       history=history, resumed_from=resumed_from, skipped=dict(ctx.skipped),
                       oom_events=list(ctx.oom_events), main=dist.main)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write_summary(path, resolved, history, es, elapsed, guard, ctx, stop_reason, resumed_from, best_path,
                   curves_path) -> None:
    best = history[es["best_epoch"] - 1] if es["best_epoch"] else None
    save_json({
        "config": resolved,
        "history": history,
        "best_epoch": es["best_epoch"],
        "best": best,
        "early_stopping": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in es.items()},
        "finished": bool(stop_reason),
        "stop_reason": stop_reason,
        "resumed_from_epoch": resumed_from,
        "elapsed_seconds": round(elapsed, 3),
        "hardware": hardware_summary(),
        "gpu_guard": guard.summary(),
        "out_of_memory_events": ctx.oom_events,
        "skipped_videos": ctx.skipped,
        "outputs": {"best_checkpoint": best_path.name, "last": "last.pt", "curves": curves_path.name,
                    "log": "train.log"},
    }, path)
