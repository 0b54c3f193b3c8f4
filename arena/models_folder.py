"""The models folder's one owner: which file is which, and how each checkpoint is saved and loaded.

Every stage that reads or writes the models folder asks this module; no stage imports another's internals.

=========================== ======================= ============================================================
file                        written by              read by
=========================== ======================= ============================================================
``split.json``              ``arena split`` / any   every stage (``arena.split``)
``optuna.db``               ``tune-head``           ``tune-head`` (resume), ``optuna-dashboard``
``best_head.pt``            ``tune-head``           ``train-full`` (starting head), ``submit``/``evaluate``
``best_head_params.json``   ``tune-head``           ``frame-test``, people
``study_summary.json``      ``tune-head``           people
``frame_test.json``         ``frame-test``          ``train-full``, ``submit``, ``evaluate`` (`resolve_frames`)
``<backbone>_best.pt``      ``train-full``          ``submit``/``evaluate`` (`find_finetuned`)
``last.pt``                 ``train-full``          ``train-full`` (resume)
``training_summary.json``   ``train-full``          people
``training_curves.png``     ``train-full``          people
``train.log``               ``train-full``          people
``optuna_*.png``            ``tune-head``           people
``evaluation.json``         ``evaluate``            people (``attention/*.png`` beside it with ``--attention``)
``oof_predictions.csv``     ``tune-head`` (K folds) people, ``evaluate`` (out-of-fold scores of the best head)
``folds/fold_<i>/``         ``tune-head`` (K folds) ``submit``/``evaluate`` (ensemble members), ``train-full --fold i``
=========================== ======================= ============================================================

A K-fold split (``arena split --folds K``) gives every fold a models folder of its own under ``folds/``
(`fold_dir`): the fold's ``best_head.pt`` and ``frame_test.json`` from ``tune-head``/``frame-test``, and its
fine-tuned checkpoint from ``train-full --fold i``. The split itself stays in the parent's ``split.json``.

Checkpoints hold only tensors and JSON types, so they load with ``torch.load(..., weights_only=True)``: a file
that needs arbitrary unpickling (code) is refused with the file named.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arena._files import atomic_write
from arena.errors import ModelsError
from arena.limits import MAX_FRAMES
from arena.model import Detector, DetectorHead, create_encoder
from arena.sampling import DEFAULT_FRAMES
from arena.split import SPLIT_FILE  # noqa: F401 - owned by arena.split, named here with the rest of the folder

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
BEST_HEAD_FILE = "best_head.pt"
BEST_PARAMS_FILE = "best_head_params.json"
STUDY_SUMMARY_FILE = "study_summary.json"
FRAME_TEST_FILE = "frame_test.json"
LAST_FILE = "last.pt"
TRAINING_SUMMARY_FILE = "training_summary.json"
TRAINING_CURVES_FILE = "training_curves.png"
TRAIN_LOG_FILE = "train.log"
STUDY_PLOT_FILES = ("optuna_history.png", "optuna_importances.png")
EVALUATION_FILE = "evaluation.json"
ATTENTION_DIR = "attention"
FINETUNED_SUFFIX = "_best.pt"
OOF_FILE = "oof_predictions.csv"
FOLDS_DIR = "folds"
FOLD_PREFIX = "fold_"

HEAD_FORMAT = "arena.head/1"


def finetuned_name(backbone: str) -> str:
    """train-full's best checkpoint name: ``inception_resnet_v2.tf_in1k`` -> ``inception_resnet_v2_best.pt``."""
    return backbone.split(".")[0] + FINETUNED_SUFFIX


def fold_dir(models: str | os.PathLike, i: int) -> Path:
    """The models folder of fold ``i`` of a K-fold split: ``<models>/folds/fold_<i>``."""
    return Path(models) / FOLDS_DIR / f"{FOLD_PREFIX}{int(i)}"


def fold_dirs(models: str | os.PathLike) -> list[Path]:
    """The fold folders under ``<models>/folds`` (or under ``models`` itself when it is a ``folds`` folder), in
    fold order; empty when there are none."""
    root = Path(models)
    if root.name != FOLDS_DIR:
        root = root / FOLDS_DIR
    found = [p for p in root.glob(FOLD_PREFIX + "*")
             if p.is_dir() and p.name[len(FOLD_PREFIX):].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(FOLD_PREFIX):]))


def find_finetuned(models: str | os.PathLike) -> Path | None:
    """The fine-tuned checkpoint in ``models`` (``*_best.pt``; the newest when there are several), or None."""
    found = sorted(Path(models).glob("*" + FINETUNED_SUFFIX), key=lambda p: (p.stat().st_mtime, p.name))
    if len(found) > 1:
        log.warning("several fine-tuned checkpoints in %s (%s); using the newest, %s", models,
                    ", ".join(p.name for p in found), found[-1].name)
    return found[-1] if found else None


def resolve_frames(models: str | os.PathLike, frames: int | None = None) -> tuple[int, str]:
    """Frames per video and where the number came from: the option, else ``frame_test.json``, else 24.

    Raises:
        ModelsError: ``frame_test.json`` is unreadable, or a frame count is outside 1..512.
    """
    if frames is not None:
        if not 1 <= int(frames) <= MAX_FRAMES:
            raise ModelsError(f"--frames must be in 1..{MAX_FRAMES}, got {frames}; the usual choices are 24, 32, 48.")
        return int(frames), "--frames option"
    path = Path(models) / FRAME_TEST_FILE
    if not path.is_file():
        return DEFAULT_FRAMES, f"default ({DEFAULT_FRAMES}; no {FRAME_TEST_FILE})"
    try:
        k = int(json.loads(path.read_text(encoding="utf-8"))["recommended_frames"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ModelsError(f"{path}: cannot read recommended_frames ({type(exc).__name__}: {exc}); rerun "
                          "`arena frame-test` or pass --frames K.") from exc
    if not 1 <= k <= MAX_FRAMES:
        raise ModelsError(f"{path}: recommended_frames is {k}; rerun `arena frame-test` or pass --frames K.")
    return k, str(path)


def load_torch(path: str | os.PathLike, *, rerun: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a dict checkpoint, or `ModelsError` naming the file and ``rerun``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; all mean "unusable file"
        raise ModelsError(
            f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}). A checkpoint that needs arbitrary pickle code is refused; "
            f"rerun {rerun}."
        ) from exc
    if not isinstance(ckpt, dict):
        raise ModelsError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}; rerun {rerun}.")
    return ckpt


def save_torch(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically (a reader, or a resumed run after ``kill -9``, sees the old or the new file)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _need(ckpt: dict[str, Any], key: str, path: Path, rerun: str) -> Any:
    if key not in ckpt:
        raise ModelsError(f"{path}: missing {key!r} (keys found: {', '.join(sorted(ckpt))}); rerun {rerun}.")
    return ckpt[key]


@dataclass
class HeadCheckpoint:
    """``best_head.pt``: the attention head tuned on cached features, and what it was tuned on.

    Attributes:
        config: ``DetectorHead`` constructor arguments.
        state_dict: the head's weights, including its input standardisation (``feat_mean``/``feat_std``).
        frames: frames per video the head was trained with.
        params: the tuned hyper-parameters (lr, weight decay, ...).
        metrics: validation metrics of the chosen trial.
        provenance: the provenance of the cache whose features it was trained on (a dict): the encoder it needs.
        calibration: the temperature fitted on validation predictions (`arena.calibration.fit_calibration`); empty
            in checkpoints written before calibration, which then predict with T = 1.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    frames: int
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    RERUN = "`arena tune-head`"

    def build(self) -> DetectorHead:
        """The head in eval mode, weights loaded."""
        head = DetectorHead(**self.config)
        head.load_state_dict(self.state_dict)
        return head.eval()

    def save(self, path: str | os.PathLike) -> Path:
        calibration = {"calibration": json.loads(json.dumps(self.calibration))} if self.calibration else {}
        return save_torch({"format": HEAD_FORMAT, "config": dict(self.config), "state_dict": self.state_dict,
                           "frames": int(self.frames), "params": json.loads(json.dumps(self.params)),
                           "metrics": json.loads(json.dumps(self.metrics)), "provenance": self.provenance,
                           **calibration}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadCheckpoint:
        """Read ``best_head.pt``; `ModelsError` names the file when it is not a safe arena head checkpoint."""
        path = Path(path)
        ckpt = load_torch(path, rerun=cls.RERUN)
        if ckpt.get("format") != HEAD_FORMAT:
            raise ModelsError(f"{path}: not an arena head checkpoint (format {HEAD_FORMAT!r} expected, found "
                              f"{ckpt.get('format')!r}); rerun {cls.RERUN}.")
        prov = ckpt.get("provenance", {})
        if not isinstance(prov, dict):
            raise ModelsError(f"{path}: the cache provenance must be a dict, got {type(prov).__name__}; "
                              f"rerun {cls.RERUN}.")
        out = cls(config=dict(_need(ckpt, "config", path, cls.RERUN)),
                  state_dict=_need(ckpt, "state_dict", path, cls.RERUN), frames=int(ckpt.get("frames", 0)),
                  params=dict(ckpt.get("params", {})), metrics=dict(ckpt.get("metrics", {})), provenance=prov,
                  calibration=dict(ckpt.get("calibration") or {}))
        try:
            out.build()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelsError(f"{path}: the weights do not fit the head configuration {out.config}: "
                              f"{(str(exc).splitlines() or [''])[0][:300]}; rerun {cls.RERUN}.") from exc
        return out


@dataclass
class DetectorCheckpoint:
    """``<backbone>_best.pt``: the fine-tuned encoder + head of ``train-full``, with the seed's checkpoint keys.

    Keys: ``epoch, model_state_dict, optimizer_state_dict, val_acc, val_f1, val_auc, history, config``. ``config``
    is train-full's resolved configuration; rebuilding needs its ``backbone``, ``image_size``, ``seed`` and
    ``head`` (``DetectorHead`` arguments). ``config["calibration"]``, when present, is the temperature fitted on the
    best epoch's validation predictions (`arena.calibration.fit_calibration`); without it the model uses T = 1.
    """

    epoch: int
    model_state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    optimizer_state_dict: dict[str, Any] = field(default_factory=dict)
    val_acc: float | None = None
    val_f1: float | None = None
    val_auc: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    RERUN = "`arena train-full`"
    KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "val_acc", "val_f1", "val_auc", "history", "config")

    @property
    def backbone(self) -> str:
        return str(self.config["backbone"])

    def build(self) -> Detector:
        """Encoder + head with every weight from the checkpoint (the encoder is built random, then overwritten)."""
        encoder = create_encoder(self.backbone, pretrained=False, image_size=self.config.get("image_size"),
                                 seed=int(self.config.get("seed", 0)))
        detector = Detector(encoder, DetectorHead(**self.config["head"]))
        detector.load_state_dict(self.model_state_dict)
        return detector.eval()

    def save(self, path: str | os.PathLike) -> Path:
        return save_torch({k: getattr(self, k) for k in self.KEYS}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DetectorCheckpoint:
        path = Path(path)
        ckpt = load_torch(path, rerun=cls.RERUN)
        cfg = _need(ckpt, "config", path, cls.RERUN)
        if not isinstance(cfg, dict) or not cfg.get("backbone") or not isinstance(cfg.get("head"), dict):
            found = ", ".join(sorted(cfg)) if isinstance(cfg, dict) else type(cfg).__name__
            raise ModelsError(f"{path}: config must name the backbone and the head configuration (found: {found}); "
                              f"rerun {cls.RERUN}.")
        return cls(epoch=int(ckpt.get("epoch", -1)), model_state_dict=_need(ckpt, "model_state_dict", path, cls.RERUN),
                   config=cfg, optimizer_state_dict=ckpt.get("optimizer_state_dict", {}),
                   val_acc=ckpt.get("val_acc"), val_f1=ckpt.get("val_f1"), val_auc=ckpt.get("val_auc"),
                   history=list(ckpt.get("history", [])))
