"""Training one attention head on cached features: the inner loop of every tuning trial and of the frame test.

Speed: features are standardised once per frame count and the training loop runs under the autocast dtype of
``arena.runtime`` (bf16 where the CPU/GPU has native bf16 matmuls, 4x float32 on AVX512-BF16); the returned loss
and metrics come from one float32 pass of the plain ``DetectorHead.forward`` over the raw features, the path
submission uses. Training is deterministic for given (params, data, config) on one device and thread count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from arena import metrics
from arena.errors import OptionError
from arena.head_data import HeadData
from arena.model import DetectorHead
from arena.runtime import autocast, autocast_dtype, needs_grad_scaler

HIDDEN = 256  # the classifier's hidden width (the seed notebook's head); not searched
HEAD_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class HeadParams:
    """One point of the search space: the head's hyper-parameters and the frames per video it reads."""

    attn_dim: int = 256
    dropout: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 1e-5
    frames: int = 24
    tta_aug: bool = False  # a random TTA view per video per epoch instead of the original view
    input_dropout: float = 0.0  # dropout on the standardised frame features (0 = the seed's head)

    def __post_init__(self) -> None:
        if self.attn_dim < 1:
            raise OptionError(f"attn_dim must be >= 1; got {self.attn_dim}.")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise OptionError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise OptionError(f"lr must be > 0 and weight_decay >= 0; got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}.")
        if self.frames < 1:
            raise OptionError(f"frames must be >= 1; got {self.frames}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadParams:
        """From a dict that may hold other keys too (``best_head_params.json`` also has ``hidden``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class HeadTrainConfig:
    """How one head is trained (the same for every trial of a study).

    ``precision`` is the autocast policy of the training loop (``arena.runtime.autocast_dtype``): auto, fp32,
    bf16, or fp16 (CUDA only, with loss scaling).
    """

    max_epochs: int = 30
    patience: int = 4
    batch_size: int = 64  # videos per step
    seed: int = 0
    min_delta: float = 1e-4
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in HEAD_PRECISIONS:
            raise OptionError(f"Invalid precision ({self.precision}). Supported values are "
                              f"{', '.join(HEAD_PRECISIONS)}.")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise OptionError(f"max_epochs, patience and batch_size must be >= 1; got {self.max_epochs}, "
                              f"{self.patience}, {self.batch_size}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadTrainConfig:
        """From a dict that may hold other keys too (a study summary's ``train_config``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class HeadResult:
    """A trained head: its best-epoch weights, validation metrics and the per-epoch validation losses."""

    params: HeadParams
    val_loss: float
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    history: list[float]
    state_dict: dict[str, torch.Tensor]
    head_config: dict[str, Any]
    val_probs: np.ndarray

    def __repr__(self) -> str:
        return (f"HeadResult(val_loss={self.val_loss:.4f}, best_epoch={self.best_epoch}, "
                f"epochs_run={self.epochs_run}, params={self.params})")


@torch.no_grad()
def predict_probs(head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """P(fake) per video from features ``[M, W, K, d]``, averaged over the W views (TTA mean)."""
    was_training = head.training
    head.eval()
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for w in range(x.shape[1]):
        for start in range(0, x.shape[0], chunk):
            logits, _ = head(x[start:start + chunk, w], mask[start:start + chunk])
            out[start:start + chunk] += F.softmax(logits.float(), dim=-1)[:, 1].double()
    head.train(was_training)
    return (out / x.shape[1]).cpu()


def _standardized(data: HeadData, mean: torch.Tensor, std: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised train/val features in ``dtype``, computed once per (data, dtype) and kept on ``data``.

    Every trial of a frame count uses the same training statistics, so standardising once saves a subtract, a
    divide and two conversions of every batch in every epoch of every trial.
    """
    key = (dtype, mean.sum().item(), std.sum().item())
    memo = data.__dict__.setdefault("_standardized", {})
    if key not in memo:
        def conv(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.shape, dtype=dtype, device=x.device)
            for start in range(0, x.shape[0], 32):  # chunks: no full float32 copy of the split
                out[start:start + 32] = ((x[start:start + 32].float() - mean) / std).to(dtype)
            return out

        memo.clear()  # one dtype at a time is enough: keep memory bounded
        memo[key] = (conv(data.train_x), conv(data.val_x))
    return memo[key]


def _probs_standardized(head: DetectorHead, z: torch.Tensor, mask: torch.Tensor, precision: str,
                        chunk: int = 512) -> np.ndarray:
    """Validation P(fake) from already-standardised features (the fast per-epoch check), TTA-mean over views."""
    out = torch.zeros(z.shape[0], dtype=torch.float64)
    with torch.no_grad(), autocast(z.device, precision):
        for w in range(z.shape[1]):
            for start in range(0, z.shape[0], chunk):
                logits = head.forward_standardized(z[start:start + chunk, w], mask[start:start + chunk])[0].float()
                out[start:start + chunk] += F.softmax(logits, dim=-1)[:, 1].double().cpu()
    return (out / z.shape[1]).numpy()


def train_head(params: HeadParams, data: HeadData, *, config: HeadTrainConfig = HeadTrainConfig(),
               on_epoch: Callable[[int, float], None] | None = None) -> HeadResult:
    """Train one head on ``data`` with early stopping on validation log loss; the best epoch's head is returned.

    Args:
        params: head hyper-parameters; ``params.frames`` must equal ``data.frames``.
        config: epochs, patience, batch size (videos), seed and precision.
        on_epoch: called with ``(epoch, validation log loss)`` after every epoch; it may raise to stop training
            (an Optuna objective reports the loss there and raises ``optuna.TrialPruned``).
    """
    if params.frames != data.frames:
        raise ValueError(f"params ask for {params.frames} frames but the data has {data.frames}.")
    device = data.train_x.device
    dtype = autocast_dtype(device, config.precision) or torch.float32
    torch.manual_seed(config.seed)  # init + dropout
    gen = torch.Generator().manual_seed(config.seed + 1)  # batches and augmentation views
    head = DetectorHead(data.dim, attn_dim=params.attn_dim, hidden=HIDDEN, dropout=params.dropout,
                        input_dropout=params.input_dropout)
    head.set_feature_stats(*data.feature_stats())
    head.to(device)
    train_z, val_z = _standardized(data, head.feat_mean, head.feat_std, dtype)
    opt = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(dtype))  # fp16 only: a no-op otherwise
    n, n_views = data.train_x.shape[:2]
    y_val = data.val_y.cpu().numpy()
    best_loss, best_epoch, best_state = math.inf, -1, None
    history: list[float] = []
    for epoch in range(config.max_epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        # A random TTA view per video per epoch, drawn for all videos at once.
        views = torch.randint(n_views, (n,), generator=gen) if params.tta_aug else torch.zeros(n, dtype=torch.long)
        perm, views = perm.to(device), views.to(device)
        for start in range(0, n, config.batch_size):
            idx = perm[start:start + config.batch_size]
            with autocast(device, config.precision):
                logits, _ = head.forward_standardized(train_z[idx, views[idx]], data.train_mask[idx])
            loss = F.cross_entropy(logits.float(), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        head.eval()
        val_loss = metrics.log_loss(y_val, _probs_standardized(head, val_z, data.val_mask, config.precision))
        history.append(val_loss)
        if val_loss < best_loss - config.min_delta or best_state is None:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, val_loss)
        if epoch - best_epoch >= config.patience:
            break
    assert best_state is not None
    head.load_state_dict(best_state)
    probs = predict_probs(head, data.val_x, data.val_mask).numpy()  # float32, raw features: the submission path
    summary = metrics.summary(y_val, probs)
    return HeadResult(params=params, val_loss=summary["log_loss"], metrics=summary, best_epoch=best_epoch,
                      epochs_run=len(history), history=history,
                      state_dict={k: v.cpu() for k, v in best_state.items()}, head_config=head.config(),
                      val_probs=probs)
