"""`TrainConfig`: everything that decides a fine-tuning run (`arena train-full`), checked when it is made; and
`check_fold`, which checks ``--fold`` against the split file before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from arena.augment import LEVELS as AUGMENT_CHOICES
from arena.errors import OptionError
from arena.faces.stage import FaceCropConfig
from arena.limits import MAX_FRAMES, MAX_IMAGE_SIZE, MAX_WORKERS, MIN_IMAGE_SIZE
from arena.models_folder import LAST_FILE, finetuned_name, fold_dir
from arena.pseudo import PseudoFakes, parse_train_spec
from arena.runtime import PRECISIONS, check_device_name
from arena.split import AFTER_NEW_SPLIT, SPLIT_FILE, stored_parts
from arena.train_data import TRAIN_ON

#: ``--monitor`` values: the validation score the best checkpoint, early stopping and the LR plateau follow.
MONITORS = ("loss", "auc")
#: ``--amp`` values: the precisions of `arena.runtime`; ``off`` (older runs) is read as ``fp32``.
AMP_CHOICES = (*PRECISIONS, "off")
RESUME_CHOICES = ("auto", "yes", "no")
HEAD_INIT_CHOICES = ("auto", "tuned", "default")
HEAD_STATS_CHOICES = ("auto", "keep", "train")


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``None`` fields are resolved from the models folder or defaults.

    Attributes:
        data: dataset folder (the competition layout).
        models: the models folder; holds ``split.json`` and, when present, ``frame_test.json`` / ``best_head.pt``.
            The outputs go here, or into the fold's folder with ``fold`` (`out_dir`).
        frames: frames per video; None: ``frame_test.json``'s recommendation, else 24.
        batch_size: videos per step.
        lr / head_lr / weight_decay / head_weight_decay: AdamW; the head's defaults come from the tuned head.
        amp: autocast precision, `arena.runtime.autocast_dtype`'s policy: ``auto`` (bf16 where the hardware runs it
            natively, fp16 + GradScaler on older CUDA GPUs, else float32), ``fp32``, ``bf16`` or ``fp16`` (CUDA).
        head_init: ``auto`` (the tuned head of ``tune-head`` when it exists), ``tuned`` (require it) or
            ``default`` (a fresh head with the seed's sizes).
        head_stats: the head's input standardisation. ``keep`` the tuned head's (or 0/1 for a fresh head);
            ``train`` recomputes it from train-mode features of 16 training clips; ``auto`` = ``train`` for a tuned
            head on a random-init backbone, whose cached (eval-mode) features are ~30x smaller than the train-mode
            features it will see, else ``keep``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun each process uses GPU ``LOCAL_RANK``.
        resume: ``auto`` continues an unfinished ``last.pt`` made with the same settings (refuses a different
            one), ``yes`` requires ``last.pt``, ``no`` starts over.
        balanced: class-balanced training order (real and fake alternate; see `arena.distributed.EpochSampler`).
        limit_train / limit_val: use at most this many videos of each part (quick runs, tests).
        min_frames: the fewest frames an out-of-memory retry may fall back to.
        temp_pause_c / temp_resume_c / vram_warn_frac / empty_cache_each_video: the GPU guard (`arena.hardware`).
        thermal_max_wait_s: the longest thermal pause (s); then the run stops as an interrupted one does
            (`arena.errors.ThermalTimeout`, resumable from ``last.pt``). 0: stop at once; None: wait without limit.
        crop: face-centred crops (`arena.faces.FaceCropConfig`) for training and validation clips; None: whole
            frames. Stored in the checkpoint's config, so submit cuts frames the same way.
        augment: the training clips' degradations (`arena.augment`): ``none``, ``light`` or ``strong``.
        pseudo_fakes: ``sbi`` or ``sbi:P`` (`arena.pseudo.parse_train_spec`, stored normalised as ``sbi:1``):
            each training real is joined in its batch, with probability P per epoch (default 1), by a self-blend of
            itself labelled fake (`arena.train_data.TrainClips`); None: off.
        train_on: ``all`` the training part's videos, or ``real`` its reals only (the SBI protocol; needs
            ``pseudo_fakes``). Validation is the same either way.
        monitor: what picks the best checkpoint and drives early stopping and the LR plateau: the validation
            ``loss`` (default), or its ``auc`` (ranking only: under ``--train-on real`` the model learns pseudo-fakes,
            and its probabilities for a validation set of real fakes rank them well long before they are
            calibrated; epochs of equal AUC are told apart by the loss; the checkpoint's temperature is still
            fitted on the validation loss).
        fold: train fold ``i`` of the K-fold split in ``models/split.json`` (train on the other folds, validate on
            fold i) into ``models/folds/fold_<i>``, starting from that folder's ``best_head.pt`` and frame test
            (else the parent's frame test); None: the split's train/validation parts, outputs in ``models``.

    Raises:
        OptionError: a value outside its allowed range or choices (the message names both).
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
    amp: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
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
    crop: FaceCropConfig | None = None
    empty_cache_each_video: bool = False
    thermal_max_wait_s: float | None = 1800.0
    augment: Literal["none", "light", "strong"] = "none"
    pseudo_fakes: str | None = None
    train_on: Literal["all", "real"] = "all"
    monitor: Literal["loss", "auc"] = "loss"
    fold: int | None = None

    def __post_init__(self) -> None:
        # Plain strings: the config is stored in checkpoints that must load with weights_only=True.
        self.data, self.models = str(self.data), str(self.models)
        self.weights = None if self.weights is None else str(self.weights)
        for name, allowed in (("amp", AMP_CHOICES), ("resume", RESUME_CHOICES), ("head_init", HEAD_INIT_CHOICES),
                              ("head_stats", HEAD_STATS_CHOICES), ("augment", AUGMENT_CHOICES),
                              ("train_on", TRAIN_ON), ("monitor", MONITORS)):
            value = getattr(self, name)
            _need(value in allowed, f"Invalid --{name.replace('_', '-')} ({value}). Supported values are "
                                    f"{', '.join(allowed)}.")
        if self.amp == "off":
            self.amp = "fp32"  # one spelling in new run records; `train_state.config_difference` reads both
        check_device_name(self.device)
        _need(self.frames is None or 1 <= self.frames <= MAX_FRAMES,
              f"--frames must be in 1..{MAX_FRAMES}, got {self.frames}")
        _need(self.image_size is None or MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
              f"--image-size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {self.image_size}")
        _need(1 <= self.batch_size <= 256, f"--batch-size must be in 1..256 (videos), got {self.batch_size}")
        _need(1 <= self.accum_steps <= 1024, f"--accum-steps must be in 1..1024, got {self.accum_steps}")
        _need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _need(self.head_lr is None or self.head_lr > 0, f"--head-lr must be > 0, got {self.head_lr}")
        _need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _need(self.head_weight_decay is None or self.head_weight_decay >= 0,
              f"head_weight_decay must be >= 0, got {self.head_weight_decay}")
        _need(1 <= self.epochs <= 10_000, f"--epochs must be in 1..10000, got {self.epochs}")
        _need(self.lr_patience >= 0, f"--lr-patience must be >= 0, got {self.lr_patience}")
        _need(self.es_patience >= 1, f"--es-patience must be >= 1, got {self.es_patience}")
        _need(0 <= self.workers <= MAX_WORKERS, f"--workers must be in 0..{MAX_WORKERS}, got {self.workers}")
        for name in ("limit_train", "limit_val"):
            value = getattr(self, name)
            _need(value is None or value >= 2,
                  f"--{name.replace('_', '-')} must be >= 2 (one video of each class), got {value}")
        _need(1 <= self.min_frames <= MAX_FRAMES, f"--min-frames must be in 1..{MAX_FRAMES}, got {self.min_frames}")
        _need(self.temp_resume_c < self.temp_pause_c, f"--temp-resume ({self.temp_resume_c}) must be below "
              f"--temp-pause ({self.temp_pause_c}); e.g. pause at 78 and resume at 72.")
        _need(0 < self.vram_warn_frac <= 1, f"--vram-warn must be in (0, 1], got {self.vram_warn_frac}")
        _need(self.thermal_max_wait_s is None or 0 <= self.thermal_max_wait_s < float("inf"),
              f"--thermal-max-wait must be >= 0 seconds (or none: no limit), got {self.thermal_max_wait_s}")
        _need(self.fold is None or (isinstance(self.fold, int) and self.fold >= 0),
              f"--fold must be a fold number >= 0 (or all), got {self.fold!r}")
        if self.pseudo_fakes is not None:
            self.pseudo_fakes = parse_train_spec(self.pseudo_fakes).spec  # one spelling in run records
        _need(self.train_on == "all" or self.pseudo_fakes is not None,
              "--train-on real trains on the reals and their pseudo-fakes only: add --pseudo-fakes sbi (or train "
              "on all).")

    @property
    def pseudo(self) -> PseudoFakes | None:
        """The ``pseudo_fakes`` setting, parsed; None when off."""
        return None if self.pseudo_fakes is None else parse_train_spec(self.pseudo_fakes)

    @property
    def short_name(self) -> str:
        """The backbone without its pretrained tag: ``inception_resnet_v2.tf_in1k`` -> ``inception_resnet_v2``."""
        return self.backbone.split(".")[0]

    @property
    def out_dir(self) -> Path:
        """Where the run's outputs go: ``<models>``, or ``<models>/folds/fold_<i>`` with ``fold``."""
        return Path(self.models) if self.fold is None else fold_dir(self.models, self.fold)

    @property
    def best_path(self) -> Path:
        """The best checkpoint, ``<out_dir>/<backbone>_best.pt``."""
        return self.out_dir / finetuned_name(self.backbone)

    @property
    def last_path(self) -> Path:
        """The resumable run state, ``<out_dir>/last.pt``."""
        return self.out_dir / LAST_FILE


def split_folds(models: str | Path) -> int | None:
    """How many folds ``models/split.json`` holds (1 for a holdout); None when there is no readable split file."""
    parts = stored_parts(models)
    if parts is None:
        return None
    folds = [v for v in parts.values() if isinstance(v, int)]
    return max(folds) + 1 if folds else 1


def check_fold(models: str | Path, fold: int | str) -> int:
    """The number of folds, when ``models/split.json`` holds K folds and ``fold`` is one of them (or ``all``).

    Raises:
        OptionError: no readable split file, a one-part holdout, or no such fold; the message says how to make one.
    """
    path = Path(models) / SPLIT_FILE
    make = "make a K-fold split with `arena split --folds K --new-split`"
    k = split_folds(models)
    if k is None:
        state = "cannot be read as a split file" if path.exists() else "does not exist"
        raise OptionError(f"--fold {fold}: {path} {state}; {make} (K >= 2), then train each fold.")
    if k == 1:
        raise OptionError(f"--fold {fold}: {path} is a single train/validation holdout, not K folds; {make} "
                          f"(K >= 2) or train without --fold. After a new split, {AFTER_NEW_SPLIT}.")
    if fold != "all" and not 0 <= fold < k:
        raise OptionError(f"--fold {fold}: {path} has {k} folds, numbered 0 to {k - 1}; pick one of them (or all), "
                          f"or {make} for more.")
    return k


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(f"TrainConfig: {message}")
