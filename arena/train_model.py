"""The model fine-tuning starts from: the backbone (timm) + the attention head, tuned by ``tune-head`` when it fits.

``tune-head`` trains the head on cached, eval-mode features; fine-tuning starts from it when it was tuned on this
very backbone (same name, weights and input size), else from a fresh head with the seed's sizes. On a random-init
backbone the train-mode features are much larger than the cached ones, so `calibrate_head_stats` can recompute the
head's input standardisation first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from arena.cache.provenance import NO_CROP
from arena.clips import ClipDataset
from arena.errors import ModelsError, TrainError
from arena.faces.modes import crop_provenance
from arena.faces.stage import FaceCropper
from arena.isolation import load
from arena.model import Detector, DetectorHead, FrameEncoder, create_encoder
from arena.models_folder import BEST_HEAD_FILE, HeadCheckpoint
from arena.runtime import autocast, precision_name
from arena.train_config import TrainConfig
from arena.train_data import eval_dataset, limit_items

log = logging.getLogger(__name__)


@dataclass
class TunedHead:
    """The starting head from ``tune-head``: its checkpoint, optimiser settings and where it came from."""

    checkpoint: HeadCheckpoint
    source: str

    @property
    def lr(self) -> float | None:
        lr = self.checkpoint.params.get("lr")
        return None if lr is None else float(lr)

    @property
    def weight_decay(self) -> float | None:
        wd = self.checkpoint.params.get("weight_decay")
        return None if wd is None else float(wd)


def load_tuned_head(models: str | Path) -> TunedHead | None:
    """``best_head.pt`` of the models folder (written by ``arena tune-head``); None when absent.

    Raises:
        ModelsError: the file exists but is not a safe arena head checkpoint.
    """
    path = Path(models) / BEST_HEAD_FILE
    if not path.is_file():
        return None
    return TunedHead(HeadCheckpoint.load(path), source=f"file:{path}")


def tuned_head_mismatch(tuned: TunedHead, encoder: FrameEncoder, crop: dict | None = None) -> list[str]:
    """Why the tuned head does not fit this backbone and crop mode (its features came from other ones), or []."""
    prov, config = tuned.checkpoint.provenance, tuned.checkpoint.config
    wanted = {"backbone": encoder.name, "weights_source": encoder.weights_source,
              "input_size": list(encoder.input_size), "feature_dim": encoder.feature_dim,
              "crop": crop or dict(NO_CROP)}
    have = {"backbone": prov.get("backbone"), "weights_source": prov.get("weights_source"),
            "input_size": list(prov["input_size"]) if prov.get("input_size") is not None else None,
            "feature_dim": config.get("dim", prov.get("feature_dim")), "crop": prov.get("crop") or dict(NO_CROP)}
    return [f"{k}: tuned on {have[k]!r}, training {wanted[k]!r}" for k in wanted if have[k] != wanted[k]]


def build_model(cfg: TrainConfig, tuned: TunedHead | None) -> Detector:
    """Backbone + attention head: the tuned head (sizes, weights, feature statistics) when it was tuned on this very
    backbone, else a fresh head with the seed's sizes. ``model.head_init_source`` says which.

    Raises:
        ModelsError: ``head_init="tuned"`` and the tuned head came from other features.
        WeightsUnavailable: the backbone's weights cannot be loaded.
    """
    encoder = create_encoder(cfg.backbone, pretrained=cfg.pretrained and cfg.weights is None, weights=cfg.weights,
                             image_size=cfg.image_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's init, whatever the backbone consumed
    if tuned is not None:
        mismatch = tuned_head_mismatch(tuned, encoder, crop_provenance(cfg.crop))
        if mismatch and cfg.head_init == "tuned":
            raise ModelsError(f"{tuned.source} was tuned on other features: {'; '.join(mismatch)}. Rerun features "
                              "and tune-head with this backbone, or pass --head-init default.")
        if mismatch:
            log.warning("not starting from %s (its features came from another backbone: %s); fresh head instead",
                        tuned.source, "; ".join(mismatch))
            tuned = None
    head = tuned.checkpoint.build().train() if tuned is not None else DetectorHead(encoder.feature_dim)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    model = Detector(encoder, head)
    model.head_init_source = tuned.source if tuned is not None else "default"
    return model


@torch.no_grad()
def calibrate_head_stats(model: Detector, items: list, *, frames: int, device: torch.device,
                         amp_dtype: torch.dtype | None, videos: int = 16, seed: int = 0,
                         faces: FaceCropper | None = None) -> int:
    """Set the head's input standardisation from train-mode backbone features of a few training clips.

    BatchNorm runs in train mode as in training (its running statistics are restored afterwards, so the only
    effect is on the head's ``feat_mean``/``feat_std``). Returns the number of frames the statistics came from.

    Raises:
        TrainError: none of the clips could be decoded.
    """
    encoder, head = model.encoder, model.head
    ds: ClipDataset = eval_dataset(limit_items(items, videos, seed), frames=frames, size=tuple(encoder.input_size),
                                   faces=faces)
    saved = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    was_training = encoder.training
    encoder.train()
    feats = []
    try:
        for i in range(len(ds)):
            clip = load(ds, i)  # whatever one video raises is its failure: left out like an undecodable one
            if not clip.ok:
                continue
            with autocast(device, precision_name(amp_dtype)):
                f = encoder(clip.views[0].to(device)).float()
            feats.append(f[torch.as_tensor(clip.valid, device=device)])
    finally:
        encoder.load_state_dict(saved)
        encoder.train(was_training)
    if not feats:
        raise TrainError(f"none of the {len(ds)} training clips picked to calibrate the head's input statistics "
                         "could be decoded; check the videos with `arena inspect`, or pass --head-stats keep.")
    x = torch.cat(feats)
    head.set_feature_stats(x.mean(0), x.std(0))
    return int(x.shape[0])
