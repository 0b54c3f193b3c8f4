"""What a fine-tuning run leaves in the models folder besides the best checkpoint, and how it resumes from it.

* ``last.pt``: the whole run state after the last finished epoch (model, optimiser, scheduler, scaler, early
  stopping, history, RNG, resolved config), written atomically so that ``kill -9`` leaves the old or the new file.
* ``training_summary.json``: resolved config, per-epoch history, best epoch, hardware, guard, OOM events, skips.
* ``training_curves.png``: loss / accuracy / AUC per epoch; ``train.log``: the run's log lines.

`TrainResult` is what `arena.train.train` returns: how the run ended and where these files are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arena._files import atomic_write, atomic_write_text
from arena.augment import augment_spec
from arena.errors import ModelsError
from arena.hardware import hardware_summary
from arena.models_folder import LAST_FILE, TRAIN_LOG_FILE, load_torch

LAST_FORMAT = "arena-train-last-v1"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = ("data", "models", "resume", "workers", "device", "epochs", "temp_pause_c", "temp_resume_c",
               "vram_warn_frac", "empty_cache_each_video", "frames_source", "thermal_max_wait_s")
# Older spellings of the same precision (runs saved before --amp took fp32 and the one precision policy).
_PRECISION_ALIASES = {"off": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Settings added after runs were saved without them: a missing one had this value then.
_ADDED_LATER = {"augment": "none", "augment_policy": augment_spec("none"), "monitor": "loss"}


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
    skipped: dict[str, str] = field(default_factory=dict)
    oom_events: list[dict[str, Any]] = field(default_factory=list)
    main: bool = True
    fold: int | None = None

    def lines(self) -> list[str]:
        """A short human summary: how the run ended, the best epoch and where the outputs are."""
        if not self.history:
            return ["no epoch was run"]
        best = self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]
        name = "train-full" if self.fold is None else f"train-full fold {self.fold}"
        out = [f"{name}: {self.stop_reason or 'stopped'} after epoch {self.history[-1]['epoch']}"
               + (f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""),
               f"best epoch {self.best_epoch}: val loss {best['val_loss']:.4f}, AUC {fmt_score(best['val_auc'])}, "
               f"accuracy {best['val_acc']:.3f}, F1 {best['val_f1']:.3f}",
               f"outputs: {self.best_path}, {self.last_path}, {self.summary_path}, {self.curves_path}"]
        if self.oom_events:
            out.append(f"{len(self.oom_events)} out-of-memory event(s) survived with fewer frames "
                       f"(see {TRAIN_LOG_FILE})")
        out += [f"skipped (could not decode) {k}: {msg}" for k, msg in sorted(self.skipped.items())]
        return out


def fmt_score(x: float | None) -> str:
    """A score for logs: three decimals, ``n/a`` when undefined (AUC with one class)."""
    return "n/a" if x is None else f"{x:.3f}"


def config_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a saved run and this one, ignoring those that may change on resume."""

    def value(cfg: dict[str, Any], key: str) -> Any:
        v = cfg.get(key, _ADDED_LATER.get(key))
        return _PRECISION_ALIASES.get(v, v) if key in ("amp", "amp_dtype") and isinstance(v, str) else v

    keys = sorted((set(saved) | set(current)) - set(RESUME_FREE))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if value(saved, k) != value(current, k)]


def finished(last: dict[str, Any], epochs: int) -> bool:
    """Whether the run in ``last.pt`` has nothing left to train at ``--epochs epochs``: it stopped early, or it
    reached its epoch limit and ``epochs`` does not extend it."""
    return bool(last["finished"]) and not (last["stop_reason"] == "max_epochs" and epochs > int(last["epoch"]))


def load_last(path: Path) -> dict[str, Any]:
    """Read ``last.pt`` (weights_only: a file that would run code is refused).

    Raises:
        ModelsError: the file cannot be loaded or is not an arena training state.
    """
    start_over = "`arena train-full --resume no` to start over (it replaces the file)"
    state = load_torch(path, rerun=start_over)
    if state.get("format") != LAST_FORMAT:
        raise ModelsError(f"{path}: not an arena training state (format {LAST_FORMAT} expected, found "
                          f"{state.get('format')!r}); rerun {start_over}.")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's RNG state (and the GPU's): what dropout and the loaders draw from next."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_summary(path: Path, *, resolved: dict[str, Any], history: list[dict[str, Any]], es: dict[str, Any],
                  elapsed: float, stop_reason: str, resumed_from: int, guard: dict[str, Any],
                  oom_events: list[dict[str, Any]], skipped: dict[str, str], best_name: str, curves_name: str) -> None:
    """``training_summary.json``: how the run was configured, what each epoch gave and how it ended."""
    best = history[es["best_epoch"] - 1] if es["best_epoch"] else None
    summary = {
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
        "gpu_guard": guard,
        "out_of_memory_events": oom_events,
        "skipped_videos": skipped,
        "outputs": {"best_checkpoint": best_name, "last": LAST_FILE, "curves": curves_name, "log": TRAIN_LOG_FILE},
    }
    atomic_write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Loss, accuracy and AUC per epoch, train and validation, in one PNG."""
    import matplotlib  # only rank 0 plots, once per epoch: not worth loading for every import of arena

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


def add_file_log(path: Path) -> logging.Handler:
    """Copy the ``arena`` loggers' INFO (and above) lines to ``path``; remove the returned handler when done."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("arena")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def remove_file_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("arena").removeHandler(handler)
        handler.close()
