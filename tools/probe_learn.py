"""Learnability probe for the synthetic demo data: can a random-init InceptionResNetV2 tell its fakes apart?

No ImageNet weights exist on our machines, so the demo must be learnable from scratch. Two probes, both scored
by held-out AUC on the dataset's test split (``test_labels.csv``):

1. frozen: random-init backbone (eval mode, bf16 autocast) -> features of K frames per video, standardised with
   training statistics (random-init features are tiny and half zero) -> mean-pool -> L2 logistic regression.
   A frame-level variant (one sample per frame, probabilities averaged per video) is reported beside it.
2. finetune (``--finetune-steps N``): the whole network, AdamW 1e-4, bf16 autocast, BatchNorm in train mode,
   batches of 4 real + 4 fake training clips, 4 random frames each; evaluated on 4 uniform test frames per video.

Example (generates the data when OUT has none)::

    python tools/probe_learn.py --data /tmp/demo --seed 0 --frames 8 --finetune-steps 50
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchcodec.decoders import VideoDecoder

from arena.demo import generate_dataset


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def load_split(data: Path, csv_name: str) -> tuple[list[Path], np.ndarray]:
    with open(data / csv_name, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [data / r["filename"] for r in rows], np.array([int(r["label"]) for r in rows])


def decode(path: Path, k: int, size: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """K frames (uniform, or random sorted when rng is given) as float [K, 3, size, size] normalised to -1..1."""
    dec = VideoDecoder(str(path))
    n = dec.metadata.num_frames
    idx = np.linspace(0, n - 1, k).astype(np.int64) if rng is None else np.sort(rng.choice(n, k, replace=False))
    frames = dec.get_frames_at(idx.tolist()).data.float() / 255.0
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (frames - 0.5) / 0.5  # inception_resnet_v2: mean = std = 0.5


def make_backbone(seed: int, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)


@torch.no_grad()
def extract(model: torch.nn.Module, paths: list[Path], k: int, size: int) -> torch.Tensor:
    model.eval()
    out = []
    for p in paths:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(model(decode(p, k, size)).float())
    return torch.stack(out)  # [N, K, d]


def logistic(x: torch.Tensor, y: torch.Tensor, wd: float, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin(x)[:, 0], y.float()).backward()
        opt.step()
    return lin


def probe_frozen(data: Path, *, k: int, size: int, seed: int) -> dict[str, float]:
    tr_paths, tr_y = load_split(data, "train_labels.csv")
    te_paths, te_y = load_split(data, "test_labels.csv")
    model = make_backbone(seed)
    t0 = time.perf_counter()
    ftr, fte = extract(model, tr_paths, k, size), extract(model, te_paths, k, size)
    secs = time.perf_counter() - t0
    flat = ftr.reshape(-1, ftr.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-6  # training statistics only
    ztr, zte = (ftr - mean) / std, (fte - mean) / std
    res = {"extract_s": secs, "feature_std": float(flat.std()), "zero_frac": float((flat == 0).float().mean())}
    ytr = torch.tensor(tr_y)
    for wd in (1e-3, 1e-2, 1e-1):
        lin = logistic(ztr.mean(1), ytr, wd)
        with torch.no_grad():
            res[f"auc_meanpool_wd{wd:g}"] = auc(lin(zte.mean(1))[:, 0].numpy(), te_y)
        lin = logistic(ztr.reshape(-1, ztr.shape[-1]), ytr.repeat_interleave(k), wd)
        with torch.no_grad():
            p = torch.sigmoid(lin(zte.reshape(-1, zte.shape[-1]))[:, 0]).reshape(len(te_y), k).mean(1)
        res[f"auc_framelevel_wd{wd:g}"] = auc(p.numpy(), te_y)
    return res


def probe_finetune(data: Path, *, steps: int, size: int, seed: int, eval_every: int) -> list[tuple[int, float, float]]:
    tr_paths, tr_y = load_split(data, "train_labels.csv")
    te_paths, te_y = load_split(data, "test_labels.csv")
    model = make_backbone(seed, num_classes=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(seed)
    reals, fakes = np.flatnonzero(tr_y == 0), np.flatnonzero(tr_y == 1)
    te_frames = torch.stack([decode(p, 4, size) for p in te_paths])  # [N, 4, 3, s, s]
    history, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()  # BatchNorm in train mode: eval-mode statistics of a fresh network are meaningless
        batch = np.concatenate([rng.choice(reals, 4, replace=False), rng.choice(fakes, 4, replace=False)])
        x = torch.stack([decode(tr_paths[i], 4, size, rng) for i in batch])
        y = torch.tensor(tr_y[batch], dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x.flatten(0, 1)).float().view(len(batch), -1).mean(1)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                scores = torch.cat([model(c.flatten(0, 1)).float().view(len(c), -1).mean(1)
                                    for c in te_frames.split(8)])
            history.append((step, time.perf_counter() - t0, auc(scores.numpy(), te_y)))
            print(f"finetune step {step:4d}  {history[-1][1]:6.1f} s  loss {loss.item():.3f}  "
                  f"held-out AUC {history[-1][2]:.3f}", flush=True)
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="demo dataset folder (generated when absent)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (when generating) and model seed")
    ap.add_argument("--n-train", type=int, default=None, help="per class, when generating")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("--frames", type=int, default=8, help="frames per video for the frozen probe")
    ap.add_argument("--size", type=int, default=112, help="model input size")
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=25)
    args = ap.parse_args()
    if not (args.data / "train_labels.csv").exists():
        s = generate_dataset(args.data, seed=args.seed, n_train_real=args.n_train, n_train_fake=args.n_train,
                             n_test=args.n_test, difficulty=args.difficulty)
        print(f"generated {s['n_train_real']}+{s['n_train_fake']} train, {s['n_test']} test in "
              f"{s['seconds_taken']:.1f} s ({s['total_bytes'] / 1e6:.1f} MB)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = probe_frozen(args.data, k=args.frames, size=args.size, seed=args.seed)
    print("frozen random-init backbone:", "  ".join(f"{k} {v:.3f}" for k, v in res.items()))
    if args.finetune_steps:
        probe_finetune(args.data, steps=args.finetune_steps, size=args.size, seed=args.seed,
                       eval_every=args.eval_every)


if __name__ == "__main__":
    main()
