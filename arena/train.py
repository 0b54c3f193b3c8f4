"""End-to-end fine-tuning of backbone + attention head (`arena train-full`), readable top to bottom.

    split.json ─► ClipDataset (decode -> augment hook, in isolated workers) ─► Detector ─► AdamW
                          └── val: the "original" view ─► metrics ─► ReduceLROnPlateau / early stopping

The training clips (`arena.train_data.TrainClips`): with ``--pseudo-fakes sbi[:P]`` a real is joined in its batch,
with probability P per epoch, by a self-blend of itself labelled fake (`arena.pseudo`; ``--train-on real`` keeps
only the reals and their twins); then the augment hook (`arena.train_data.AugmentClip`): the ``--augment`` level's
degradations (`arena.augment`, none by default), then `arena.tta.train_augment`'s flip/shift/brightness draw.

One epoch = one pass over the training part of the persisted split, then one evaluation on its validation part.
With ``cfg.fold = i`` the parts are fold i of a K-fold split (train on the other folds, validate on fold i) and
every output goes into the fold's folder, ``<models>/folds/fold_<i>`` (`arena.train_folds` trains them all).
At the end of every epoch the run state goes to ``last.pt`` (atomically), so a killed run continues from the last
finished epoch and ends exactly where an uninterrupted run with the same seed ends: the data order, every
augmentation draw and dropout come from generators seeded by (seed, epoch, index) or restored from the file.
A thermal pause longer than ``--thermal-max-wait`` stops the run the same way (`arena.errors.ThermalTimeout`).

Outputs (models or fold folder, names from `arena.models_folder`): ``<backbone>_best.pt`` (`DetectorCheckpoint`,
the seed's keys), ``last.pt``, ``training_summary.json``, ``training_curves.png`` and ``train.log``
(`arena.train_state`). Under ``torchrun`` the model is wrapped in DistributedDataParallel and only rank 0 writes
(`arena.distributed`).
The pieces: `arena.train_config` (settings), `arena.train_data` (clips and batches), `arena.train_model` (the
starting model), `arena.train_state` (last.pt, summary, curves, log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arena import metrics
from arena._files import remove_stale_temporaries
from arena.augment import augment_spec
from arena.calibration import fit_calibration
from arena.data import load_dataset
from arena.distributed import Dist, EpochSampler, all_max, barrier, gather, setup_distributed, unwrap
from arena.errors import ModelsError, ThermalTimeout, TrainError
from arena.faces.modes import crop_provenance, face_cropper
from arena.hardware import GpuGuard, halving_schedule, is_oom, run_with_oom_fallback
from arena.isolation import ClipLoader
from arena.models_folder import (
    BEST_HEAD_FILE,
    FRAME_TEST_FILE,
    TRAIN_LOG_FILE,
    TRAINING_CURVES_FILE,
    TRAINING_SUMMARY_FILE,
    DetectorCheckpoint,
    resolve_frames,
    save_torch,
)
from arena.runtime import autocast, autocast_dtype, needs_grad_scaler, precision_name, resolve_device
from arena.sampling import uniform_indices
from arena.split import ensure_split, load_split
from arena.train_config import TrainConfig, check_fold
from arena.train_data import (
    ClipBatch,
    CollateClips,
    PseudoFakeSampler,
    eval_dataset,
    limit_items,
    train_dataset,
    training_items,
)
from arena.train_model import build_model, calibrate_head_stats, load_tuned_head
from arena.train_state import (
    LAST_FORMAT,
    TrainResult,
    add_file_log,
    config_difference,
    finished,
    fmt_score,
    load_last,
    plot_curves,
    remove_file_log,
    rng_state,
    set_rng_state,
    write_summary,
)
from arena.tta import train_augment_spec

log = logging.getLogger(__name__)


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
        return autocast(self.device, precision_name(self.amp_dtype))


def _fewer_frames(batch: ClipBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the decoded clip at ``uniform_indices(T, k)``: the same spread over the video with fewer frames."""
    t = batch.frames.shape[1]
    if k >= t:
        return batch.frames, batch.valid
    rows = torch.as_tensor(uniform_indices(t, k))
    return batch.frames[:, rows], batch.valid[:, rows]


def train_one_epoch(model: torch.nn.Module, loader: ClipLoader, optimizer: torch.optim.Optimizer, ctx: StepContext,
                    *, epoch: int, accum_steps: int, show: bool) -> dict[str, float | None]:
    """One pass over the training loader with gradient accumulation; returns loss/accuracy/AUC of the epoch."""
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
        ok = batch.ok
        for key, msg, good in zip(batch.key, batch.message, ok.tolist(), strict=True):
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
        labels_dev = batch.label.to(ctx.device)
        weight = ok.to(ctx.device, torch.float32)
        # DDP: gradients are all-reduced only in the backward of the micro-step that closes the accumulation window;
        # that backward must come after the ranks' meeting point (a rank retrying a forward would not join it).
        synced = ctx.dist.enabled and last_in_window

        def run(k: int, batch=batch, labels_dev=labels_dev, weight=weight, synced=synced, window=window):
            frames, valid = _fewer_frames(batch, k)
            frames, valid = frames.to(ctx.device, non_blocking=True), valid.to(ctx.device, non_blocking=True)
            failed = None
            with contextlib.nullcontext() if synced or not ctx.dist.enabled else model.no_sync():
                try:
                    with ctx.autocast():
                        logits, _ = model(frames, valid)
                    per_video = F.cross_entropy(logits.float(), labels_dev, reduction="none")
                    # Failed decodes weigh 0 (under DDP they still run so every rank does the same collectives).
                    loss = (per_video * weight).sum() / weight.sum().clamp_min(1.0)
                    if not synced:
                        ctx.scaler.scale(loss / window).backward()
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    failed = exc
                # The guard between steps, and the ranks' one meeting point: all pause, retry or stop together.
                if ctx.guard.check(oom=failed is not None):
                    if ctx.dist.enabled:  # as if every rank's forward had finished (DDP sets it at a forward's end),
                        model.require_forward_param_sync = synced  # so the retry's buffer broadcast runs on all or none
                    raise failed or torch.OutOfMemoryError(f"another process ran out of memory at {k} frames")
                if synced:
                    _synced_backward(loss / window, ctx, k)
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
        labels += batch.label.numpy()[keep].tolist()
        indices += batch.index.numpy()[keep].tolist()
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


def _synced_backward(loss: torch.Tensor, ctx: StepContext, frames: int) -> None:
    """The backward that all-reduces the gradients (DDP). Out of memory here cannot be retried: the other ranks are
    inside the all-reduce. Raising a non-OOM error ends this process, and torchrun then ends the others."""
    try:
        ctx.scaler.scale(loss).backward()
    except Exception as exc:
        if not is_oom(exc):
            raise
        raise TrainError(f"process {ctx.dist.rank} of {ctx.dist.world} ran out of memory at {frames} frames in the "
                         "backward pass that all-reduces the gradients, which cannot be retried under DDP. Run the "
                         "same command again to resume from last.pt, or start over (--resume no) with a smaller "
                         "--frames or --image-size, or --grad-checkpointing.") from exc


def _optimizer_step(optimizer: torch.optim.Optimizer, ctx: StepContext) -> None:
    # A window whose every video failed (or whose gradient an OOM dropped) has no gradient: nothing to step.
    if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ClipLoader, ctx: StepContext, *, show: bool,
             desc: str = "val") -> dict[str, Any]:
    """Predict every validation video (eval mode, ``original`` view); metrics over all ranks, and the labels ``y``
    and logit differences ``z`` (fake minus real) for calibration.

    Raises:
        TrainError: not one validation video could be decoded.
    """
    model = unwrap(model).eval()
    rows: list[tuple[int, int, float, float]] = []
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=not show, leave=False):
        ctx.guard.check()
        frames, valid = _fewer_frames(batch, ctx.frames)
        with ctx.autocast():
            logits, _ = model(frames.to(ctx.device), valid.to(ctx.device))
        p = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        z = (logits[:, 1].float() - logits[:, 0].float()).cpu().numpy()
        for i, y, q, zi, ok, key, msg in zip(batch.index.tolist(), batch.label.tolist(), p.tolist(), z.tolist(),
                                             batch.ok.tolist(), batch.key, batch.message, strict=True):
            if ok:
                rows.append((i, y, q, zi))
            else:
                ctx.skipped[key] = msg
    merged: dict[int, tuple[int, float, float]] = {}
    for part in gather(rows, ctx.dist):
        for i, y, q, zi in part:
            merged.setdefault(i, (y, q, zi))
    if not merged:
        raise TrainError(f"no {desc} video could be decoded (see the skipped videos in {TRAIN_LOG_FILE}); check them "
                         "with `arena inspect`.")
    y = np.array([v[0] for v in merged.values()], dtype=np.int64)
    q = np.array([v[1] for v in merged.values()], dtype=np.float64)
    s = metrics.summary(y, q)
    return {"loss": s["log_loss"], "acc": s["accuracy"], "auc": s["auc"], "f1": s["f1"], "videos": len(merged),
            "prob_spread": float(q.max() - q.min()), "y": y,
            "z": np.array([v[2] for v in merged.values()], dtype=np.float64)}


# ----------------------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, *, guard: GpuGuard | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Fine-tune backbone + head end to end; resumable, DDP-aware. See the module docstring for the outputs.

    Args:
        cfg: the run's settings.
        guard: the GPU guard (default: one from cfg's thresholds, NVML on this process's GPU).
        on_epoch_end: called after every epoch's outputs are written, with (epoch, history row).

    Raises:
        ArenaError: a user-fixable problem (data, split, models folder, weights, options, a fold the split does not
            have, a run to resume that was made with other settings); the message says what to do.
    """
    if cfg.fold is not None:
        check_fold(cfg.models, cfg.fold)  # before the fold's folder is made
    # A process group this call starts, it ends; one started by the caller (`arena.train_folds`) outlives it.
    owns_group = not torch.distributed.is_initialized()
    dist, device = setup_distributed(resolve_device(cfg.device))
    out = cfg.out_dir
    handler = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        handler = add_file_log(out / TRAIN_LOG_FILE)
        for name in (cfg.best_path.name, cfg.last_path.name, TRAINING_SUMMARY_FILE, TRAINING_CURVES_FILE):
            remove_stale_temporaries(out / name)  # left by a run killed in the middle of a write
    try:
        return _train(cfg, device=device, dist=dist, guard=guard, on_epoch_end=on_epoch_end)
    finally:
        remove_file_log(handler)
        if owns_group and dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, *, device: torch.device, dist: Dist, guard: GpuGuard | None,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    models, out = Path(cfg.models), cfg.out_dir

    # --- data: the persisted split (rank 0 makes it, the others read it); a fold needs the K-fold split to exist
    dataset = load_dataset(cfg.data, require_test=False)
    if cfg.fold is not None:
        split = load_split(dataset, models).fold(cfg.fold)
    else:
        if dist.main:
            split = ensure_split(dataset, models)
        barrier(dist)
        if not dist.main:
            split = load_split(dataset, models)
    train_items = limit_items(training_items(split.train, cfg.train_on), cfg.limit_train, cfg.seed)
    val_items = limit_items(split.val, cfg.limit_val, cfg.seed + 1)

    # --- model, head init, optimiser. A fold starts from its own tuned head (the parent's was tuned with this
    # fold's validation videos in its training data) and its own frame test, else the parent's.
    frames, frames_source = resolve_frames(out if (out / FRAME_TEST_FILE).is_file() else models, cfg.frames)
    tuned = None if cfg.head_init == "default" else load_tuned_head(out)
    if cfg.head_init == "tuned" and tuned is None:
        fold_hint = " on the K-fold split" if cfg.fold is not None else ""
        raise ModelsError(f"--head-init tuned: no {out / BEST_HEAD_FILE}; run `arena tune-head`{fold_hint} first, or "
                          "pass --head-init auto or default.")
    model = build_model(cfg, tuned).to(device)
    if device.type == "cuda":
        model.encoder.to_channels_last()
    amp = autocast_dtype(device, cfg.amp)
    if model.head_init_source == "default":
        tuned = None  # not used (tuned on other features): its optimiser settings do not apply either
    head_lr = cfg.head_lr or (tuned.lr if tuned and tuned.lr else cfg.lr)
    head_wd = cfg.head_weight_decay if cfg.head_weight_decay is not None else (
        tuned.weight_decay if tuned and tuned.weight_decay is not None else cfg.weight_decay)
    # fused: one kernel over all parameters; on a CPU a step over InceptionResNetV2's 55 M took 38 ms against
    # 120 ms for the per-tensor loop (torch 2.14, 2 cores).
    optimizer = torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": head_wd},
    ], fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp))

    head_stats = cfg.head_stats
    if head_stats == "auto":
        random_init = model.encoder.weights_source.startswith("random:")
        head_stats = "train" if random_init and model.head_init_source != "default" else "keep"
    resolved = {
        **dataclasses.asdict(cfg),
        "frames": frames, "frames_source": frames_source, "input_size": list(model.encoder.input_size),
        "image_size": int(model.encoder.input_size[0]), "amp_dtype": precision_name(amp),
        "head": model.head.config(), "head_init_source": model.head_init_source, "head_stats": head_stats,
        "head_lr": head_lr, "head_weight_decay": head_wd, "weights_source": model.encoder.weights_source,
        "split_sha256": split.sha256, "train_videos": len(train_items), "val_videos": len(val_items),
        "world_size": dist.world, "optimizer": "AdamW", "early_stopping": f"val {cfg.monitor}",
        "scheduler": f"ReduceLROnPlateau(val {cfg.monitor}, factor 0.1)", "checkpoint": cfg.best_path.name,
        "train_augment": train_augment_spec(),
        "augment_policy": augment_spec(cfg.augment), "crop": crop_provenance(cfg.crop),
        "pseudo_fakes_policy": None if cfg.pseudo is None else cfg.pseudo.record(),
    }
    if cfg.fold is not None:
        resolved["folds"] = split.folds
        if dist.main and model.head_init_source == "default" and cfg.head_init == "auto":
            log.info("fold %d: no tuned head fits in %s; starting from a fresh head", cfg.fold, out)

    # --- resume (a finished run returns here, before face detection and data loading)
    last = None
    if cfg.resume != "no" and cfg.last_path.is_file():
        last = load_last(cfg.last_path)
        diff = config_difference(last["config"], resolved)
        if diff:
            raise TrainError(f"{cfg.last_path} was made with other settings: {'; '.join(diff)}. Rerun with those "
                             "settings to continue it, or pass --resume no to start over (it will be replaced).")
        if finished(last, cfg.epochs):
            log.warning("%s: this run already finished at epoch %d (%s); nothing to train. Pass --resume no to "
                        "train again, or more --epochs to extend a run that stopped at its epoch limit.",
                        cfg.last_path, last["epoch"], last["stop_reason"])
            return _finished_result(cfg, last, main=dist.main)
    elif cfg.resume == "yes":
        raise TrainError(f"--resume: no {cfg.last_path} to continue from; run without --resume to start.")

    # --- face crops: boxes depend on the video alone, so detect once here (on the CPU, in `cfg.workers`
    # processes), not in every epoch's decoding workers; the prepared detections travel with the datasets.
    faces = face_cropper(cfg.crop, "cpu")
    if faces is not None:
        t_faces = time.perf_counter()
        undecodable = faces.prepare([it.path for it in [*train_items, *val_items]], workers=cfg.workers)
        log.info("face detection on %d videos: %.1f s (%d could not be decoded)", len(train_items) + len(val_items),
                 time.perf_counter() - t_faces, len(undecodable))

    history: list[dict[str, Any]] = []
    es = {"best": [math.inf], "best_epoch": 0, "bad_epochs": 0}  # best: the monitored score, lower is better
    start_epoch, elapsed_before, resumed_from, stop_reason = 1, 0.0, 0, ""
    if last is not None:
        model.load_state_dict(last["model_state_dict"])
        optimizer.load_state_dict(last["optimizer_state_dict"])
        scheduler.load_state_dict(last["scheduler_state_dict"])
        scaler.load_state_dict(last["scaler_state_dict"])
        history, es = list(last["history"]), dict(last["early_stopping"])
        es.setdefault("best", [es.pop("best_val_loss", math.inf)])  # last.pt files from before --monitor
        start_epoch = int(last["epoch"]) + 1
        resumed_from = int(last["epoch"])
        elapsed_before = float(last["elapsed_seconds"])
        set_rng_state(last["rng"], device)
        log.info("resuming from %s after epoch %d", cfg.last_path, resumed_from)
    else:
        if head_stats == "train":
            n = calibrate_head_stats(model, train_items, frames=frames, device=device, amp_dtype=amp, seed=cfg.seed,
                                     faces=faces)
            log.info("head input statistics recomputed from %d train-mode frames", n)
        torch.manual_seed(cfg.seed + 1)  # the data loaders' and dropout's stream, independent of the init's

    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- loaders (workers decode; the sampler hands them (epoch, index) keys)
    size = tuple(unwrap(model).encoder.input_size)
    train_ds = train_dataset(train_items, frames=frames, size=size, seed=cfg.seed, faces=faces,
                             augment=cfg.augment, pseudo=cfg.pseudo)
    val_ds = eval_dataset(val_items, frames=frames, size=size, faces=faces)
    if cfg.pseudo is not None:  # each twinned real next to its pseudo-fake twin
        train_sampler = PseudoFakeSampler(train_ds, world=dist.world, rank=dist.rank, seed=cfg.seed,
                                          balanced=cfg.balanced)
    else:
        train_sampler = EpochSampler(train_ds, world=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed,
                                     labels=[it.label for it in train_items] if cfg.balanced else None)
    val_sampler = EpochSampler(val_ds, world=dist.world, rank=dist.rank, shuffle=False, seed=cfg.seed)

    def loader(ds, sampler) -> ClipLoader:  # a video whose worker crashes, hangs or runs out of memory is skipped
        return ClipLoader(ds, sampler, batch_size=cfg.batch_size, collate=CollateClips(frames, size),
                          workers=cfg.workers, pin_memory=device.type == "cuda", pin_device=device.index)

    train_loader, val_loader = loader(train_ds, train_sampler), loader(val_ds, val_sampler)
    guard = guard or GpuGuard(temp_pause_c=cfg.temp_pause_c, temp_resume_c=cfg.temp_resume_c,
                              vram_warn_frac=cfg.vram_warn_frac, empty_cache_each_video=cfg.empty_cache_each_video,
                              max_wait_s=cfg.thermal_max_wait_s, device_index=device.index or 0, log=log.warning)
    if dist.enabled:  # one 3-number all_reduce per guard check (per micro-step and per validation batch)
        guard.reduce_max = functools.partial(all_max, dist=dist, device=device)
    ctx = StepContext(device=device, amp_dtype=amp, scaler=scaler, guard=guard, dist=dist, frames=frames,
                      min_frames=cfg.min_frames)
    if dist.main:
        fold = "" if cfg.fold is None else f" fold {cfg.fold} of {split.folds}"
        log.info("train-full%s: %d train / %d val videos, %d frames at %s, batch %d x accum %d x %d process(es), "
                 "precision %s, augment %s, pseudo-fakes %s (train on %s), device %s; outputs in %s", fold,
                 len(train_items), len(val_items), frames, size, cfg.batch_size, cfg.accum_steps, dist.world,
                 resolved["amp_dtype"], cfg.augment, cfg.pseudo_fakes or "off", cfg.train_on, device, out)
        log.info("resolved config: %s", json.dumps(resolved, sort_keys=True))

    # --- epochs
    best_path, last_path = cfg.best_path, cfg.last_path
    summary_path, curves_path = out / TRAINING_SUMMARY_FILE, out / TRAINING_CURVES_FILE

    def summarise(elapsed: float) -> None:
        write_summary(summary_path, resolved=resolved, history=history, es=es, elapsed=elapsed,
                      stop_reason=stop_reason, resumed_from=resumed_from, guard=guard.summary(),
                      oom_events=ctx.oom_events, skipped=ctx.skipped, best_name=best_path.name,
                      curves_name=curves_path.name)

    t_run = time.perf_counter()
    best_val: tuple[np.ndarray, np.ndarray] | None = None  # the best epoch's (labels, logits), for calibration
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop_reason:
            break
        train_sampler.set_epoch(epoch)
        try:
            tr = train_one_epoch(model, train_loader, optimizer, ctx, epoch=epoch, accum_steps=cfg.accum_steps,
                                 show=dist.main)
            va = evaluate(model, val_loader, ctx, show=dist.main)
        except ThermalTimeout as exc:  # every rank at once; stop the way an interrupted run does
            raise _thermal_stop(exc, cfg, done=epoch - 1, main=dist.main) from None
        lrs = [g["lr"] for g in optimizer.param_groups]
        score = _monitored(va, cfg.monitor)
        scheduler.step(score[0])
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "train_auc": tr["auc"],
               "val_loss": va["loss"], "val_acc": va["acc"], "val_auc": va["auc"], "val_f1": va["f1"],
               "val_prob_spread": va["prob_spread"], "lr": lrs[0], "head_lr": lrs[1],
               "train_seconds": round(tr["seconds"], 3), "frames": ctx.frames}
        history.append(row)
        improved = score < tuple(es["best"])
        if improved:
            es = {"best": list(score), "best_epoch": epoch, "bad_epochs": 0}
            best_val = (va["y"], va["z"])
        else:
            es["bad_epochs"] += 1
        if es["bad_epochs"] >= cfg.es_patience:
            stop_reason = "early_stopping"
        elif epoch == cfg.epochs:
            stop_reason = "max_epochs"
        elapsed = elapsed_before + time.perf_counter() - t_run
        if dist.main:
            log.info("epoch %d/%d: train loss %.4f acc %s auc %s | val loss %.4f acc %.3f auc %s f1 %.3f | lr %.2e | "
                     "%.1f s%s", epoch, cfg.epochs, tr["loss"], fmt_score(tr["acc"]), fmt_score(tr["auc"]), va["loss"],
                     va["acc"], fmt_score(va["auc"]), va["f1"], lrs[0], tr["seconds"], " (best)" if improved else "")
            model_state = unwrap(model).state_dict()
            scores = {"val_acc": float(va["acc"]), "val_f1": float(va["f1"]), "val_auc": _num(va["auc"])}
            if improved:
                DetectorCheckpoint(epoch=epoch, model_state_dict=model_state, config=resolved,
                                   optimizer_state_dict=optimizer.state_dict(), history=history,
                                   **scores).save(best_path)
            save_torch({"format": LAST_FORMAT, "epoch": epoch, "model_state_dict": model_state,
                        "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
                        "scaler_state_dict": scaler.state_dict(), "early_stopping": es, "history": history,
                        "config": resolved, "rng": rng_state(device), "elapsed_seconds": elapsed,
                        "finished": bool(stop_reason), "stop_reason": stop_reason, **scores}, last_path)
            summarise(elapsed)
            fold_name = "" if cfg.fold is None else f" fold {cfg.fold}"
            plot_curves(history, curves_path, title=f"{cfg.short_name} train-full{fold_name} ({frames} frames, "
                        f"{resolved['image_size']} px, seed {cfg.seed}, augment {cfg.augment}"
                        + (f", pseudo-fakes {cfg.pseudo_fakes}, train on {cfg.train_on})" if cfg.pseudo_fakes else ")"))
        barrier(dist)  # nobody starts the next epoch before the files of this one exist
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    if dist.main:
        if not history:
            raise TrainError(f"no epoch was run (--epochs {cfg.epochs} already reached); nothing written. Pass more "
                             "--epochs, or --resume no to start over.")
        elapsed = elapsed_before + time.perf_counter() - t_run
        summarise(elapsed)
        if best_val is not None:  # else the best epoch was before a resume: its checkpoint keeps its calibration
            ckpt = DetectorCheckpoint.load(best_path)
            ckpt.config = {**ckpt.config, "calibration": fit_calibration(best_val[1], best_val[0])}
            ckpt.save(best_path)
            log.info("calibration: temperature %.3f fitted on the best epoch's %d validation videos (log loss %.4f "
                     "-> %.4f)", ckpt.config["calibration"]["temperature"], len(best_val[0]),
                     ckpt.config["calibration"]["log_loss_before"], ckpt.config["calibration"]["log_loss_after"])
        best = history[es["best_epoch"] - 1] if es["best_epoch"] else history[-1]
        log.info("done (%s) after epoch %d in %.0f s; best epoch %d: val loss %.4f, AUC %s, acc %.3f -> %s",
                 stop_reason or "stopped", history[-1]["epoch"], elapsed, es["best_epoch"], best["val_loss"],
                 fmt_score(best["val_auc"]), best["val_acc"], best_path)
    return TrainResult(best_path=best_path, last_path=last_path, summary_path=summary_path, curves_path=curves_path,
                       best_epoch=int(es["best_epoch"]), epochs_run=len(history), stop_reason=stop_reason,
                       history=history, resumed_from=resumed_from, skipped=dict(ctx.skipped),
                       oom_events=list(ctx.oom_events), main=dist.main, fold=cfg.fold)


def _monitored(va: dict[str, Any], monitor: str) -> tuple[float, ...]:
    """The epoch's score for the best checkpoint and early stopping, lower is better (the LR plateau follows its
    first number): the validation loss, or minus the validation AUC (+inf when undefined: one class) and then the
    loss, which decides between epochs of equal AUC (an AUC of 1.000 is reached early and kept)."""
    if monitor == "auc":
        auc = -float(va["auc"]) if va["auc"] is not None and math.isfinite(va["auc"]) else math.inf
        return auc, float(va["loss"])
    return (float(va["loss"]),)


def _thermal_stop(exc: ThermalTimeout, cfg: TrainConfig, *, done: int, main: bool) -> ThermalTimeout:
    """The guard's message and where the run stands (last.pt is written at every epoch end, `done` the last)."""
    stop = ThermalTimeout(f"{exc} Training stopped: " + (
        f"{cfg.last_path} holds epoch {done}; the same command continues from it (epoch {done + 1} is redone)."
        if done else "no epoch had finished (no last.pt), so the same command starts over."))
    if main:
        log.error("%s", stop)
    return stop


def _finished_result(cfg: TrainConfig, last: dict[str, Any], *, main: bool) -> TrainResult:
    """What a finished run (its ``last.pt``) ended with; nothing is trained and no file is touched."""
    out = cfg.out_dir
    return TrainResult(best_path=cfg.best_path, last_path=cfg.last_path, summary_path=out / TRAINING_SUMMARY_FILE,
                       curves_path=out / TRAINING_CURVES_FILE, best_epoch=int(last["early_stopping"]["best_epoch"]),
                       epochs_run=len(last["history"]), stop_reason=last["stop_reason"],
                       history=list(last["history"]), resumed_from=int(last["epoch"]), main=main, fold=cfg.fold)


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)
