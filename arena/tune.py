"""Optuna tuning of the attention head on cached features, and the frame-count test.

The cache holds backbone features for every video, TTA variant and frame count, so a trial only trains the
small head: the training split is loaded into memory once per frame count (float16 ``[N, V, K, d]``) and each
epoch is a handful of batched tensor ops over an index permutation -- no per-video Python loop, no decoding.

Design decisions (see ``tune_head``):

* Objective: validation log loss of the best epoch (early stopping restores it); AUC, accuracy and F1 are
  stored as trial user attributes. Validation uses the persisted split file, never test data.
* ``n_trials`` is a *total target of finished trials* (complete or pruned) in the study, so running the same
  command again after an interruption resumes and stops at the same count.
* A trial left RUNNING by a dead worker is failed on the next start and its parameters are enqueued again
  (retried), so nothing is lost and nothing stays RUNNING forever. Workers on this host are recognised by
  pid + process start time; on PostgreSQL, Optuna's heartbeat covers workers on other machines.
* The sampler is re-seeded before every trial from (seed, number of finished trials), so a study that was
  killed and resumed proposes the same parameters as one that ran straight through.
* The saved best head is retrained once with the best parameters and the same seed; training is
  deterministic, so it equals the best trial's head (its validation loss is recorded next to the trial's).
* Speed: features are standardised once per frame count and the training loop runs in bf16 where the CPU/GPU
  has native bf16 matmuls (4x float32 on AVX512-BF16); each trial's reported loss and metrics come from one
  float32 pass of the plain ``DetectorHead.forward`` over the raw features, the path submission uses.
* Ctrl-C: the interrupted trial is failed by Optuna and queued again, so a rerun continues like kill -9 does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from arena import metrics
from arena._files import atomic_write, atomic_write_text

ATTN_CHOICES = (64, 128, 256, 512)
DEFAULT_FRAMES = (24, 32, 48)
# The seed notebook's head: enqueued as trial 0 so the study starts from the known baseline.
SEED_DEFAULTS: dict[str, Any] = {"attn_dim": 256, "dropout": 0.5, "lr": 1e-4, "weight_decay": 1e-5,
                                 "tta_aug": False, "input_dropout": 0.0}
HIDDEN = 256
BEST_PARAMS_FILE = "best_head_params.json"
BEST_HEAD_FILE = "best_head.pt"
SUMMARY_FILE = "study_summary.json"
FRAME_TEST_FILE = "frame_test.json"
HEAD_FORMAT = "arena.head/1"
# How many times the parameters of a trial killed with its worker are retried before giving up on them.
MAX_RETRIES = 2


# ------------------------------------------------------------------------------------------------ data


@dataclass
class HeadData:
    """In-memory features of one frame count for the train and validation parts of the split.

    Attributes:
        frames: frames per video ``K``.
        variants: names of the TTA variants along ``V`` of ``train_x``; index 0 is the un-augmented view.
        train_x: float16 ``[N, V, K, d]``; train_mask: bool ``[N, K]`` (True = real frame); train_y: int64 ``[N]``.
        val_x: float16 ``[M, W, K, d]`` (W validation views whose probabilities are averaged); val_mask, val_y.
    """

    frames: int
    variants: tuple[str, ...]
    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_mask: torch.Tensor
    val_y: torch.Tensor
    train_keys: list[str] = field(default_factory=list)
    val_keys: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_x = torch.as_tensor(self.train_x)
        self.val_x = torch.as_tensor(self.val_x)
        self.train_mask = torch.as_tensor(self.train_mask, dtype=torch.bool)
        self.val_mask = torch.as_tensor(self.val_mask, dtype=torch.bool)
        self.train_y = torch.as_tensor(self.train_y, dtype=torch.int64)
        self.val_y = torch.as_tensor(self.val_y, dtype=torch.int64)
        for name in ("train", "val"):
            x, mask, y = (getattr(self, f"{name}_{s}") for s in ("x", "mask", "y"))
            if x.ndim != 4:
                raise ValueError(f"{name}_x must be [N, V, K, d]; got shape {tuple(x.shape)}.")
            n, _, k, _ = x.shape
            if k != self.frames:
                raise ValueError(f"{name}_x has {k} frames per video but frames={self.frames}.")
            if tuple(mask.shape) != (n, k) or tuple(y.shape) != (n,):
                raise ValueError(f"{name}: mask {tuple(mask.shape)} / labels {tuple(y.shape)} do not match "
                                 f"features {tuple(x.shape)}; expected mask ({n}, {k}) and labels ({n},).")
            if not bool(((y == 0) | (y == 1)).all()):
                raise ValueError(f"{name} labels must be 0 (real) or 1 (fake).")
            if int(y.sum()) in (0, n):
                raise ValueError(f"{name} part needs both classes; got {int(y.sum())} fake of {n} videos.")
        if self.train_x.shape[-1] != self.val_x.shape[-1]:
            raise ValueError(f"train features are {self.train_x.shape[-1]}-d but validation features are "
                             f"{self.val_x.shape[-1]}-d.")
        if len(self.variants) != self.train_x.shape[1]:
            raise ValueError(f"{len(self.variants)} variant names for {self.train_x.shape[1]} variants in train_x.")

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device | str) -> HeadData:
        """Move the tensors (features stay float16) to ``device``."""
        moved = {f: getattr(self, f).to(device) for f in
                 ("train_x", "train_mask", "train_y", "val_x", "val_mask", "val_y")}
        return dataclasses.replace(self, **moved)

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per feature over the real frames of the training videos' un-augmented view (memoised)."""
        if "_stats" not in self.__dict__:
            self.__dict__["_stats"] = self._compute_stats()
        return self.__dict__["_stats"]

    def _compute_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        total = torch.zeros(d, dtype=torch.float64)
        total_sq = torch.zeros(d, dtype=torch.float64)
        count = 0
        for start in range(0, self.train_x.shape[0], 64):  # chunks: no full float64 copy of the split
            x = self.train_x[start:start + 64, 0].double().cpu()
            m = self.train_mask[start:start + 64].cpu()
            rows = x[m]
            total += rows.sum(0)
            total_sq += (rows * rows).sum(0)
            count += rows.shape[0]
        if count == 0:
            raise ValueError("no valid training frame to compute feature statistics from.")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()


def load_head_data(cache: Any, train_items: Iterable[Any], val_items: Iterable[Any], frames: int, *,
                   val_variants: Sequence[str] = ("original",)) -> HeadData:
    """Read the split's features for ``frames`` frames per video from a feature cache into memory.

    Args:
        cache: an opened ``arena.cache.FeatureCache``.
        train_items, val_items: objects with ``.key`` and ``.label`` (``arena.data.VideoItem``).
        frames: one of the cache's frame counts.
        val_variants: views evaluated on validation (probabilities averaged); "original" by default.

    Raises:
        ValueError: frame count not in the cache, videos of the split missing from the cache, or labels that
            disagree with the cache.
    """
    prov = cache.provenance
    counts = tuple(int(c) for c in prov.frame_counts)
    if frames not in counts:
        raise ValueError(f"frames={frames} is not in the cache (it holds frame counts {counts}); pick one of those "
                         "or rebuild the cache with `arena features --frames ...`.")
    variants = tuple(prov.variants)
    if "original" not in variants:
        raise ValueError(f"the cache has no 'original' variant (variants {variants}); rebuild it with "
                         "`arena features`.")
    train_variants = ("original",) + tuple(v for v in variants if v != "original")
    unknown = [v for v in val_variants if v not in variants]
    if unknown:
        raise ValueError(f"validation variants {unknown} are not in the cache (it holds {variants}).")
    cached = set(cache.keys)
    failures = cache.failures() if hasattr(cache, "failures") else {}
    where = ", ".join(str(p) for p in getattr(cache, "paths", [])) or "the feature cache"
    skipped: dict[str, str] = {}
    parts: dict[str, tuple[list[str], list[int]]] = {}
    for name, items in (("train", train_items), ("val", val_items)):
        keys, labels, missing = [], [], []
        for item in items:
            if item.key in failures:  # feature extraction failed: leave it out and report it
                skipped[item.key] = f"feature extraction failed: {failures[item.key]}"
                continue
            if item.key not in cached:
                missing.append(item.key)
                continue
            cached_label = cache.label(item.key)
            if cached_label is not None and item.label is not None and int(cached_label) != int(item.label):
                raise ValueError(f"{item.key}: the split says label {item.label} but the cache says {cached_label}; "
                                 "the dataset changed since the cache was built -- rebuild it with `arena features`.")
            keys.append(item.key)
            labels.append(int(item.label))
        if missing:
            raise ValueError(f"{len(missing)} {name} video(s) of the split are not in {where} "
                             f"(e.g. {', '.join(missing[:3])}); run `arena features` again to complete it.")
        parts[name] = (keys, labels)
    train_x, train_mask = cache.batch(parts["train"][0], frames, list(train_variants))
    val_x, val_mask = cache.batch(parts["val"][0], frames, list(val_variants))
    return HeadData(frames=frames, variants=train_variants,
                    train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float16)),
                    train_mask=torch.from_numpy(np.asarray(train_mask, dtype=bool)),
                    train_y=torch.tensor(parts["train"][1]),
                    val_x=torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float16)),
                    val_mask=torch.from_numpy(np.asarray(val_mask, dtype=bool)),
                    val_y=torch.tensor(parts["val"][1]),
                    train_keys=parts["train"][0], val_keys=parts["val"][0], skipped=skipped)


class HeadDataStore:
    """Loads :class:`HeadData` per frame count on first use and keeps it (a 600-video cache fits in memory)."""

    def __init__(self, loader: Callable[[int], HeadData], frame_counts: Sequence[int], *,
                 device: torch.device | str = "cpu", provenance: dict | None = None) -> None:
        self._loader = loader
        self.frame_counts = tuple(int(k) for k in frame_counts)
        self.device = torch.device(device)
        self.provenance = provenance or {}
        self._data: dict[int, HeadData] = {}

    @classmethod
    def from_arrays(cls, data: dict[int, HeadData], **kwargs: Any) -> HeadDataStore:
        """A store over data already in memory (tests, benchmarks)."""
        return cls(lambda k: data[k], sorted(data), **kwargs)

    @classmethod
    def from_cache(cls, cache: Any, split: Any, *, device: torch.device | str = "cpu",
                   val_variants: Sequence[str] = ("original",)) -> HeadDataStore:
        """A store reading ``split.train``/``split.val`` from an opened feature cache."""
        return cls(lambda k: load_head_data(cache, split.train, split.val, k, val_variants=val_variants),
                   cache.provenance.frame_counts, device=device, provenance=provenance_dict(cache.provenance))

    def get(self, frames: int) -> HeadData:
        if frames not in self.frame_counts:
            raise ValueError(f"frames={frames} is not available; the cache holds {self.frame_counts}.")
        if frames not in self._data:
            self._data[frames] = self._loader(frames).to(self.device)
        return self._data[frames]


def provenance_dict(prov: Any) -> dict[str, Any]:
    """The cache provenance as plain JSON types (tuples become lists), safe for JSON and ``weights_only`` loads."""
    raw = prov.to_dict() if hasattr(prov, "to_dict") else dataclasses.asdict(prov) if dataclasses.is_dataclass(
        prov) else dict(prov)
    return json.loads(json.dumps(raw, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class HeadParams:
    """One point of the search space."""

    attn_dim: int = 256
    dropout: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 1e-5
    frames: int = 24
    tta_aug: bool = False
    input_dropout: float = 0.0  # dropout on the standardised frame features (0 = the seed's head)

    def __post_init__(self) -> None:
        if self.attn_dim < 1:
            raise ValueError(f"attn_dim must be >= 1; got {self.attn_dim}.")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}.")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1; got {self.frames}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """How one head is trained (the same for every trial of a study)."""

    max_epochs: int = 30
    patience: int = 4
    batch_size: int = 64
    seed: int = 0
    min_delta: float = 1e-4
    precision: str = "auto"  # auto | fp32 | bf16: matmul precision of the training loop (see resolve_precision)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Invalid precision ({self.precision}). Supported values are auto, fp32, bf16.")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"max_epochs, patience and batch_size must be >= 1; got {self.max_epochs}, "
                             f"{self.patience}, {self.batch_size}.")


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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 where the hardware has fast bf16 matmuls (CUDA with bf16, AVX512-BF16/AMX CPUs), else fp32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"Invalid precision ({precision}). Supported values are auto, fp32, bf16.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # mkldnn reports bf16 support only with native AVX512-BF16/AMX instructions; emulated bf16 would be slower.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


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


def _probs_standardized(head: torch.nn.Module, z: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype,
                        chunk: int = 512) -> np.ndarray:
    """Validation P(fake) from already-standardised features (the fast per-epoch check), TTA-mean over views."""
    out = torch.zeros(z.shape[0], dtype=torch.float64)
    with torch.no_grad(), _autocast(z.device, dtype):
        for w in range(z.shape[1]):
            for start in range(0, z.shape[0], chunk):
                logits = head.forward_standardized(z[start:start + chunk, w], mask[start:start + chunk])[0].float()
                out[start:start + chunk] += F.softmax(logits, dim=-1)[:, 1].double().cpu()
    return (out / z.shape[1]).numpy()


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_head(params: HeadParams, data: HeadData, *, config: TrainConfig = TrainConfig(),
               trial: Any = None) -> HeadResult:
    """Train one head on ``data`` with early stopping on validation log loss.

    The hot loop runs the head's attention pool and classifier on features standardised once per frame count,
    in bf16 where the hardware has fast bf16 matmuls (``config.precision``). The best epoch's head is then
    evaluated once more through the plain float32 ``DetectorHead.forward`` on the raw features -- the path
    submission uses -- and that is the returned loss and metrics. Deterministic for given (params, data,
    config) on one device and thread count.

    Args:
        params: head hyper-parameters; ``params.frames`` must equal ``data.frames``.
        trial: an Optuna trial; each epoch's validation loss is reported and the trial pruned when the pruner says
            so (``optuna.TrialPruned`` propagates).
    """
    from arena.model import DetectorHead

    if params.frames != data.frames:
        raise ValueError(f"params ask for {params.frames} frames but the data has {data.frames}.")
    device = data.train_x.device
    dtype = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)  # init + dropout
    gen = torch.Generator().manual_seed(config.seed + 1)  # batches and augmentation views
    head = DetectorHead(data.dim, attn_dim=params.attn_dim, hidden=HIDDEN, dropout=params.dropout,
                        input_dropout=params.input_dropout)
    head.set_feature_stats(*data.feature_stats())
    head.to(device)
    train_z, val_z = _standardized(data, head.feat_mean, head.feat_std, dtype)
    opt = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
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
            with _autocast(device, dtype):
                logits, _ = head.forward_standardized(train_z[idx, views[idx]], data.train_mask[idx])
            loss = F.cross_entropy(logits.float(), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        val_loss = metrics.log_loss(y_val, _probs_standardized(head, val_z, data.val_mask, dtype))
        history.append(val_loss)
        if val_loss < best_loss - config.min_delta or best_state is None:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if trial is not None:
            trial.report(val_loss, epoch)
            if trial.should_prune():
                import optuna

                raise optuna.TrialPruned(f"pruned at epoch {epoch} with val log loss {val_loss:.4f}")
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


# ------------------------------------------------------------------------------------------------ Optuna


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


def suggest_params(trial: Any, frame_choices: Sequence[int]) -> HeadParams:
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
    """Optuna objective: suggest head parameters, train on the cached train split, return val log loss."""

    def __init__(self, store: HeadDataStore, *, config: TrainConfig = TrainConfig(),
                 frame_choices: Sequence[int] | None = None) -> None:
        self.store = store
        self.config = config
        self.frame_choices = tuple(frame_choices or store.frame_counts)
        missing = [k for k in self.frame_choices if k not in store.frame_counts]
        if missing:
            raise ValueError(f"frame counts {missing} are not in the cache (it holds {store.frame_counts}).")

    def __call__(self, trial: Any) -> float:
        import optuna

        if isinstance(trial, optuna.trial.Trial):
            trial.set_user_attr("worker", _worker_identity())
        params = suggest_params(trial, self.frame_choices)
        result = train_head(params, self.store.get(params.frames), config=self.config, trial=trial)
        for key in ("auc", "accuracy", "f1", "mean_confidence"):
            trial.set_user_attr(key, result.metrics[key])
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        return result.val_loss


def create_storage(url: str) -> Any:
    """Open an Optuna storage from a URL.

    ``journal:<path>`` → a journal file (several processes on one machine); ``sqlite:///<path>`` → a local
    database (one process); ``postgresql://...`` (or any SQLAlchemy URL) → a shared database (several machines;
    with a heartbeat so trials of a machine that died are failed and retried).
    """
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.name:
            raise ValueError(f"Invalid storage {url!r}: give a file, e.g. journal:models/optuna.journal.")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url)
    if re.match(r"^[a-z][a-z0-9+]*://", url):
        return RDBStorage(url, heartbeat_interval=30, grace_period=120,
                          failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRIES))
    raise ValueError(f"Invalid storage ({url}). Supported values are journal:<file>, sqlite:///<file> and "
                     "database URLs such as postgresql://user@host/db.")


def redact_url(url: str) -> str:
    """The storage URL without a password, for logs and summaries."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time since boot, in clock ticks


def _worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start_ticks(os.getpid())}


def _worker_alive(worker: dict[str, Any]) -> bool:
    pid, start = int(worker.get("pid", -1)), worker.get("start")
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = _proc_start_ticks(pid)
        return now is not None and (start is None or now == start)  # a reused pid has another start time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: Any, *, orphan_grace_s: float = 30.0) -> list[int]:
    """Fail trials left RUNNING by a dead worker and enqueue their parameters again.

    A RUNNING trial is stale when its worker ran on this host and that process is gone (pid + start time), or
    when it has no worker record (killed before it wrote one, which an arena worker does within milliseconds of
    starting the trial) and started more than ``orphan_grace_s`` ago.
    Trials of other hosts are left to the storage heartbeat (PostgreSQL). Each trial's parameters are retried
    at most ``MAX_RETRIES`` times.

    Returns:
        numbers of the trials that were failed.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # the public Study API has no way to change a trial it does not own
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    failed = []
    now = time.time()
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        worker = t.user_attrs.get("worker")
        if worker:
            if worker.get("host") != host or _worker_alive(worker):
                continue
            reason = f"worker {worker.get('host')}:{worker.get('pid')} died while running it"
        else:
            started = t.datetime_start.timestamp() if t.datetime_start else now
            if now - started < orphan_grace_s:
                continue
            reason = f"no worker record and RUNNING for {now - started:.0f} s"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished or failed by someone else meanwhile
        failed.append(t.number)
        _requeue(study, t, trials)
    return failed


# Every HeadParams field is drawn by suggest_params: one source of truth for what a complete trial holds.
PARAM_NAMES = tuple(f.name for f in dataclasses.fields(HeadParams))


def _requeue(study: Any, t: Any, trials: Sequence[Any]) -> None:
    """Enqueue the parameters of a trial that died, unless they were only partly drawn.

    An enqueued trial's parameters come from its ``fixed_params``; a sampled one's only when all were drawn before
    it died. A partly drawn trial is not enqueued: the next trial is sampled with the same seed and history
    (see ``_trial_sampler``), so it draws the very same parameters anyway.
    """
    params = {**t.params, **t.system_attrs.get("fixed_params", {})}
    if set(params) != set(PARAM_NAMES):
        return
    root = t.user_attrs.get("retry_of", t.number)
    if sum(1 for u in trials if u.user_attrs.get("retry_of") == root) < MAX_RETRIES:
        attrs = {"retry_of": root, **({"seed_defaults": True} if t.user_attrs.get("seed_defaults") else {})}
        study.enqueue_trial(params, user_attrs=attrs)


def _requeue_interrupted(study: Any) -> None:
    """After Ctrl-C, enqueue the parameters of this process's trial that Optuna just marked FAIL, so a rerun
    runs them first -- as it would after kill -9 -- and the study continues as if never interrupted."""
    me = _worker_identity()
    mine = [t for t in study.get_trials(deepcopy=False)
            if t.state.name == "FAIL" and t.user_attrs.get("worker", {}).get("pid") == me["pid"]
            and t.user_attrs.get("worker", {}).get("host") == me["host"]]
    if mine:
        _requeue(study, mine[-1], study.get_trials(deepcopy=False))


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _trial_sampler(seed: int, finished: int, running: int, n_startup: int) -> Any:
    import optuna

    # Re-seeded per trial from the study's progress: a resumed study draws what an uninterrupted one would.
    trial_seed = int(np.random.SeedSequence([seed, finished, running]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=n_startup, constant_liar=True)


def open_study(storage: Any, study_name: str, *, context: dict[str, Any]) -> Any:
    """Create or load a study; refuse to continue one made from another cache, split or search space."""
    import optuna

    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                load_if_exists=True)
    stored = study.user_attrs.get("context")
    if stored is None:
        study.set_user_attr("context", context)
    else:
        diffs = [f"{k}: study has {stored.get(k)!r}, now {v!r}" for k, v in context.items() if stored.get(k) != v]
        if diffs:
            raise ValueError(f"study {study_name!r} was made with different settings ({'; '.join(diffs)}); its trials "
                             "are not comparable. Use another --study-name (or delete the storage) to start afresh.")
    return study


def run_study(store: HeadDataStore, *, storage: Any, study_name: str = "head", n_trials: int = 50,
              timeout: float | None = None, seed: int = 0, frame_choices: Sequence[int] | None = None,
              config: TrainConfig = TrainConfig(), context: dict[str, Any] | None = None,
              n_startup_trials: int = 10, progress: bool = True) -> Any:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) trials or ``timeout`` passes.

    Returns:
        the ``optuna.Study``.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1 (a total target of finished trials); got {n_trials}.")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds; got {timeout}.")
    with _quiet_optuna():
        return _run_study(store, storage=storage, study_name=study_name, n_trials=n_trials, timeout=timeout,
                          seed=seed, frame_choices=frame_choices, config=config, context=context,
                          n_startup_trials=n_startup_trials, progress=progress)


def _run_study(store: HeadDataStore, *, storage: Any, study_name: str, n_trials: int, timeout: float | None,
               seed: int, frame_choices: Sequence[int] | None, config: TrainConfig, context: dict[str, Any] | None,
               n_startup_trials: int, progress: bool) -> Any:
    import optuna

    objective = Objective(store, config=config, frame_choices=frame_choices)
    ctx = {"frame_choices": list(objective.frame_choices), "train_config": dataclasses.asdict(config),
           "seed": seed, "search_space": json.loads(json.dumps(SEARCH_SPACE)), **(context or {})}
    study = open_study(storage, study_name, context=ctx)
    recover_stale_trials(study)
    defaults = {**SEED_DEFAULTS, "frames": objective.frame_choices[0]}
    if not study.trials:
        study.enqueue_trial(defaults, user_attrs={"seed_defaults": True})
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    deadline = time.monotonic() + timeout if timeout else None
    from tqdm.auto import tqdm

    done = _finished(study)
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=f"tune {study_name}", unit="trial",
               disable=not progress)
    try:
        _loop(study, objective, bar, done=done, n_trials=n_trials, deadline=deadline, seed=seed,
              n_startup_trials=n_startup_trials)
    finally:
        bar.close()
    return study


def _loop(study: Any, objective: Objective, bar: Any, *, done: int, n_trials: int, deadline: float | None,
          seed: int, n_startup_trials: int) -> None:
    from optuna.trial import TrialState

    while done < n_trials and (deadline is None or time.monotonic() < deadline):
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        study.sampler = _trial_sampler(seed, done, running, n_startup_trials)
        try:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
        except KeyboardInterrupt:
            _requeue_interrupted(study)
            raise
        recover_stale_trials(study)
        new_done = _finished(study)
        bar.update(max(0, min(new_done, n_trials) - min(done, n_trials)))
        done = new_done
        try:
            bar.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:  # no complete trial yet
            pass


class _quiet_optuna:
    def __enter__(self) -> None:
        import optuna

        self._level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        import optuna

        optuna.logging.set_verbosity(self._level)


# ------------------------------------------------------------------------------------------------ outputs


def head_checkpoint(result: HeadResult, data: HeadData, *, provenance: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The best-head checkpoint dict (only tensors and JSON types, loadable with ``weights_only=True``)."""
    return {
        "format": HEAD_FORMAT,
        "state_dict": result.state_dict,
        "config": dict(result.head_config),
        "head_config": dict(result.head_config),  # the name train-full and submit read
        "feature_mean": result.state_dict["feat_mean"].clone(),
        "feature_std": result.state_dict["feat_std"].clone(),
        "frames": int(data.frames),
        "params": result.params.to_dict(),
        "metrics": json.loads(json.dumps(result.metrics)),
        "provenance": provenance,
        **(extra or {}),
    }


def load_head(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild the head saved by ``tune-head`` (``best_head.pt``); returns ``(DetectorHead in eval mode, checkpoint)``.

    Raises:
        ValueError: the file is not a head checkpoint (or would need unsafe unpickling).
    """
    from arena.model import DetectorHead

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a safe head checkpoint"
        raise ValueError(f"{path}: cannot be loaded as a head checkpoint with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); rerun `arena tune-head`.") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not an arena head checkpoint (format {HEAD_FORMAT!r} expected); "
                         "rerun `arena tune-head`.")
    head = DetectorHead(**ckpt["config"])
    head.load_state_dict(ckpt["state_dict"])
    return head.eval(), ckpt


def _trial_row(t: Any) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "duration_s": duration, "epochs_reported": len(t.intermediate_values),
            "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "worker"}}


def study_summary(study: Any, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trials, states, best value and durations as a JSON-able dict."""
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
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


def save_plots(study: Any, out_dir: Path) -> dict[str, str]:
    """Optimisation history and parameter importances as PNGs; returns {plot: path or the reason it was skipped}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = (("optuna_history.png", ovm.plot_optimization_history, 1),
             ("optuna_importances.png", ovm.plot_param_importances, 2))
    for name, fn, need in plots:
        if len(complete) < need:
            out[name] = f"skipped: needs {need} complete trials, have {len(complete)}"
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


def finalize_study(study: Any, store: HeadDataStore, models_dir: str | os.PathLike, *,
                   config: TrainConfig = TrainConfig(), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write best_head_params.json, best_head.pt, study_summary.json and the plots; return the summary."""
    models = Path(models_dir)
    models.mkdir(parents=True, exist_ok=True)
    extra = {"train_config": dataclasses.asdict(config), **(extra or {})}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    summary = study_summary(study, extra=extra)
    if complete:
        best = min(complete, key=lambda t: t.value)
        params = HeadParams.from_dict(best.params)
        data = store.get(params.frames)
        result = train_head(params, data, config=config)
        atomic_write_text(models / BEST_PARAMS_FILE, json.dumps({**params.to_dict(), "hidden": HIDDEN}, indent=1))
        ckpt = head_checkpoint(result, data, provenance=store.provenance,
                               extra={"study": {"name": study.study_name, "trial": best.number,
                                                "trial_value": best.value},
                                      "train_config": dataclasses.asdict(config)})
        atomic_write(models / BEST_HEAD_FILE, lambda tmp: torch.save(ckpt, tmp))
        summary["retrained"] = {"val_loss": result.val_loss, "trial_value": best.value,
                                "abs_diff": abs(result.val_loss - best.value), "metrics": result.metrics}
        summary["skipped_videos"] = data.skipped
    summary["plots"] = save_plots(study, models)
    atomic_write_text(models / SUMMARY_FILE, json.dumps(summary, indent=1, default=str))
    return summary


# ------------------------------------------------------------------------------------------------ commands


def _open_inputs(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike,
                 device: str) -> tuple[HeadDataStore, Any, Any]:
    from arena.cache import FeatureCache
    from arena.data import load_dataset, load_split
    from arena.runtime import resolve_device

    dev = resolve_device(device)
    cache = FeatureCache.open(cache_path)
    dataset = load_dataset(data_root, require_test=False)
    split = load_split(dataset, models_dir)
    cache_split = getattr(cache.provenance, "split_sha256", "") or ""
    if cache_split and cache_split != split.sha256:
        raise ValueError(f"the cache {cache_path} was built for split {cache_split[:12]}... but {split.path} is "
                         f"{split.sha256[:12]}...; rebuild the cache with `arena features` or restore that split.")
    return HeadDataStore.from_cache(cache, split, device=dev), cache, split


def tune_head(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
              n_trials: int = 50, timeout: float | None = None, storage: str | None = None,
              study_name: str = "head", seed: int = 0, frames: Sequence[int] | None = None,
              epochs: int = 30, patience: int = 4, batch_size: int = 64, device: str = "auto",
              progress: bool = True) -> dict[str, Any]:
    """``arena tune-head``: run/resume the study until ``n_trials`` finished trials, then write the outputs.

    Returns:
        the study summary (also written to ``<models>/study_summary.json``).
    """
    models = Path(models_dir)
    models.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(models / 'optuna.db').resolve()}"
    store, cache, split = _open_inputs(cache_path, data_root, models, device)
    frame_choices = tuple(frames) if frames else tuple(store.frame_counts)
    config = TrainConfig(max_epochs=epochs, patience=patience, batch_size=batch_size, seed=seed)
    context = {"split_sha256": split.sha256, "feature_dim": int(store.provenance.get("feature_dim", 0) or 0),
               "backbone": store.provenance.get("backbone"), "weights_hash": store.provenance.get("weights_hash")}
    started = time.monotonic()
    study = run_study(store, storage=create_storage(url), study_name=study_name, n_trials=n_trials,
                      timeout=timeout, seed=seed, frame_choices=frame_choices, config=config, context=context,
                      progress=progress)
    elapsed = time.monotonic() - started
    summary = finalize_study(study, store, models, config=config, extra={
        "storage": redact_url(url), "target_trials": n_trials, "seed": seed, "cache": str(cache_path),
        "split_sha256": split.sha256, "frame_choices": list(frame_choices), "this_run_seconds": elapsed})
    summary["reached_target"] = sum(summary["states"].get(s, 0) for s in ("COMPLETE", "PRUNED")) >= n_trials
    return summary


def run_frame_test(store: HeadDataStore, params: HeadParams, *, config: TrainConfig = TrainConfig(),
                   frames: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a head per frame count with ``params`` (same seed) and compare them on the validation split."""
    from tqdm.auto import tqdm

    counts = tuple(frames or store.frame_counts)
    results: dict[str, Any] = {}
    for k in tqdm(counts, desc="frame-test", unit="k", disable=not progress):
        res = train_head(dataclasses.replace(params, frames=k), store.get(k), config=config)
        m = res.metrics
        results[str(k)] = {"auc": m["auc"], "log_loss": m["log_loss"], "accuracy": m["accuracy"], "f1": m["f1"],
                           "mean_confidence": m["mean_confidence"], "best_epoch": res.best_epoch, "n_val": m["n"]}
    # Ties go to fewer frames: cheaper at submission time.
    best = min(counts, key=lambda k: (results[str(k)]["log_loss"], k))
    by_conf = max(counts, key=lambda k: (results[str(k)]["mean_confidence"], -k))
    return {"recommended_frames": int(best), "criterion": "val_log_loss", "results": results,
            "seed_criterion_pick": int(by_conf), "params": params.to_dict(), "train_config": dataclasses.asdict(config)}


def frame_test(cache_path: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | os.PathLike, *,
               frames: Sequence[int] | None = None, seed: int | None = None, epochs: int | None = None,
               patience: int | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """``arena frame-test``: compare the cache's frame counts with the tuned head parameters; write frame_test.json.

    The training settings default to those of the study (``study_summary.json``).
    """
    models = Path(models_dir)
    params_path = models / BEST_PARAMS_FILE
    if not params_path.is_file():
        raise ValueError(f"{params_path} does not exist; run `arena tune-head --models {models}` first.")
    try:
        params = HeadParams.from_dict(json.loads(params_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{params_path}: not a valid parameter file ({exc}); rerun `arena tune-head`.") from exc
    stored: dict[str, Any] = {}
    summary_path = models / SUMMARY_FILE
    if summary_path.is_file():
        stored = json.loads(summary_path.read_text(encoding="utf-8")).get("train_config", {})
    base = TrainConfig(**{k: v for k, v in stored.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    config = dataclasses.replace(base, **{k: v for k, v in (("seed", seed), ("max_epochs", epochs),
                                                          ("patience", patience)) if v is not None})
    store, _, split = _open_inputs(cache_path, data_root, models, device)
    out = run_frame_test(store, params, config=config, frames=frames, progress=progress)
    out.update({"cache": str(cache_path), "split_sha256": split.sha256})
    atomic_write_text(models / FRAME_TEST_FILE, json.dumps(out, indent=1))
    return out
