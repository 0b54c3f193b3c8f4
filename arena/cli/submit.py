"""`arena submit` and `arena evaluate`: the full-video path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from arena.cli._config import RUNS_DIR, long_command
from arena.cli._main import main
from arena.cli._options import (
    decoder_option,
    device_option,
    frame_batch_option,
    model_crop_options,
    views_on_option,
    workers_option,
)
from arena.limits import MAX_FRAMES

_MODEL_KINDS = ["auto", "finetuned", "head-only"]


def _precision(amp: bool) -> str:
    """``--amp`` is the one precision policy's ``auto`` (bf16/fp16 only where the hardware runs it natively)."""
    return "auto" if amp else "fp32"


def _model_options(f):
    """--models, --checkpoint, --ensemble, --model, --frames, --crop, --max-faces, --device, --decoder, --views-on,
    --workers, --frame-batch, --amp, --no-calibration: which models, and how the full-video path runs."""
    f = click.option("--calibration/--no-calibration", default=True, show_default=True,
                     help="Divide the logits by the temperature stored with the model (fitted on validation "
                          "predictions); --no-calibration: T = 1.")(f)
    f = click.option("--amp/--no-amp", default=True, show_default=True,
                     help="Autocast where the hardware runs it natively (bf16/fp16 on CUDA, bf16 on CPUs with "
                          "AVX512-BF16/AMX, else float32); --no-amp: always float32.")(f)
    f = frame_batch_option(f)
    f = workers_option(f)
    f = views_on_option()(f)
    f = decoder_option()(f)
    f = device_option(f)
    f = model_crop_options(f)
    f = click.option("--frames", type=click.IntRange(1, MAX_FRAMES), default=None,
                     help="Frames per video [default: frame_test.json's recommendation, else 24].")(f)
    f = click.option("--model", "kind", type=click.Choice(_MODEL_KINDS), default="auto", show_default=True,
                     help="Which model of each --models folder; auto: the fine-tuned checkpoint when present, else "
                          "the tuned head.")(f)
    f = click.option("--ensemble", type=click.Choice(["prob", "logit"]), default="prob", show_default=True,
                     help="Several members: average their calibrated probabilities (prob) or calibrated logits "
                          "(logit).")(f)
    f = click.option("--checkpoint", "checkpoints", type=click.Path(dir_okay=False), multiple=True,
                     help="One checkpoint, exactly: best_head.pt (head-only) or <backbone>_best.pt (fine-tuned); "
                          "frames from its folder's frame_test.json. Repeatable; adds ensemble members.")(f)
    f = click.option("--models", type=click.Path(file_okay=False), multiple=True,
                     help="Models folder: <backbone>_best.pt (train-full) or best_head.pt (tune-head); a folds/ "
                          "folder, or a K-fold study's folder without a model of its own, gives one member per "
                          "fold. Repeatable: several members are averaged (--ensemble).")(f)
    return f


def _evaluate_runs(params: dict[str, Any]) -> Path | None:
    """Beside evaluation.json: --out's folder, else the first models folder (a folds/ folder's parent), else the first
    checkpoint's folder (`arena.evaluate`'s rule); None when there is none (evaluate refuses that), or when that
    folder, an input, does not exist (no stray folder for a mistyped path)."""
    from arena.models_folder import FOLDS_DIR

    if params["out"] is not None:
        return Path(params["out"]).parent / RUNS_DIR
    if params["models"]:
        first = Path(params["models"][0])
        folder = first.parent if first.name == FOLDS_DIR else first
    elif params["checkpoints"]:
        folder = Path(params["checkpoints"][0]).parent
    else:
        return None
    return folder / RUNS_DIR if folder.is_dir() else None


@main.command("submit")
@long_command(lambda params: Path(params["out"]).parent / RUNS_DIR)
@click.option("--data", "data", type=click.Path(file_okay=False), required=True,
              help="Data folder with test_public.csv and test/.")
@click.option("--out", type=click.Path(dir_okay=False), default="SUBMISSION_DIRECTORY/PREDICTIONS.CSV",
              show_default=True, help="The submission CSV; predictions_detail.csv is written beside it.")
@_model_options
@click.option("--tta/--no-tta", default=True, show_default=True, help="Average the five TTA variants.")
@click.option("--verify", "verify", type=click.Path(), multiple=True,
              help="Feature cache to verify the full path against (fails above 1e-3 in p_fake). Repeatable: each "
                   "ensemble member is verified against the cache that fits it.")
@click.option("--verify-sample", type=click.IntRange(min=1), default=8, show_default=True,
              help="Test videos compared by --verify.")
@click.option("--verify-all", is_flag=True, help="Compare every test video with --verify.")
@click.option("--clip", type=click.FloatRange(0.0, 0.5, min_open=True, max_open=True), default=None,
              help="Write P(fake) clipped to [EPS, 1-EPS] (log-loss leaderboards) [default: no clipping].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (torch, verification sample).")
def submit_cmd(data: str, out: str, models: tuple[str, ...], checkpoints: tuple[str, ...], ensemble: str, kind: str,
               frames: int | None, crop: str | None, max_faces: int | None, device: str, decoder: str,
               views_on: str, workers: int, frame_batch: int, amp: bool, calibration: bool, tta: bool,
               verify: tuple[str, ...], verify_sample: int, verify_all: bool, clip: float | None, seed: int) -> None:
    """Predict every test video (decode -> 5 TTA views -> backbone -> head), validate and write the CSV.

    Exit status: 0 complete; 3 complete and valid, but some rows are 0.5 because their video could not be
    predicted (listed in predictions_detail.csv); 1 nothing written (the previous CSV is untouched).

    --verify decodes as the cache was built (its provenance), whatever --decoder and --views-on say.

    Under torchrun each process loads the models and predicts its share of the test videos on GPU LOCAL_RANK (or
    the CPU); rank 0 writes the same CSV one process writes, verifies and reports (its exit status is the one
    above; torchrun itself then exits 1 for 3).
    """
    from arena.submit import make_submission

    result = make_submission(data=data, models=models, checkpoints=checkpoints, ensemble=ensemble, out=out,
                             kind=kind, frames=frames, tta=tta, device=device, workers=workers,
                             frame_batch=frame_batch, precision=_precision(amp), verify=verify,
                             verify_sample=None if verify_all else verify_sample, seed=seed, echo=click.echo,
                             crop=crop, max_faces=max_faces, calibration=calibration, clip=clip, decoder=decoder,
                             views_on=views_on)
    if result is None:
        return  # under torchrun, a rank other than 0: rank 0 writes, reports and sets the exit status
    failed = [p for p in result.predictions if p.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} row(s) are 0.5 because the video could not be predicted (see "
                   f"{result.report.detail_path}).")
        raise SystemExit(3)  # the CSV is complete and valid, but some rows carry no prediction


@main.command("evaluate")
@long_command(_evaluate_runs)
@click.option("--data", "data", type=click.Path(file_okay=False), required=True, help="Data folder.")
@click.option("--split", type=click.Choice(["val"]), default="val", show_default=True,
              help="Evaluate on the persisted validation split (unless --labels is given).")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="CSV of test labels (e.g. the demo's test_labels.csv): evaluate on the test videos instead.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON output [default: evaluation.json in the first --models folder (a folds/ folder's parent), "
                   "else in the first checkpoint's folder]; attention PNGs go to its folder's attention/.")
@click.option("--attention", multiple=True, help="Video key for the attention report (repeatable).")
@click.option("--attention-first", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also report attention for the first N evaluated videos.")
@_model_options
@click.option("--seed", type=int, default=0, show_default=True)
def evaluate_cmd(data: str, split: str, labels: str | None, out: str | None, attention: tuple[str, ...],
                 attention_first: int, models: tuple[str, ...], checkpoints: tuple[str, ...], ensemble: str,
                 kind: str, frames: int | None, crop: str | None, max_faces: int | None, device: str, decoder: str,
                 views_on: str, workers: int, frame_batch: int, amp: bool, calibration: bool, seed: int) -> None:
    """AUC, log loss, accuracy, F1 and confusion with and without TTA; log loss, Brier score and calibration error
    before and after calibration (reliability.png beside the JSON); attention report for chosen videos.

    Several members (--models/--checkpoint): the metrics of the ensemble and of each member. Fold members with
    --split val: out-of-fold, each fold's validation videos scored by that fold's member.

    Exit status: 0 complete; 3 written, but some videos could not be predicted (counted as 0.5).
    """
    from arena.distributed import launched
    from arena.errors import OptionError
    from arena.evaluate import evaluate, metrics_lines

    if launched().enabled:  # every process would evaluate everything and write the same files
        raise OptionError("arena evaluate runs in one process: start it without torchrun (or with --nproc-per-node "
                          "1).")

    result = evaluate(data=data, models=models, checkpoints=checkpoints, ensemble=ensemble, split=split,
                      labels=labels, out=out, attention=attention, attention_first=attention_first, kind=kind,
                      frames=frames, device=device, workers=workers, frame_batch=frame_batch,
                      precision=_precision(amp), seed=seed, crop=crop, max_faces=max_faces, calibration=calibration,
                      echo=click.echo, decoder=decoder, views_on=views_on)
    for line in metrics_lines(result):
        click.echo(line)
    if result["failed"]:
        click.echo(f"{len(result['failed'])} video(s) could not be predicted and count as 0.5 in the metrics.")
        raise SystemExit(3)
