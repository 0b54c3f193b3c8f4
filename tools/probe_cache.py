"""Linear probe on a feature cache: is the signal in the cached features, whatever the head makes of it?

    python tools/probe_cache.py --cache demo/features.h5 --labels demo/data/test_labels.csv

Mean-pools each video's cached features over frames (original view, or all TTA variants), standardises them with
training statistics, fits an L2-regularised logistic regression on every labelled training video, and prints the
held-out AUC on the test videos whose answers ``--labels`` gives (the demo's test_labels.csv). A diagnostic for
the demo: compare with `arena evaluate --model head-only`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arena.cache import FeatureCache  # noqa: E402
from arena.csvfile import read_csv_rows  # noqa: E402
from arena.metrics import auc  # noqa: E402


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--labels", required=True, help="CSV with the test answers (filename,label)")
    ap.add_argument("--frames", default=None, help="frame counts to probe (default: the cache's)")
    args = ap.parse_args()

    cache = FeatureCache.open(args.cache)
    answers = {name if "/" in name else f"test/{name}": int(raw) for _, name, raw in
               read_csv_rows(args.labels, need_label=True)}
    train = [k for k in cache.keys if cache.label(k) is not None]
    test = [k for k in cache.keys if k in answers]
    y = torch.tensor([cache.label(k) for k in train], dtype=torch.float32)
    y_test = np.array([answers[k] for k in test])
    counts = [int(k) for k in args.frames.split(",")] if args.frames else list(cache.provenance.frame_counts)
    print(f"{len(train)} training videos, {len(test)} test videos")
    print("| frames | pooled over | L2 | test AUC |\n|---|---|---|---|")
    for k in counts:
        x_all, _ = cache.batch(train, k, "all")
        xt_all, _ = cache.batch(test, k, "all")
        for name, pool in (("original view", lambda a: a[:, 0].astype(np.float32).mean(1)),
                           ("all TTA views", lambda a: a.astype(np.float32).mean((1, 2)))):
            a, b = pool(x_all), pool(xt_all)
            mu, sd = a.mean(0), a.std(0) + 1e-6
            a, b = torch.tensor((a - mu) / sd), torch.tensor((b - mu) / sd)
            for l2 in (1e-3, 1e-2, 1e-1):
                w, c = fit_logistic(a, y, l2)
                print(f"| {k} | {name} | {l2:g} | {auc(y_test, torch.sigmoid(b @ w + c).numpy()):.3f} |")


if __name__ == "__main__":
    main()
