"""Learning is shown, not assumed: held-out AUC of `train-full` on generated demo data vs training clips and steps.

There are no ImageNet weights on these machines, so this trains a random-init backbone end to end with the very
code of `arena train-full` (arena.train.train) on `arena.demo` clips, and after every epoch scores the model on the
demo's *test* set (never seen in training or model selection; its labels come from test_labels.csv).

    python tools/bench_learn.py --out /tmp/learn                         # 40 and 80 training clips
    python tools/bench_learn.py --out /tmp/learn --clips 80 --epochs 8 --image-size 112 --frames 4 --batch-size 8

For every run it prints one JSON line per epoch (clips, optimiser steps, CPU-seconds of this process and its
decoder workers, validation and test AUC / log loss) and a final line with the best test AUC and when it was
first reached. The whole table goes to <out>/bench_learn.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import time
from pathlib import Path

import torch


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader's decoder workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def test_items(data: Path) -> list:
    """The demo's test videos with their answers (test_labels.csv: filename,label)."""
    from arena.data import VideoItem

    with open(data / "test_labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [VideoItem(r["filename"], (data / r["filename"]).resolve(), int(r["label"]), "test") for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (data + one models folder per run)")
    ap.add_argument("--data", type=Path, default=None, help="an existing demo dataset (default: generate one)")
    ap.add_argument("--clips", default="40,80", help="training clips per run (comma-separated; taken from the split)")
    ap.add_argument("--n-train", type=int, default=120, help="training videos to generate (half real, half fake)")
    ap.add_argument("--n-test", type=int, default=100, help="held-out test videos to generate")
    ap.add_argument("--difficulty", type=float, default=0.1, help="the demo preset's default")
    ap.add_argument("--backbone", default="inception_resnet_v2.tf_in1k")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--accum-steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--es-patience", type=int, default=100, help="early stopping (default: off, to see the curve)")
    ap.add_argument("--lr-patience", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", default="auto", choices=["auto", "fp32", "bf16", "off"])
    args = ap.parse_args()

    from arena.distributed import Dist, EpochSampler
    from arena.hardware import GpuGuard
    from arena.runtime import autocast_dtype
    from arena.train import StepContext, evaluate, train
    from arena.train_config import TrainConfig
    from arena.train_data import CollateClips, eval_dataset
    from arena.train_model import build_model

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        from arena.demo import generate_dataset

        data = args.out / "data"
        if not (data / "test_labels.csv").is_file():
            t = time.perf_counter()
            generate_dataset(data, n_train_real=args.n_train // 2, n_train_fake=args.n_train - args.n_train // 2,
                             n_test=args.n_test, seed=args.seed, difficulty=args.difficulty, overwrite=True)
            print(f"generated {args.n_train} train + {args.n_test} test clips in {time.perf_counter() - t:.0f} s")
    tests = test_items(data)
    guard = GpuGuard(read_temp=lambda: None, read_mem=lambda: None, log=lambda m: None)
    table = []
    for n_clips in [int(x) for x in args.clips.split(",")]:
        models = args.out / f"models_{n_clips}"
        cfg = TrainConfig(data=str(data), models=str(models), backbone=args.backbone, pretrained=False,
                          image_size=args.image_size, frames=args.frames, batch_size=args.batch_size,
                          accum_steps=args.accum_steps, lr=args.lr, epochs=args.epochs, es_patience=args.es_patience,
                          lr_patience=args.lr_patience, workers=args.workers, seed=args.seed, amp=args.amp,
                          limit_train=n_clips, resume="no", device="cpu")
        scorer = build_model(cfg, None)
        device = torch.device("cpu")
        ctx = StepContext(device=device, amp_dtype=autocast_dtype(device, args.amp), scaler=torch.amp.GradScaler(
            "cpu", enabled=False), guard=guard, dist=Dist(), frames=args.frames, min_frames=args.frames)
        size = tuple(scorer.encoder.input_size)
        test_ds = eval_dataset(tests, frames=args.frames, size=size)
        test_loader = torch.utils.data.DataLoader(
            test_ds, batch_size=8, sampler=EpochSampler(test_ds, world=1, rank=0, shuffle=False, seed=0),
            num_workers=args.workers, collate_fn=CollateClips(args.frames, size))
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        rows: list[dict] = []

        def score(epoch: int, row: dict, models=models, scorer=scorer, test_loader=test_loader, ctx=ctx,
                  n_clips=n_clips, cpu0=cpu0, wall0=wall0, rows=rows) -> None:
            train_cpu = cpu_seconds() - cpu0 - sum(r["test_cpu_s"] for r in rows)
            t = cpu_seconds()
            state = torch.load(models / "last.pt", map_location="cpu", weights_only=True)
            scorer.load_state_dict(state["model_state_dict"])
            te = evaluate(scorer, test_loader, ctx, show=False, desc="test")
            steps_per_epoch = math.ceil(min(n_clips, state["config"]["train_videos"]) / args.batch_size)
            out = {"clips": state["config"]["train_videos"], "epoch": epoch,
                   "optimizer_steps": epoch * math.ceil(steps_per_epoch / args.accum_steps),
                   "train_cpu_s": round(train_cpu, 1), "wall_s": round(time.perf_counter() - wall0, 1),
                   "train_loss": round(row["train_loss"], 4), "val_auc": row["val_auc"],
                   "val_loss": round(row["val_loss"], 4), "test_auc": te["auc"], "test_loss": round(te["loss"], 4),
                   "test_acc": te["acc"], "test_prob_spread": round(te["prob_spread"], 4),
                   "test_cpu_s": round(cpu_seconds() - t, 1)}
            rows.append(out)
            print(json.dumps(out), flush=True)

        train(cfg, guard=guard, on_epoch_end=score)
        best = max(rows, key=lambda r: r["test_auc"] or 0.0)
        first_99 = next((r for r in rows if (r["test_auc"] or 0) >= 0.99), None)
        final = {"clips": best["clips"], "best_test_auc": best["test_auc"], "at_epoch": best["epoch"],
                 "at_steps": best["optimizer_steps"], "at_train_cpu_min": round(best["train_cpu_s"] / 60, 2),
                 "first_auc_0.99_at_cpu_min": round(first_99["train_cpu_s"] / 60, 2) if first_99 else None,
                 "settings": {k: str(v) for k, v in vars(args).items()}}
        print(json.dumps(final), flush=True)
        table.append({"epochs": rows, "summary": final})
        (args.out / "bench_learn.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
