"""`arena tune-head`: an Optuna study over the attention head on cached features, and what it leaves behind.

Design decisions:

* Objective: validation log loss of the best epoch (early stopping restores it); AUC, accuracy and F1 are
  stored as trial user attributes. Validation uses the persisted split file, never test data.
* On a K-fold split (``arena split --folds K``) the objective is, by default, the out-of-fold (OOF) log loss: the
  K fold heads of a trial are trained together (`arena.cv_heads`) and every video is scored by the head that did
  not train on it. ``cv=False`` keeps the holdout objective on fold 0. The objective is part of a CV study's
  context and default name, so CV and holdout trials are never mixed; a CV study leaves the fold heads and the
  OOF predictions behind (`arena.study_folds`).
* ``n_trials`` is a *total target of finished trials* (complete or pruned) in the study, so running the same
  command again after an interruption resumes and stops at the same count (storage and recovery of trials of
  dead workers: ``arena.study_storage``).
* The sampler is re-seeded before every trial from (seed, number of finished trials), so a study that was
  killed and resumed proposes the same parameters as one that ran straight through.
* A study is tied to its split, cache identity, search space and training settings (its context): a study made
  with others is refused rather than silently mixed. The cache itself serves every split.
* The saved best head (the K fold heads of a CV study) is retrained once with the best parameters and the same
  seed; training is deterministic, so it equals the best trial's (its loss is recorded next to the trial's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from arena._files import atomic_write_text
from arena.cache import FeatureCache
from arena.calibration import fit_calibration
from arena.cv_heads import train_folds
from arena.errors import ModelsError, OptionError, StudyError
from arena.faces.modes import describe as describe_crop
from arena.head_data import HeadDataStore, open_head_data
from arena.head_train import HIDDEN, HeadParams, HeadTrainConfig, train_head
from arena.models_folder import (
    BEST_HEAD_FILE,
    BEST_PARAMS_FILE,
    OPTUNA_DB,
    STUDY_PLOT_FILES,
    STUDY_SUMMARY_FILE,
    HeadCheckpoint,
)
from arena.study_folds import HOLDOUT_OBJECTIVE, OOF_OBJECTIVE, view_logits, write_fold_outputs
from arena.study_storage import (
    create_storage,
    finished_trials,
    recover_stale_trials,
    redact_url,
    requeue_interrupted,
    worker_identity,
)

ATTN_CHOICES = (64, 128, 256, 512)
# The seed notebook's head: enqueued as trial 0 so the study starts from the known baseline.
SEED_DEFAULTS: dict[str, Any] = {"attn_dim": 256, "dropout": 0.5, "lr": 1e-4, "weight_decay": 1e-5,
                                 "tta_aug": False, "input_dropout": 0.0}

# The search space besides ``frames`` (the cache's frame counts): name -> (kind, arguments). The ranges go into the
# study's context, so a study made with other ranges is refused rather than silently mixed.
SEARCH_SPACE: dict[str, tuple[str, Any]] = {
    "attn_dim": ("categorical", list(ATTN_CHOICES)),
    "dropout": ("float", (0.3, 0.7)),
    "lr": ("log_float", (1e-4, 3e-3)),
    "weight_decay": ("log_float", (1e-6, 1e-1)),
    "tta_aug": ("categorical", [False, True]),
    # Dropout on the standardised features (one mask per video): without it the 1536->256 head overfits a few
    # hundred videos within a few epochs (measured on the demo cache: best epochs 0-3, held-out AUC 0.75).
    "input_dropout": ("float", (0.0, 0.9)),
}


def suggest_params(trial: optuna.Trial | optuna.trial.FixedTrial, frame_choices: Sequence[int]) -> HeadParams:
    """Draw one point of the search space (:data:`SEARCH_SPACE` and ``frame_choices``) from an Optuna trial."""
    values: dict[str, Any] = {}
    for name, (kind, args) in SEARCH_SPACE.items():
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(args))
        else:
            values[name] = trial.suggest_float(name, *args, log=kind == "log_float")
        if name == "weight_decay":  # frames drawn here keeps the order of draws of earlier studies
            values["frames"] = trial.suggest_categorical("frames", [int(k) for k in frame_choices])
    return HeadParams(**values)


class Objective:
    """Optuna objective: suggest head parameters, train, return the validation log loss (holdout) or the
    out-of-fold log loss of the K fold heads (``cv``)."""

    def __init__(self, store: HeadDataStore, *, config: HeadTrainConfig = HeadTrainConfig(),
                 frame_choices: Sequence[int] | None = None, cv: bool = False) -> None:
        self.store = store
        self.config = config
        self.frame_choices = store.check_frames(frame_choices or store.frame_counts)
        self.cv = cv

    def __call__(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> float:
        if isinstance(trial, optuna.Trial):
            trial.set_user_attr("worker", worker_identity())  # lets a later start recognise a dead worker's trial
        params = suggest_params(trial, self.frame_choices)
        what = "OOF" if self.cv else "val"

        def report(epoch: int, loss: float) -> None:
            trial.report(loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with {what} log loss {loss:.4f}")

        if self.cv:
            folds = train_folds(params, self.store.get_folds(params.frames), config=self.config, on_epoch=report)
            value, scores = folds.value, folds.metrics
            trial.set_user_attr("best_epochs", folds.best_epochs)
            trial.set_user_attr("fold_log_loss", [r.val_loss for r in folds.folds])
            trial.set_user_attr("epochs_run", folds.epochs_run)
        else:
            result = train_head(params, self.store.get(params.frames), config=self.config, on_epoch=report)
            value, scores = result.val_loss, result.metrics
            trial.set_user_attr("best_epoch", result.best_epoch)
            trial.set_user_attr("epochs_run", result.epochs_run)
        for key in ("auc", "accuracy", "f1", "mean_confidence"):
            trial.set_user_attr(key, scores[key])
        return value


#: ``--pruner``: how a study stops unpromising trials from the loss they report after every epoch (epoch indices
#: 0, 1, ...). ``auto`` is ``halving`` for an out-of-fold (K-fold) study and ``median`` for a holdout one.
PRUNERS = ("auto", "median", "halving", "none")


def resolve_pruner(name: str, cv: bool) -> str:
    """The pruner ``auto`` stands for: successive halving when a trial trains K heads, the median rule otherwise.

    Measured with ``tools/bench_tune.py --folds 5 --pruners auto,median`` (see the README): a K-fold epoch costs
    about K holdout epochs, and the median rule lets every trial run 3 epochs and every trial that keeps up with the
    median run until early stopping, so most of a K-fold study's time goes to trials that end nowhere near the best.
    """
    if name not in PRUNERS:
        raise OptionError(f"--pruner {name!r}: choose one of {', '.join(PRUNERS)}.")
    return ("halving" if cv else "median") if name == "auto" else name


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a resolved ``--pruner`` name.

    * ``median``: `optuna.pruners.MedianPruner` (5 start-up trials, no pruning before epoch 2): a trial stops when
      its loss is worse than the median of earlier trials at the same epoch.
    * ``halving``: `optuna.pruners.SuccessiveHalvingPruner` (asynchronous successive halving): rungs after epochs
      2, 4, 10 and 28 (steps 1, 3, 9, 27); a trial goes past a rung only when its loss there is in the best third of
      the trials that reached it.
    * ``none``: every trial runs until early stopping.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3, min_early_stopping_rate=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise OptionError(f"pruner {name!r} is not one of {', '.join(PRUNERS[1:])}.")


def trial_sampler(seed: int, finished: int, running: int, n_startup: int) -> optuna.samplers.TPESampler:
    """The sampler of the next trial, seeded from the study's progress: a resumed study draws what an
    uninterrupted one would."""
    trial_seed = int(np.random.SeedSequence([seed, finished, running]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=n_startup, constant_liar=True)


def open_study(storage: BaseStorage, study_name: str, *, context: dict[str, Any]) -> optuna.Study:
    """Create or load a study; refuse to continue one made from another cache, split or search space.

    Raises:
        StudyError: the stored study's context differs from ``context``.
    """
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get("context")
    if stored is None:
        study.set_user_attr("context", context)
    else:
        keys = list(context) + [k for k in stored if k not in context]  # a key only one side has differs too
        diffs = [f"{k}: study has {stored.get(k)!r}, now {context.get(k)!r}" for k in keys
                 if stored.get(k) != context.get(k)]
        if diffs:
            hint = (" A study without a pruner in its settings ran under the median rule: pass --pruner median to "
                    "continue it." if "pruner" in keys and stored.get("pruner") != context.get("pruner") else "")
            raise StudyError(f"study {study_name!r} was made with different settings ({'; '.join(diffs)}); its "
                             "trials are not comparable. Use another --study-name (or delete the storage) to start "
                             f"afresh.{hint}")
    return study


def run_study(store: HeadDataStore, *, storage: BaseStorage, study_name: str = "head", n_trials: int = 50,
              timeout: float | None = None, seed: int = 0, frame_choices: Sequence[int] | None = None,
              config: HeadTrainConfig = HeadTrainConfig(), context: dict[str, Any] | None = None,
              n_startup_trials: int = 10, progress: bool = True, cv: bool = False,
              pruner: str = "auto") -> optuna.Study:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) trials or ``timeout`` passes.

    ``cv``: score trials by the out-of-fold log loss over the store's K folds (its context then names the
    objective and the folds; a holdout study's context stays what it always was, so old studies resume).
    ``pruner``: one of :data:`PRUNERS` (`resolve_pruner`); part of the context unless it is ``median`` (the rule
    every study used before the option existed), so a study never continues under another pruning rule.

    Returns:
        the ``optuna.Study``.
    """
    if n_trials < 1:
        raise OptionError(f"--n-trials must be >= 1 (a total target of finished trials); got {n_trials}.")
    if timeout is not None and timeout <= 0:
        raise OptionError(f"--timeout must be > 0 seconds; got {timeout}.")
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        objective = Objective(store, config=config, frame_choices=frame_choices, cv=cv)
        ctx = {"frame_choices": list(objective.frame_choices), "train_config": dataclasses.asdict(config),
               "seed": seed, "search_space": json.loads(json.dumps(SEARCH_SPACE)), **(context or {})}
        if cv:
            ctx.update(objective=OOF_OBJECTIVE, folds=store.folds)
        pruner = resolve_pruner(pruner, cv)
        if pruner != "median":
            ctx["pruner"] = pruner
        study = open_study(storage, study_name, context=ctx)
        recover_stale_trials(study)
        if not study.trials:
            study.enqueue_trial({**SEED_DEFAULTS, "frames": objective.frame_choices[0]},
                                user_attrs={"seed_defaults": True})
        study.pruner = make_pruner(pruner)
        deadline = time.monotonic() + timeout if timeout else None
        done = finished_trials(study)
        with tqdm(total=n_trials, initial=min(done, n_trials), desc=f"tune {study_name}", unit="trial",
                  disable=not progress) as bar:
            while done < n_trials and (deadline is None or time.monotonic() < deadline):
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                study.sampler = trial_sampler(seed, done, running, n_startup_trials)
                try:
                    study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
                except KeyboardInterrupt:
                    requeue_interrupted(study)
                    raise
                recover_stale_trials(study)
                new_done = finished_trials(study)
                bar.update(max(0, min(new_done, n_trials) - min(done, n_trials)))
                done = new_done
                best = _best_trial(study)
                if best is not None:
                    bar.set_postfix(best=f"{best.value:.4f}")
        return study
    finally:
        optuna.logging.set_verbosity(level)


# ------------------------------------------------------------------------------------------------ outputs


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def _trial_row(t: FrozenTrial) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "duration_s": duration, "epochs_reported": len(t.intermediate_values),
            "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "worker"}}


def study_summary(study: optuna.Study, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trials, states, best value and durations as a JSON-able dict."""
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    best = _best_trial(study)
    return {
        "study_name": study.study_name,
        "n_trials": len(trials),
        "states": states,
        "best_value": best.value if best else None,
        "best_trial": _trial_row(best) if best else None,
        "total_trial_seconds": float(sum(durations)),
        "mean_trial_seconds": float(np.mean(durations)) if durations else None,
        "trials": [_trial_row(t) for t in trials],
        **(extra or {}),
    }


def save_plots(study: optuna.Study, out_dir: Path) -> dict[str, str]:
    """Optimisation history and parameter importances as PNGs; returns {plot: path or the reason it was skipped}."""
    import matplotlib  # optional and slow to import: only when plots are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    history, importances = STUDY_PLOT_FILES
    plots = ((history, ovm.plot_optimization_history, 1), (importances, ovm.plot_param_importances, 2))
    for name, fn, need in plots:
        if n_complete < need:
            out[name] = f"skipped: needs {need} complete trials, have {n_complete}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=100)
            plt.close(fig)
            out[name] = str(out_dir / name)
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the tuning results
            out[name] = f"skipped: {type(exc).__name__}: {exc}"
    return out


def _models_folder(models_dir: str | os.PathLike) -> Path:
    models = Path(models_dir)
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelsError(f"--models {models}: cannot create the folder ({exc}); choose a writable folder.") from exc
    return models


def finalize_study(study: optuna.Study, store: HeadDataStore, models_dir: str | os.PathLike, *,
                   config: HeadTrainConfig = HeadTrainConfig(), extra: dict[str, Any] | None = None,
                   cv: bool = False) -> dict[str, Any]:
    """Write best_head_params.json, the best head, study_summary.json and the plots; return the summary.

    The best trial's head is retrained (deterministic: the same weights) and saved as a `HeadCheckpoint`, with the
    temperature fitted on its validation logits per TTA view (`arena.calibration`: what the submission averages).
    A CV study (``cv``) retrains its K fold heads instead and writes them, one out-of-fold temperature and the OOF
    predictions (`arena.study_folds.write_fold_outputs`).
    """
    models = _models_folder(models_dir)
    summary = study_summary(study, extra={"train_config": dataclasses.asdict(config), **(extra or {})})
    best = _best_trial(study)
    try:
        if best is not None:
            params = HeadParams.from_dict(best.params)
            atomic_write_text(models / BEST_PARAMS_FILE,
                              json.dumps({**params.to_dict(), "hidden": HIDDEN}, indent=1))
            summary.update(_save_cv(params, store, models, config) if cv else
                           _save_holdout(params, store, models, config))
            summary["retrained"]["trial_value"] = best.value
            summary["retrained"]["abs_diff"] = abs(summary["retrained"]["val_loss"] - best.value)
        summary["plots"] = save_plots(study, models)
        atomic_write_text(models / STUDY_SUMMARY_FILE, json.dumps(summary, indent=1, default=str))
    except OSError as exc:
        raise ModelsError(f"--models {models}: cannot write the study's outputs ({exc}); the trials are kept in "
                          "the study: free space or fix the folder's permissions and run the command again.") from exc
    return summary


def _save_holdout(params: HeadParams, store: HeadDataStore, models: Path, config: HeadTrainConfig) -> dict[str, Any]:
    """Retrain the holdout head; write ``best_head.pt`` with its validation temperature."""
    data = store.get(params.frames)
    result = train_head(params, data, config=config)
    ckpt = HeadCheckpoint(config=result.head_config, state_dict=result.state_dict, frames=data.frames,
                          params=params.to_dict(), metrics=result.metrics, provenance=store.provenance)
    # The temperature is fitted on the TTA mean over every view the cache holds, what the submission averages.
    x, mask, views = store.val_in_every_view(params.frames)
    z = view_logits(ckpt.build().to(x.device), x, mask)
    ckpt.calibration = {**fit_calibration(z, data.val_y.cpu().numpy()), "views": list(views)}
    ckpt.save(models / BEST_HEAD_FILE)
    return {"retrained": {"val_loss": result.val_loss, "metrics": result.metrics, "calibration": ckpt.calibration},
            "skipped_videos": data.skipped}


def _save_cv(params: HeadParams, store: HeadDataStore, models: Path, config: HeadTrainConfig) -> dict[str, Any]:
    """Retrain the K fold heads together; write them, the OOF temperature and predictions."""
    data = store.get_folds(params.frames)
    result = train_folds(params, data, config=config)
    cv = write_fold_outputs(result, data, models, provenance=store.provenance)
    return {"cv": cv, "skipped_videos": data.skipped,
            "retrained": {"val_loss": result.value, "metrics": result.metrics, "calibration": cv["calibration"]}}


# ------------------------------------------------------------------------------------------------ command


def _pseudo_used(store: HeadDataStore, record: dict[str, Any] | None, cv: bool, k: int) -> dict[str, Any] | None:
    """The summary's ``pseudo_fakes``: how the cache made them and how many trained the heads (None: not used);
    ``k``: a frame count the study loaded already (the count does not depend on it)."""
    if not record:
        return None
    return {**record, "items_used": int(store.get_folds(k).pseudo if cv else store.get(k).pseudo)}


def default_study_name(split_sha256: str, folds: int | None = None, pseudo: bool = False) -> str:
    """``head-<first 8 hex digits of split.json's sha256>``, ``-cv<K>`` for a CV study over K folds, ``-sbi`` when
    the heads train on pseudo-fake items too: one study per split, objective and training data (a holdout study of
    the same split keeps its name and resumes)."""
    return f"head-{split_sha256[:8]}" + (f"-cv{folds}" if folds else "") + ("-sbi" if pseudo else "")


def tune_head(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
              n_trials: int = 50, timeout: float | None = None, storage: str | None = None,
              study_name: str | None = None, seed: int = 0, frames: Sequence[int] | None = None,
              epochs: int = 30, patience: int = 4, batch_size: int = 64, device: str = "auto",
              progress: bool = True, crop: str | None = None, cv: bool | None = None,
              pseudo: bool = True, pruner: str = "auto") -> dict[str, Any]:
    """``arena tune-head``: run/resume the study until ``n_trials`` finished trials, then write the outputs.

    Args:
        study_name: default :func:`default_study_name` of the split, so that after ``arena split --new-split``
            the same command starts a new study (the old one's trials were measured on another validation part)
            on the same, unchanged feature cache.
        batch_size: videos per training step.
        device: auto, cpu, cuda or cuda:N.
        crop: ``none`` or ``faces``: the crop mode the cache must have been built with (None: whatever it has).
            The head is tuned on the cache's features, so it inherits the cache's crop settings.
        cv: score trials by the out-of-fold log loss over the split's K folds and write the K fold heads (None:
            whenever the split has K > 1 folds); False: the holdout objective on fold 0's train/validation parts.
        pseudo: train the heads on the cache's pseudo-fake items (``arena features --pseudo-fakes``) of their
            training videos too, when the cache has any; they are never validated on.
        pruner: one of :data:`PRUNERS`; ``auto``: successive halving for a CV study, the median rule otherwise.

    Raises:
        OptionError: ``cv=True`` on a split of one fold.

    Returns:
        the study summary (also written to ``<models>/study_summary.json``).
    """
    models = _models_folder(models_dir)
    url = storage or f"sqlite:///{(models / OPTUNA_DB).resolve()}"
    if crop is not None:  # before a split is made or a study opened: a wrong cache fails at once
        with FeatureCache.open(cache_path) as cache:
            cache_crop = cache.provenance.crop
        if crop != cache_crop["mode"]:
            raise OptionError(f"--crop {crop}: the cache {cache_path} was built with crop "
                              f"{describe_crop(cache_crop)}; build a cache with `arena features --crop {crop}` first.")
    store, split = open_head_data(cache_path, data_root, models, device=device, pseudo=pseudo)
    if cv and split.folds == 1:
        raise OptionError(f"--cv: {split.path} holds one holdout, not folds; make K folds with `arena split "
                          "--folds K --new-split`, or drop --cv.")
    cv = split.folds > 1 if cv is None else cv
    cache_crop = store.provenance.get("crop") or {"mode": "none"}
    pseudo_record = store.provenance.get("pseudo_fakes") if pseudo else None
    study_name = study_name or default_study_name(split.sha256, split.folds if cv else None, bool(pseudo_record))
    frame_choices = store.check_frames(frames) if frames else store.frame_counts
    config = HeadTrainConfig(max_epochs=epochs, patience=patience, batch_size=batch_size, seed=seed)
    # The study (not the cache) is tied to the split: its trials were measured on this split's validation part.
    context = {"split_sha256": split.sha256, "feature_dim": int(store.provenance.get("feature_dim", 0) or 0),
               "backbone": store.provenance.get("backbone"), "weights_hash": store.provenance.get("weights_hash")}
    if cache_crop["mode"] != "none":  # whole-frame studies keep the context they always had (they resume)
        context["crop"] = cache_crop
    if pseudo_record:  # as the crop: studies without pseudo-fakes keep their context
        context["pseudo_fakes"] = pseudo_record
    pruner = resolve_pruner(pruner, cv)
    started = time.monotonic()
    study = run_study(store, storage=create_storage(url), study_name=study_name, n_trials=n_trials,
                      timeout=timeout, seed=seed, frame_choices=frame_choices, config=config, context=context,
                      progress=progress, cv=cv, pruner=pruner)
    elapsed = time.monotonic() - started
    summary = finalize_study(study, store, models, config=config, cv=cv, extra={
        "storage": redact_url(url), "target_trials": n_trials, "seed": seed, "cache": str(cache_path),
        "split_sha256": split.sha256, "frame_choices": list(frame_choices), "this_run_seconds": elapsed,
        "objective": OOF_OBJECTIVE if cv else HOLDOUT_OBJECTIVE, "folds": split.folds if cv else 1, "pruner": pruner,
        "pseudo_fakes": _pseudo_used(store, pseudo_record, cv, frame_choices[0])})
    summary["reached_target"] = sum(summary["states"].get(s, 0) for s in ("COMPLETE", "PRUNED")) >= n_trials
    return summary
