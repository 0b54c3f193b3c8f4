"""``arena train-full --fold all``: fine-tune every fold of a K-fold split in turn, each into its own folder.

Fold i trains on the other folds and validates on fold i (`arena.split.Split.fold`); its outputs go to
``<models>/folds/fold_<i>`` (`arena.models_folder.fold_dir`), where ``submit``/``evaluate`` find the ensemble's
members. Each fold is one `arena.train.train` run, so it resumes on its own: rerunning after an interruption skips
the folds whose ``last.pt`` says they finished (early stopping, or the epoch limit unless ``--epochs`` now extends
it; the same settings required, as for any resume), continues the interrupted one and starts the rest.

Under ``torchrun`` the process group is joined once here and kept for every fold (each rank trains the same fold).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from arena.distributed import setup_distributed
from arena.errors import TrainError
from arena.hardware import GpuGuard
from arena.runtime import resolve_device
from arena.train import train
from arena.train_config import TrainConfig, check_fold
from arena.train_state import TrainResult

log = logging.getLogger(__name__)


def train_folds(cfg: TrainConfig, *, guard: GpuGuard | None = None,
                on_epoch_end: Callable[[int, int, dict[str, Any]], None] | None = None) -> list[TrainResult]:
    """Train every fold of the K-fold split in ``cfg.models`` (``cfg.fold`` is ignored); one result per fold.

    ``cfg.resume``: ``auto`` skips finished folds and continues an unfinished one; ``no`` retrains every fold from
    scratch; ``yes`` needs some fold's ``last.pt`` to continue (the folds not started yet then start).

    Args:
        cfg: the settings every fold shares.
        guard: the GPU guard (default: one per fold from cfg's thresholds).
        on_epoch_end: called after every epoch with (fold, epoch, history row).

    Raises:
        OptionError: ``split.json`` is missing or holds a single holdout (`arena.train_config.check_fold`).
        TrainError: ``resume="yes"`` and no fold has a ``last.pt``.
        ArenaError: any fold's run failed (see `arena.train.train`); the folds before it keep their outputs.
    """
    folds = check_fold(cfg.models, "all")
    cfg = dataclasses.replace(cfg, fold=None)
    if cfg.resume == "yes":
        if not any(dataclasses.replace(cfg, fold=i).last_path.is_file() for i in range(folds)):
            raise TrainError(f"--resume: no fold of {cfg.models} has a last.pt to continue from; run without "
                             "--resume to start.")
        cfg = dataclasses.replace(cfg, resume="auto")
    owns_group = not torch.distributed.is_initialized()
    dist, _ = setup_distributed(resolve_device(cfg.device))  # joined once: every fold's run reuses the group
    results = []
    try:
        for i in range(folds):
            if dist.main:
                log.info("train-full --fold all: fold %d of %d", i, folds)
            per_epoch = None if on_epoch_end is None else (lambda epoch, row, i=i: on_epoch_end(i, epoch, row))
            results.append(train(dataclasses.replace(cfg, fold=i), guard=guard, on_epoch_end=per_epoch))
    finally:
        if owns_group and dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return results
