"""`arena train-full`: end-to-end fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from arena.cli._config import RUNS_DIR, long_command
from arena.cli._main import main
from arena.cli._options import (
    backbone_options,
    crop_options,
    device_option,
    face_config,
    train_pseudo_options,
    video_batch_option,
    workers_option,
)
from arena.limits import MAX_FRAMES


def _fold_value(ctx: click.Context, param: click.Parameter, value: str | None) -> int | str | None:
    """``--fold``: a fold number or ``all`` (whether the split has that fold is checked against split.json)."""
    if value is None or value == "all":
        return value
    try:
        fold = int(value)
    except ValueError:
        fold = -1
    if fold < 0:
        raise click.BadParameter(f"{value!r} is neither a fold number (0, 1, ...) nor all.")
    return fold


def _train_runs(params: dict[str, Any]) -> Path:
    """Beside train-full's outputs: the fold's folder with --fold I (once the split is known to have it, so that no
    stray fold folder is made), else the models folder."""
    from arena.models_folder import fold_dir
    from arena.train_config import check_fold

    fold = params["fold"]
    if isinstance(fold, int):
        check_fold(params["models"], fold)
        return fold_dir(params["models"], fold) / RUNS_DIR
    return Path(params["models"]) / RUNS_DIR


def _max_wait_value(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """``--thermal-max-wait``: seconds >= 0, or ``none`` for no limit."""
    if value.strip().lower() == "none":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise click.BadParameter(f"{value!r} is neither a number of seconds >= 0 nor none.")
    return seconds


@main.command("train-full")
@long_command(_train_runs)
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Output folder (split.json, frame_test.json and best_head.pt are read from it when present).")
@click.option("--fold", default=None, metavar="I|all", callback=_fold_value,
              help="Train fold I of the K-fold split in MODELS/split.json (`arena split --folds K`): train on the "
                   "other folds, validate on fold I, outputs (and the starting best_head.pt, frame_test.json) in "
                   "MODELS/folds/fold_I. all: every fold in turn; finished folds are skipped.")
@backbone_options
@click.option("--frames", type=click.IntRange(1, MAX_FRAMES), default=None,
              help="Frames per video; default: frame_test.json's recommendation, else 24.")
@video_batch_option(1, help="Videos per step (each of --frames frames).", maximum=256)
@click.option("--accum-steps", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Gradient accumulation steps (effective batch = batch size x steps x processes).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="AdamW learning rate of the backbone (and of the head without a tuned one).")
@click.option("--head-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Head learning rate; default: the tuned head's, else --lr.")
@click.option("--weight-decay", type=click.FloatRange(0), default=1e-5, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 10_000), default=30, show_default=True, help="At most this many.")
@click.option("--lr-patience", type=click.IntRange(0), default=2, show_default=True,
              help="ReduceLROnPlateau patience on the --monitor score (epochs).")
@click.option("--es-patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early stopping patience on the --monitor score (epochs).")
@click.option("--monitor", type=click.Choice(["loss", "auc"]), default="loss", show_default=True,
              help="Validation score that picks the best checkpoint and drives early stopping and the LR plateau. "
                   "auc suits --train-on real: a model of pseudo-fakes ranks real fakes well before its "
                   "probabilities are calibrated (the checkpoint's temperature still fixes those).")
@click.option("--amp", type=click.Choice(["auto", "fp32", "bf16", "fp16", "off"]), default="auto", show_default=True,
              help="Autocast precision. auto: bf16 where the hardware runs it natively (CUDA GPUs with bf16, CPUs "
                   "with AVX512-BF16/AMX), fp16 with a GradScaler on older CUDA GPUs, else fp32; fp16 needs CUDA; "
                   "off = fp32.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
              help="Recompute backbone activations in backward (the seed's settings in 4 GB of VRAM).")
@click.option("--head-init", type=click.Choice(["auto", "tuned", "default"]), default="auto", show_default=True,
              help="auto: start from tune-head's best_head.pt when it exists.")
@click.option("--head-stats", type=click.Choice(["auto", "keep", "train"]), default="auto", show_default=True,
              help="Head input standardisation: keep the tuned one, or recompute it from train-mode features "
                   "(auto: recompute for a tuned head on a random-init backbone).")
@click.option("--balanced/--no-balanced", default=True, show_default=True,
              help="Class-balanced training order: real and fake clips alternate, so each batch holds both.")
@click.option("--augment", type=click.Choice(["none", "light", "strong"]), default="none", show_default=True,
              help="Degrade training clips as test videos are (JPEG recompression, downscaling, blur, noise, "
                   "colour; one draw per clip): light or strong. Validation and submit never are.")
@train_pseudo_options
@device_option
@workers_option
@click.option("--resume", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              is_flag=False, flag_value="yes",
              help="auto: continue an unfinished last.pt with the same settings; --resume: require it; no: start over.")
@click.option("--limit-train", type=click.IntRange(2), default=None, help="At most N training videos (quick runs).")
@click.option("--limit-val", type=click.IntRange(2), default=None, help="At most N validation videos.")
@click.option("--min-frames", type=click.IntRange(1, MAX_FRAMES), default=4, show_default=True,
              help="Fewest frames an out-of-memory retry may fall back to.")
@click.option("--temp-pause", type=click.FloatRange(30, 110), default=78.0, show_default=True,
              help="Pause when the GPU reaches this temperature (°C).")
@click.option("--temp-resume", type=click.FloatRange(20, 105), default=72.0, show_default=True,
              help="Resume when it has cooled to this (°C).")
@click.option("--thermal-max-wait", default="1800", show_default=True, metavar="SECONDS|none",
              callback=_max_wait_value,
              help="Longest thermal pause: a GPU still above --temp-resume after it stops the run (exit 75) with "
                   "last.pt kept, so the same command continues later; 0 stops at once, none waits without limit.")
@click.option("--vram-warn", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Warn and empty the CUDA cache at this fraction of VRAM in use.")
@click.option("--empty-cache-each-video/--no-empty-cache-each-video", default=False, show_default=True)
@crop_options
def train_full_cmd(data, models, fold, backbone, pretrained, weights, image_size, seed, frames, batch_size,
                   accum_steps, lr, head_lr, weight_decay, epochs, lr_patience, es_patience, monitor, amp,
                   grad_checkpointing,
                   head_init, head_stats, balanced, augment, pseudo_fakes, train_on, device, workers, resume,
                   limit_train, limit_val, min_frames, temp_pause, temp_resume, thermal_max_wait, vram_warn,
                   empty_cache_each_video, crop, face_detector, face_margin, detect_size, detect_frames, max_faces):
    """Fine-tune backbone + attention head end to end (resumable; DDP under torchrun -m arena train-full).

    Under torchrun each process uses GPU LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES); --device cuda:N
    is for one process per machine. With --fold every process trains the same fold.
    """
    import logging

    from arena.errors import ThermalTimeout
    from arena.train import train
    from arena.train_config import TrainConfig
    from arena.train_folds import train_folds

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(
        data=data, models=models, backbone=backbone, pretrained=pretrained and weights is None, weights=weights,
        image_size=image_size, frames=frames, batch_size=batch_size, accum_steps=accum_steps, lr=lr,
        head_lr=head_lr, weight_decay=weight_decay, epochs=epochs, lr_patience=lr_patience,
        es_patience=es_patience, monitor=monitor, amp=amp, grad_checkpointing=grad_checkpointing, head_init=head_init,
        head_stats=head_stats, balanced=balanced, workers=workers, seed=seed, device=device, resume=resume,
        limit_train=limit_train, limit_val=limit_val, min_frames=min_frames, temp_pause_c=temp_pause,
        temp_resume_c=temp_resume, thermal_max_wait_s=thermal_max_wait, vram_warn_frac=vram_warn,
        empty_cache_each_video=empty_cache_each_video,
        crop=face_config(crop, face_detector, face_margin, detect_size, detect_frames, max_faces), augment=augment,
        pseudo_fakes=None if pseudo_fakes is None else pseudo_fakes.spec, train_on=train_on,
        fold=None if fold == "all" else fold,
    )
    # An ArenaError (data, split, fold, weights, options, resume mismatch) is printed by the group.
    try:
        results = train_folds(cfg) if fold == "all" else [train(cfg)]
    except ThermalTimeout as exc:  # not a fault of the input: its own status, "rerun when cooled"
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(exc.exit_status) from None
    for result in results:
        if result.main:
            for line in result.lines():
                click.echo(line)
    if any(result.skipped for result in results):
        raise SystemExit(3)  # outputs complete, but some videos could not be decoded (listed above)
