"""K-fold cross-validation of the attention head on cached features: the K fold heads of one parameter point,
trained together as one batched model.

Fold i's head trains on the videos of the other folds and is validated, and early-stopped, on fold i's. Trained
one after another (``train_head`` per fold) a K-fold trial costs K trials; here the K heads' weights are stacked
along a leading axis, every layer is one batched matmul (``torch.baddbmm``) and one AdamW update covers every head,
so the per-operation costs (dispatch, thread synchronisation, the optimizer's many small updates, the validation
pass) are paid once per step for all heads, and a head that has stopped early drops out of the batch.

Each head is the head ``train_head`` trains on its fold alone (`arena.head_data.FoldData.fold_data`), up to
floating-point rounding (`tests/test_cv_tune.py` compares them):

* the same initial weights (``torch.manual_seed(config.seed)``, then `DetectorHead`), the same standardisation
  (its own training videos' statistics), the same batches and TTA views (its own generator seeded
  ``config.seed + 1``), and on the CPU the very dropout masks (its own generator continuing the stream ``train_head``
  draws them from; on a GPU other masks of the same distribution);
* the same AdamW update, skipping a head that has no batch in a step (its fold gave it fewer training videos);
* early stopping on its own fold's validation log loss, keeping its own best epoch.

The trial's value is the out-of-fold (OOF) log loss: every video scored by the head of its fold (the one that did
not train on it) at that head's best epoch, in float32 through the plain `DetectorHead.forward` (the submission
path). After every epoch ``on_epoch`` gets that epoch's OOF log loss (a head that has stopped counts with its best
epoch), which a study reports to its pruner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from arena import metrics
from arena.head_data import FoldData, feature_stats
from arena.head_train import HIDDEN, HeadParams, HeadResult, HeadTrainConfig, predict_probs
from arena.model import DetectorHead
from arena.runtime import autocast, autocast_dtype, needs_grad_scaler

_BETAS, _EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as train_head uses them
_VAL_CHUNK = 64  # validation videos per head per forward: bounds the [heads, videos, frames, d] float copy


@dataclass
class FoldsResult:
    """The K fold heads of one parameter point and their out-of-fold scores.

    Attributes:
        value: the OOF log loss (of ``oof_probs``), the trial's objective.
        metrics: `arena.metrics.summary` of the OOF predictions.
        folds: fold i's head as ``train_head`` returns it (its weights, fold metrics, best epoch, history).
        oof_probs: float64 ``[N]`` P(fake) of every video of the `FoldData`, by the head of its fold.
        history: the OOF log loss after every epoch (what ``on_epoch`` saw).
    """

    params: HeadParams
    value: float
    metrics: dict[str, Any]
    folds: list[HeadResult]
    oof_probs: np.ndarray
    history: list[float]

    @property
    def best_epochs(self) -> list[int]:
        return [r.best_epoch for r in self.folds]

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return (f"FoldsResult(value={self.value:.4f}, folds={len(self.folds)}, best_epochs={self.best_epochs}, "
                f"params={self.params})")


def _reference(data: FoldData, template: DetectorHead, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Every video's features standardised once with the statistics of all videos, in ``dtype`` (memoised on
    ``data``): ``(z [N, V, T, d], mean, std)``.

    A head's own standardisation (its training videos' statistics) is an affine map of ``z`` per feature, which
    `_logits` folds into the head's first layer and pooled features: the K heads share this one copy, and a step
    gathers its batch from it, as ``train_head`` gathers from its own standardised copy.
    """
    memo = data.__dict__.setdefault("_reference", {})
    if dtype not in memo:
        device = data.x.device
        template.set_feature_stats(*feature_stats(data.x, data.mask))
        mean, std = template.feat_mean.clone().to(device), template.feat_std.clone().to(device)
        z = torch.empty(data.x.shape, dtype=dtype, device=device)
        for start in range(0, z.shape[0], 32):  # chunks: no full float32 copy on the way
            z[start:start + 32] = ((data.x[start:start + 32].float() - mean) / std).to(dtype)
        memo.clear()  # one dtype at a time is enough: keep memory bounded
        memo[dtype] = (z, mean, std)
    return memo[dtype]


def _logits(p: dict[str, torch.Tensor], z: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor,
            beta: torch.Tensor, keep: torch.Tensor | None = None,
            hidden_keep: torch.Tensor | None = None) -> torch.Tensor:
    """`DetectorHead.forward_standardized` of H stacked heads -> logits ``[H, B, 2]``.

    Args:
        z: ``[H, B, T, d]`` features standardised with the reference statistics (`_reference`); head h's own
            standardisation is ``z * alpha[h] + beta[h]`` (``[H, d]`` each), applied through its weights.
        mask: ``[H, B, T]``, True = real frame.
        keep: the input-dropout mask ``[H, B, 1, d]`` (scaled) that ``z`` has already been multiplied by (in place:
            ``z`` is a reused buffer), None in eval or without input dropout.
        hidden_keep: the classifier's dropout mask ``[H, B, hidden]`` (scaled), None in eval.
    """
    h, b, t, d = z.shape
    w1 = p["pool.score.0.weight"]  # [H, a, d]
    shift = beta.unsqueeze(1)  # what standardisation (and input dropout) add to every frame: [H, 1 or B, d]
    if keep is not None:
        shift = shift * keep.squeeze(2)
    bias = torch.baddbmm(p["pool.score.0.bias"].unsqueeze(1), shift, w1.transpose(1, 2))  # [H, 1 or B, a]
    w1 = (w1 * alpha.unsqueeze(1)).transpose(1, 2)
    if keep is None:  # one bias per head: added by the matmul itself
        s = torch.baddbmm(bias, z.reshape(h, b * t, d), w1)
    else:  # one per video
        s = (torch.bmm(z.reshape(h, b * t, d), w1).view(h, b, t, -1) + bias.unsqueeze(2)).view(h, b * t, -1)
    s = torch.baddbmm(p["pool.score.2.bias"].unsqueeze(1), s.tanh(), p["pool.score.2.weight"].transpose(1, 2))
    scores = s.reshape(h, b, t).float()  # softmax in fp32 even under autocast, as AttentionPool
    mask = torch.where(mask.any(dim=-1, keepdim=True), mask, torch.ones_like(mask))
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    pooled = torch.matmul(weights.to(z.dtype).unsqueeze(2), z).squeeze(2) * alpha.unsqueeze(1) + shift
    hidden = torch.relu(torch.baddbmm(p["classifier.0.bias"].unsqueeze(1), pooled,
                                      p["classifier.0.weight"].transpose(1, 2)))
    if hidden_keep is not None:
        hidden = hidden * hidden_keep
    return torch.baddbmm(p["classifier.3.bias"].unsqueeze(1), hidden, p["classifier.3.weight"].transpose(1, 2))


class _Stack:
    """The heads still training, stacked along a leading axis: their weights (autograd leaves), AdamW state and own
    standardisation (``alpha``/``beta``, see `_logits`). ``ids[i]`` is the fold of position i.

    A head that stops early is dropped (`keep`), so that every step runs on whole tensors rather than gathering and
    scattering the running heads' weights and optimizer state.
    """

    def __init__(self, weights: dict[str, torch.Tensor], alpha: torch.Tensor, beta: torch.Tensor, *, lr: float,
                 weight_decay: float) -> None:
        self.ids = list(range(alpha.shape[0]))
        self.weights, self.alpha, self.beta = weights, alpha, beta
        self.exp_avg = {n: torch.zeros_like(p) for n, p in weights.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in weights.items()}
        self.steps = [0] * len(self.ids)
        self.lr, self.weight_decay = lr, weight_decay

    def keep(self, positions: list[int]) -> None:
        """Keep only the heads at ``positions``."""
        sel = torch.tensor(positions, device=self.alpha.device)
        self.ids, self.steps = [self.ids[p] for p in positions], [self.steps[p] for p in positions]
        self.weights = {n: t.detach()[sel].requires_grad_() for n, t in self.weights.items()}
        self.exp_avg = {n: t[sel] for n, t in self.exp_avg.items()}
        self.exp_avg_sq = {n: t[sel] for n, t in self.exp_avg_sq.items()}
        self.alpha, self.beta = self.alpha[sel], self.beta[sel]

    def view(self, positions: list[int] | None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Weights, alpha and beta of the heads at ``positions`` (None: all), gradients flowing to the stack."""
        if positions is None:
            return self.weights, self.alpha, self.beta
        sel = torch.tensor(positions, device=self.alpha.device)
        return {n: t[sel] for n, t in self.weights.items()}, self.alpha[sel], self.beta[sel]

    @torch.no_grad()
    def step(self, positions: list[int] | None) -> None:
        """``torch.optim.AdamW``'s update (its single-tensor form, what it runs on a CPU) of the heads at
        ``positions`` (None: all); each head has its own step count, as it would trained alone."""
        chosen = range(len(self.ids)) if positions is None else positions
        beta1, beta2 = _BETAS
        for p in chosen:
            self.steps[p] += 1
        steps = [self.steps[p] for p in chosen]
        device = self.alpha.device
        step_size = [self.lr / (1 - beta1 ** t) for t in steps]
        bias2 = [(1 - beta2 ** t) ** 0.5 for t in steps]
        same = len(set(steps)) == 1  # the usual case: one step count, scalars as torch's AdamW uses them
        sel = None if positions is None else torch.tensor(positions, device=device)
        for name, w in self.weights.items():
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            param, grad = (w, w.grad) if sel is None else (w[sel], w.grad[sel])
            if sel is not None:
                m, v = m[sel], v[sel]
            param.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if same:
                param.addcdiv_(m, (v.sqrt() / bias2[0]).add_(_EPS), value=-step_size[0])
            else:  # per-head step counts (folds of other sizes took more steps): addcdiv's order of operations
                shape = (-1,) + (1,) * (w.ndim - 1)
                per_head = torch.tensor(bias2, device=device).view(shape)
                param.add_(m * torch.tensor([-x for x in step_size], device=device).view(shape)
                           / (v.sqrt() / per_head).add_(_EPS))
            if sel is not None:
                w.index_copy_(0, sel, param)
                self.exp_avg[name].index_copy_(0, sel, m)
                self.exp_avg_sq[name].index_copy_(0, sel, v)


class _LossScale:
    """fp16 loss scaling per head (``torch.amp.GradScaler``'s defaults), so that an overflow in one head skips
    only that head's step, as it would skip it trained alone. Heads are named by their fold."""

    def __init__(self, n_heads: int) -> None:
        self.scale = [2.0 ** 16] * n_heads
        self.good_steps = [0] * n_heads

    def factors(self, ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.scale[k] for k in ids], device=device)

    @torch.no_grad()
    def unscale(self, weights: dict[str, torch.Tensor], ids: list[int], positions: list[int]) -> list[int]:
        """Divide the stacked gradients (position i: fold ``ids[i]``) by each head's scale; of ``positions`` (the
        heads that took this step), return those whose gradients are finite."""
        inv = torch.tensor([1.0 / self.scale[k] for k in ids], device=next(iter(weights.values())).device)
        finite = torch.ones(len(ids), dtype=torch.bool, device=inv.device)
        for w in weights.values():
            w.grad.mul_(inv.view(-1, *([1] * (w.ndim - 1))))
            finite &= torch.isfinite(w.grad).flatten(1).all(dim=1)
        ok = finite.tolist()
        for p in positions:
            k = ids[p]
            if ok[p]:
                self.good_steps[k] += 1
                if self.good_steps[k] == 2000:
                    self.scale[k], self.good_steps[k] = self.scale[k] * 2.0, 0
            else:
                self.scale[k], self.good_steps[k] = self.scale[k] * 0.5, 0
        return [p for p in positions if ok[p]]


def _padded(parts: list[torch.Tensor], fill: int | float = 0) -> torch.Tensor:
    """Stack 1-D+ tensors of different lengths along a new first axis, padding their first axis with ``fill``."""
    n = max(p.shape[0] for p in parts)
    out = parts[0].new_full((len(parts), n, *parts[0].shape[1:]), fill)
    for i, p in enumerate(parts):
        out[i, :p.shape[0]] = p
    return out


class _Gather:
    """Batches of the reference features (`_reference`) gathered into one reused buffer.

    A fresh ``[heads, videos, frames, d]`` tensor per step (tens of MB, beyond what the allocator recycles) cost more
    in page faults than the copy itself: 40 ms against 6 ms for 5 heads x 64 videos x 32 frames x 1536 on a CPU.
    """

    def __init__(self, z_ref: torch.Tensor, heads: int, videos: int) -> None:
        self.flat = z_ref.view(-1, *z_ref.shape[2:])  # [N * V, T, d]: one row per (video, view)
        self.views = z_ref.shape[1]
        self.buffer = torch.empty(heads * videos * self.flat[0].numel(), dtype=z_ref.dtype, device=z_ref.device)

    def __call__(self, rows: torch.Tensor, views: torch.Tensor | int) -> torch.Tensor:
        """``z_ref[rows, views]`` (``rows``/``views`` ``[H, B]``) in the buffer, valid until the next call."""
        index = (rows * self.views + views).flatten()
        out = self.buffer[:index.numel() * self.flat[0].numel()].view(index.numel(), *self.flat.shape[1:])
        return torch.index_select(self.flat, 0, index, out=out).view(*rows.shape, *self.flat.shape[1:])


def _val_probs(stack: _Stack, data: FoldData, gather: _Gather, rows: list[torch.Tensor],
               precision: str) -> list[np.ndarray]:
    """Validation P(fake) of each head's fold (the per-epoch check), TTA-mean over the validation views."""
    device = data.x.device
    out = [torch.zeros(r.shape[0], dtype=torch.float64) for r in rows]
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, max(r.shape[0] for r in rows), _VAL_CHUNK):
            chunk = [r[start:start + _VAL_CHUNK] for r in rows]
            idx = _padded([c if c.numel() else r[:1] for c, r in zip(chunk, rows, strict=True)]).to(device)
            for view in data.val_views:
                logits = _logits(stack.weights, gather(idx, view), data.mask[idx], stack.alpha, stack.beta)
                fake = F.softmax(logits.float(), dim=-1)[..., 1].double().cpu()
                for k, c in enumerate(chunk):
                    out[k][start:start + c.shape[0]] += fake[k, :c.shape[0]]
    return [(o / len(data.val_views)).numpy() for o in out]


def train_folds(params: HeadParams, data: FoldData, *, config: HeadTrainConfig = HeadTrainConfig(),
                on_epoch: Callable[[int, float], None] | None = None) -> FoldsResult:
    """Train the K fold heads of ``params`` together; each early-stops on its own fold. Returns the OOF result.

    Args:
        params: head hyper-parameters; ``params.frames`` must equal ``data.frames``.
        config: epochs, patience, batch size (videos per head and step), seed and precision, as ``train_head``.
        on_epoch: called with ``(epoch, OOF log loss)`` after every epoch; it may raise to stop training (an Optuna
            objective reports there and raises ``optuna.TrialPruned``).
    """
    if params.frames != data.frames:
        raise ValueError(f"params ask for {params.frames} frames but the data has {data.frames}.")
    device, n_heads = data.x.device, data.folds
    dtype = autocast_dtype(device, config.precision) or torch.float32
    torch.manual_seed(config.seed)  # init: every head starts where train_head's would
    template = DetectorHead(data.dim, attn_dim=params.attn_dim, hidden=HIDDEN, dropout=params.dropout,
                            input_dropout=params.input_dropout)
    masks = []  # each head's dropout stream: train_head's global stream right after the init
    for _ in range(n_heads):
        g = torch.Generator(device)
        if device.type == "cpu":
            g.set_state(torch.get_rng_state())
        else:
            g.manual_seed(config.seed)
        masks.append(g)
    batches = [torch.Generator().manual_seed(config.seed + 1) for _ in range(n_heads)]
    weights = {n: t.detach().unsqueeze(0).repeat(n_heads, *([1] * t.ndim)).to(device).requires_grad_()
               for n, t in template.named_parameters()}
    z_ref, ref_mean, ref_std = _reference(data, template, dtype)
    stats = []
    for k in range(n_heads):  # each head's own statistics, with set_feature_stats' floor of tiny stds
        template.set_feature_stats(*data.fold_stats(k))
        stats.append((template.feat_mean.clone(), template.feat_std.clone()))
    mean, std = (torch.stack(s).to(device) for s in zip(*stats, strict=True))
    # z_own = z_ref * alpha + beta
    stack = _Stack(weights, ref_std / std, (ref_mean - mean) / std, lr=params.lr, weight_decay=params.weight_decay)
    gather = _Gather(z_ref, n_heads, max(config.batch_size, _VAL_CHUNK))
    scaler = _LossScale(n_heads) if needs_grad_scaler(dtype) else None

    train_rows = [data.train_rows(k) for k in range(n_heads)]
    val_rows = [data.val_rows(k) for k in range(n_heads)]
    y_val = [data.y[r.to(device)].cpu().numpy() for r in val_rows]
    y_all = data.y[:data.videos].cpu().numpy()  # the videos: pseudo-fake rows have no OOF
    history: list[list[float]] = [[] for _ in range(n_heads)]
    best: list[tuple[float, int, dict | None, np.ndarray | None]] = [(math.inf, -1, None, None)] * n_heads
    oof_history: list[float] = []
    for epoch in range(config.max_epochs):
        order = []
        for k in stack.ids:  # train_head's draws: a permutation, then (tta_aug) a view per video
            n = train_rows[k].shape[0]
            perm = torch.randperm(n, generator=batches[k])
            views = (torch.randint(data.x.shape[1], (n,), generator=batches[k]) if params.tta_aug
                     else torch.zeros(n, dtype=torch.long))
            order.append((train_rows[k][perm], views[perm]))
        for start in range(0, max(rows.shape[0] for rows, _ in order), config.batch_size):
            positions = [p for p, (rows, _) in enumerate(order) if start < rows.shape[0]]
            step = [(order[p][0][start:start + config.batch_size], order[p][1][start:start + config.batch_size])
                    for p in positions]
            _train_step(stack, None if len(positions) == len(order) else positions, step, data, gather, masks,
                        params, config.precision, dtype, scaler)
        probs = _val_probs(stack, data, gather, [val_rows[k] for k in stack.ids], config.precision)
        latest = dict(zip(stack.ids, probs, strict=True))
        for p, k in enumerate(stack.ids):
            loss = metrics.log_loss(y_val[k], latest[k])
            history[k].append(loss)
            if loss < best[k][0] - config.min_delta or best[k][2] is None:
                best[k] = (loss, epoch, {n: t[p].detach().clone() for n, t in stack.weights.items()}, latest[k])
        oof = np.empty(len(y_all))
        for k in range(n_heads):  # a head that stopped counts with its best epoch
            oof[val_rows[k].numpy()] = latest[k] if k in latest else best[k][3]
        oof_history.append(metrics.log_loss(y_all, oof))
        if on_epoch is not None:
            on_epoch(epoch, oof_history[-1])
        going = [p for p, k in enumerate(stack.ids) if epoch - best[k][1] < config.patience]
        if not going:
            break
        if len(going) < len(stack.ids):
            stack.keep(going)
    return _result(params, data, template, [(b[1], b[2]) for b in best], mean, std, history, oof_history)


def _train_step(stack: _Stack, positions: list[int] | None, step: list[tuple[torch.Tensor, torch.Tensor]],
                data: FoldData, gather: _Gather, masks: list[torch.Generator], params: HeadParams, precision: str,
                dtype: torch.dtype, scaler: _LossScale | None) -> None:
    """One step of the heads at ``positions`` of the stack (None: all), each on its own batch (rows, views), padded
    to the longest batch (the padding weighs 0 in the loss)."""
    device = data.x.device
    ids = stack.ids if positions is None else [stack.ids[p] for p in positions]
    sizes = [rows.shape[0] for rows, _ in step]
    idx = _padded([rows for rows, _ in step]).to(device)
    z = gather(idx, _padded([views for _, views in step]).to(device))
    # Each head's masks from its own generator, in train_head's order: input dropout, then the classifier's.
    keep = hidden_keep = None
    if params.input_dropout > 0:
        keep = _padded([(torch.empty(b, 1, data.dim, device=device)
                         .bernoulli_(1.0 - params.input_dropout, generator=masks[k])
                         / (1.0 - params.input_dropout)).to(dtype) for b, k in zip(sizes, ids, strict=True)], 1.0)
        z.mul_(keep)
    if params.dropout > 0:
        hidden_keep = _padded([torch.empty(b, HIDDEN, dtype=dtype, device=device)
                               .bernoulli_(1.0 - params.dropout, generator=masks[k]).div_(1.0 - params.dropout)
                               for b, k in zip(sizes, ids, strict=True)], 1.0)
    weights, alpha, beta = stack.view(positions)
    with autocast(device, precision):
        logits = _logits(weights, z, data.mask[idx], alpha, beta, keep, hidden_keep)
    loss = F.cross_entropy(logits.float().flatten(0, 1), data.y[idx].flatten(), reduction="none").view(idx.shape)
    share = torch.zeros(idx.shape, device=device)  # each head's mean over its own batch; padding counts 0
    for i, b in enumerate(sizes):
        share[i, :b] = 1.0 / b
    if scaler is not None:
        share = share * scaler.factors(ids, device).unsqueeze(1)
    for w in stack.weights.values():
        w.grad = None
    (loss * share).sum().backward()
    if scaler is not None:
        stepping = scaler.unscale(stack.weights, stack.ids, list(range(len(stack.ids))) if positions is None
                                  else positions)
        positions = None if len(stepping) == len(stack.ids) else stepping
    stack.step(positions)


def _result(params: HeadParams, data: FoldData, template: DetectorHead, best: list[tuple[int, dict]],
            mean: torch.Tensor, std: torch.Tensor, history: list[list[float]],
            oof_history: list[float]) -> FoldsResult:
    """Every head at its best epoch, scored in float32 on raw features (the submission path), and the OOF result."""
    device = data.x.device
    y_all = data.y[:data.videos].cpu().numpy()  # the videos: pseudo-fake rows have no OOF
    oof = np.empty(len(y_all))
    folds = []
    views = torch.tensor(data.val_views, device=device)
    for k, (best_epoch, state) in enumerate(best):
        head = DetectorHead(**template.config())
        head.load_state_dict({**state, "feat_mean": mean[k], "feat_std": std[k]})
        rows = data.val_rows(k)
        dev_rows = rows.to(device)
        probs = predict_probs(head.to(device), data.x[dev_rows.unsqueeze(1), views], data.mask[dev_rows]).numpy()
        oof[rows.numpy()] = probs
        summary = metrics.summary(y_all[rows.numpy()], probs)
        folds.append(HeadResult(params=params, val_loss=summary["log_loss"], metrics=summary, best_epoch=best_epoch,
                                epochs_run=len(history[k]), history=history[k],
                                state_dict={n: t.detach().cpu() for n, t in head.state_dict().items()},
                                head_config=head.config(), val_probs=probs))
    summary = metrics.summary(y_all, oof)
    return FoldsResult(params=params, value=summary["log_loss"], metrics=summary, folds=folds, oof_probs=oof,
                       history=oof_history)
