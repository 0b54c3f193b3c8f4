"""Head tuning from the cache: `arena tune-head` and `arena frame-test`."""

from __future__ import annotations

from pathlib import Path

import click

from arena.cli._config import long_command, runs_in
from arena.cli._main import main
from arena.cli._options import device_option, parse_frame_counts, video_batch_option


def _tune_frames(ctx, param, value: str | None) -> tuple[int, ...] | None:
    return None if value is None else parse_frame_counts(ctx, param, value)


def _tune_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command("tune-head")
@long_command(runs_in("models"))
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True,
              help="Feature cache written by `arena features`.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder (for the split; test videos are never read).")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Holds split.json; receives best_head.pt, best_head_params.json, study_summary.json, plots.")
@click.option("--n-trials", type=click.IntRange(min=1), default=50, show_default=True,
              help="Total target of finished (complete or pruned) trials in the study; a rerun resumes up to it.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting new trials after this many seconds (this run).")
@click.option("--storage", default=None,
              help="Optuna storage: journal:<file> (several workers, one machine), postgresql://... (several "
                   "machines) or sqlite:///<file>. Default: sqlite:///<models>/optuna.db.")
@click.option("--study-name", default=None,
              help="Default: head-<first 8 hex digits of split.json's sha256>, so a new split starts a new study.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every head's training.")
@click.option("--frames", default=None, callback=_tune_frames,
              help="Candidate frame counts, e.g. 24,32,48 (default: every frame count in the cache).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Maximum epochs per trial (early stopping usually ends sooner).")
@click.option("--patience", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Epochs without validation improvement before a trial stops.")
@video_batch_option(64, help="Videos per training step of each head.")
@device_option
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="torch CPU threads (default: torch's choice; use 1 per worker when several workers share cores).")
@click.option("--crop", type=click.Choice(["none", "faces"]), default=None,
              help="Check that the cache was built with this crop mode (the head inherits the cache's crops).")
@click.option("--cv/--no-cv", default=None,
              help="On a K-fold split (`arena split --folds K`): score each trial by the out-of-fold log loss of its K "
                   "fold heads and write them to folds/fold_<i>/ (default), or --no-cv: the holdout objective on fold "
                   "0's train/validation parts.")
@click.option("--pseudo-fakes/--no-pseudo-fakes", default=True, show_default=True,
              help="Train the heads on the cache's pseudo-fake items (`arena features --pseudo-fakes`) of their "
                   "training videos too, when it has any (never validated on; the study is named ...-sbi).")
@click.option("--pruner", type=click.Choice(["auto", "median", "halving", "none"]), default="auto", show_default=True,
              help="How unpromising trials stop early: median (worse than the median of earlier trials at the same "
                   "epoch, from epoch 2), halving (successive halving: only the best third goes past epochs 2, 4, "
                   "10, 28), none; auto = halving for an out-of-fold study, median for a holdout one.")
def tune_head_cmd(cache, data, models, n_trials, timeout, storage, study_name, seed, frames, epochs, patience,
                  batch_size, device, threads, crop, cv, pseudo_fakes, pruner):
    """Optuna search over the attention head on cached features; objective: validation log loss (out-of-fold on a
    K-fold split)."""
    from arena.models_folder import (
        BEST_HEAD_FILE,
        BEST_PARAMS_FILE,
        FOLD_PREFIX,
        FOLDS_DIR,
        OOF_FILE,
        STUDY_SUMMARY_FILE,
    )
    from arena.study import tune_head

    _tune_threads(threads)
    try:
        s = tune_head(cache, data, models, n_trials=n_trials, timeout=timeout, storage=storage, study_name=study_name,
                      seed=seed, frames=frames, epochs=epochs, patience=patience, batch_size=batch_size, device=device,
                      crop=crop, cv=cv, pseudo=pseudo_fakes, pruner=pruner)
    except KeyboardInterrupt:
        click.echo("interrupted: finished trials are kept in the study and the interrupted one is queued again; "
                   "run the same command to continue.", err=True)
        raise SystemExit(130) from None
    states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s["states"].items()))
    click.echo(f"study {s['study_name']!r} ({s['storage']}): {s['n_trials']} trials ({states}, pruner "
               f"{s['pruner']}); this run {s['this_run_seconds']:.1f} s")
    if s.get("best_trial"):
        b = s["best_trial"]
        a = {k: b["user_attrs"].get(k, float("nan")) for k in ("auc", "accuracy", "f1")}
        what = f"out-of-fold ({s['folds']} folds)" if "cv" in s else "val"
        click.echo(f"best trial #{b['number']}: {what} log loss {b['value']:.4f}, AUC {a['auc']:.4f}, "
                   f"accuracy {a['accuracy']:.3f}, F1 {a['f1']:.3f}")
        click.echo(f"params: {b['params']}")
        if s.get("pseudo_fakes"):
            click.echo(f"trained on {s['pseudo_fakes']['items_used']} pseudo-fake items of the training videos too")
        if "cv" in s:
            cv_out, cal = s["cv"], s["cv"]["calibration"]
            click.echo("per fold: " + ", ".join(f"{f['fold']}: log loss {f['log_loss']:.4f}, AUC "
                                               + ("-" if f["auc"] is None else f"{f['auc']:.4f}")
                                               for f in cv_out["per_fold"]))
            click.echo(f"temperature {cal['temperature']:.3f} (fitted out of fold): log loss "
                       f"{cal['log_loss_before']:.4f} -> {cal['log_loss_after']:.4f}")
            click.echo(f"wrote {len(cv_out['fold_heads'])} fold heads ({Path(models) / FOLDS_DIR}/{FOLD_PREFIX}<i>/"
                       f"{BEST_HEAD_FILE}), {OOF_FILE}, {BEST_PARAMS_FILE}, {STUDY_SUMMARY_FILE}")
            for path in cv_out["removed"]:
                click.echo(f"removed {path} (left by an earlier study; the fold heads are this folder's models)")
        else:
            click.echo(f"wrote {Path(models) / BEST_HEAD_FILE}, {BEST_PARAMS_FILE}, {STUDY_SUMMARY_FILE}")
    else:
        click.echo(f"no complete trial yet: nothing written but {STUDY_SUMMARY_FILE}")
    if s.get("skipped_videos"):
        click.echo(f"skipped {len(s['skipped_videos'])} video(s) whose features failed (see {STUDY_SUMMARY_FILE})")
    for name, where in s.get("plots", {}).items():
        if where.startswith("skipped"):
            click.echo(f"{name}: {where}")
    if not s.get("reached_target"):
        click.echo(f"target of {n_trials} finished trials not reached (timeout); run the command again to continue.")
    if not s.get("best_trial"):
        raise SystemExit(1)


@main.command("frame-test")
@long_command(runs_in("models"))
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder (for the split).")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Holds best_head_params.json from tune-head; receives frame_test.json.")
@click.option("--frames", default=None, callback=_tune_frames,
              help="Frame counts to compare (default: every frame count in the cache).")
@click.option("--seed", type=int, default=None, help="Default: the study's seed.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="Default: the study's maximum.")
@click.option("--patience", type=click.IntRange(1, 1000), default=None, help="Default: the study's patience.")
@device_option
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="torch CPU threads.")
@click.option("--cv/--no-cv", default=None,
              help="On a K-fold split: compare by the out-of-fold log loss of the K fold heads and write "
                   "frame_test.json to every fold folder too (default unless the study was --no-cv), or by fold 0's "
                   "validation.")
def frame_test_cmd(cache, data, models, frames, seed, epochs, patience, device, threads, cv):
    """Compare frame counts with the tuned head on the validation split (out of fold on a K-fold split); recommends
    by log loss."""
    from arena.frame_test import frame_test

    _tune_threads(threads)
    out = frame_test(cache, data, models, frames=frames, seed=seed, epochs=epochs, patience=patience, device=device,
                     cv=cv)
    click.echo(f"{'frames':>6}  {'AUC':>6}  {'log loss':>8}  {'accuracy':>8}  {'avg conf (seed)':>15}")
    for k, r in out["results"].items():
        auc = "-" if r["auc"] is None else f"{r['auc']:.4f}"
        click.echo(f"{k:>6}  {auc:>6}  {r['log_loss']:>8.4f}  {r['accuracy']:>8.3f}  {r['mean_confidence']:>15.4f}")
    what = f"out-of-fold log loss, {out['folds']} folds" if "folds" in out else "validation log loss"
    click.echo(f"recommended: {out['recommended_frames']} frames (lowest {what}); the seed's criterion "
               f"(average confidence) would pick {out['seed_criterion_pick']}. Wrote {', '.join(out['written'])}")
