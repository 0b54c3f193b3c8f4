"""Benchmark: Optuna head-tuning trials on a synthetic feature cache of the competition's size.

600 videos (420 train / 180 validation), 5 TTA variants, frame counts 24/32/48 on 300-frame videos, 1536-d
float16 features -- the shape `arena features` produces for the real archive with inception_resnet_v2.
Prints seconds per trial and the projected time for 200 trials (the seed notebook: 30 min for 10 trials).

    python tools/bench_tune.py --trials 20            # features built in memory (fast)
    python tools/bench_tune.py --trials 20 --via-cache # written to an HDF5 cache and read back with FeatureCache
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")


def video_block(rng: np.random.Generator, label: int, n_frames: int, dim: int, informative: int) -> np.ndarray:
    """[V, U, d] float16: a per-video vector + per-frame noise, random-backbone scale (std ~0.01), a weak
    class-dependent shift in a few dims, and small per-variant perturbations."""
    video = rng.standard_normal(dim, dtype=np.float32)
    frames = video + 0.7 * rng.standard_normal((n_frames, dim), dtype=np.float32)
    frames[:, :informative] += (2 * label - 1) * 0.25
    views = frames[None] + 0.2 * rng.standard_normal((len(VARIANTS), 1, dim), dtype=np.float32)
    return (0.01 * views).astype(np.float16)


def build_store(n_videos: int, frame_counts: tuple[int, ...], dim: int, n_source: int, seed: int,
                via_cache: Path | None):
    from arena.cache import FEATURE_FORMAT, CacheWriter, FeatureCache, Provenance
    from arena.head_data import HeadData, HeadDataStore
    from arena.sampling import sampling_spec, uniform_indices, union_indices

    rng = np.random.default_rng(seed)
    labels = np.arange(n_videos) % 2
    is_val = np.zeros(n_videos, dtype=bool)
    is_val[rng.permutation(n_videos)[: int(round(0.3 * n_videos))]] = True
    union = union_indices(n_source, frame_counts)
    keys = [f"train/{'fake' if y else 'real'}/v{i:04d}.mp4" for i, y in enumerate(labels)]
    if via_cache is not None:
        prov = Provenance(backbone="synthetic", weights_source="random:seed=0", weights_hash="0" * 64,
                          input_size=(299, 299), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                          decoder={}, tta={}, variants=VARIANTS, sampling=sampling_spec(), frame_counts=frame_counts,
                          feature_dim=dim, feature_format=FEATURE_FORMAT)
        with CacheWriter(via_cache, prov) as w:
            for key, y in zip(keys, labels, strict=True):
                w.write(key, features=video_block(rng, int(y), len(union), dim, 24), frame_indices=union,
                        num_source_frames=n_source, label=int(y))
        cache = FeatureCache.open(via_cache)

        class _Item:
            def __init__(self, key: str, label: int) -> None:
                self.key, self.label = key, label

        class _Split:
            train = [_Item(k, int(y)) for k, y, v in zip(keys, labels, is_val, strict=True) if not v]
            val = [_Item(k, int(y)) for k, y, v in zip(keys, labels, is_val, strict=True) if v]

        return HeadDataStore.from_cache(cache, _Split())
    blocks = np.stack([video_block(rng, int(y), len(union), dim, 24) for y in labels])  # [N, V, U, d]
    data = {}
    for k in frame_counts:
        pos = np.searchsorted(union, uniform_indices(n_source, k))
        x = torch.from_numpy(np.ascontiguousarray(blocks[:, :, pos]))
        mask = torch.ones(n_videos, k, dtype=torch.bool)
        y = torch.from_numpy(labels)
        tr, va = torch.from_numpy(~is_val), torch.from_numpy(is_val)
        data[k] = HeadData(k, VARIANTS, x[tr], mask[tr], y[tr], x[va][:, :1], mask[va], y[va])
    return HeadDataStore.from_arrays(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--videos", type=int, default=600)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--frames", default="24,32,48")
    ap.add_argument("--source-frames", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--via-cache", action="store_true", help="write and read a real HDF5 cache")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    import optuna

    from arena.head_train import HeadTrainConfig
    from arena.study import run_study
    from arena.study_storage import create_storage

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frame_counts = tuple(int(k) for k in args.frames.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_store(args.videos, frame_counts, args.dim, args.source_frames, args.seed,
                            Path(tmp) / "cache.h5" if args.via_cache else None)
        for k in frame_counts:
            store.get(k)  # load every frame count before timing, as a long study would
        t_build = time.perf_counter() - t0
        config = HeadTrainConfig(max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                             seed=args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        study = run_study(store, storage=create_storage(f"sqlite:///{tmp}/optuna.db"), study_name="bench",
                          n_trials=args.trials, seed=args.seed, config=config, progress=False)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    states = [t.state.name for t in study.trials]
    epochs = [len(t.intermediate_values) for t in study.trials]
    per_trial = elapsed / len(study.trials)
    best = study.best_trial
    print(f"threads={torch.get_num_threads()} videos={args.videos} dim={args.dim} frames={frame_counts} "
          f"data {'via HDF5 cache' if args.via_cache else 'in memory'}: built+loaded in {t_build:.1f} s")
    print(f"{len(study.trials)} trials in {elapsed:.1f} s: {per_trial:.2f} s/trial "
          f"({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, mean {np.mean(epochs):.1f} epochs)")
    print(f"CPU time {cpu:.1f} s ({cpu / len(study.trials):.2f} CPU-s/trial; wall time is inflated when other "
          f"processes share the cores: load average {os.getloadavg()[0]:.1f})")
    print(f"projected 200 trials: {200 * per_trial:.0f} s wall (target <= 120 s; seed: 1800 s for 10 trials)")
    print(f"best: val log loss {best.value:.4f}, AUC {best.user_attrs['auc']:.4f}, params {best.params}")
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "videos": args.videos, "trials": len(study.trials), "seconds": elapsed, "cpu_seconds": cpu,
            "seconds_per_trial": per_trial, "cpu_seconds_per_trial": cpu / len(study.trials),
            "projected_200_trials_s": 200 * per_trial, "projected_200_trials_cpu_s": 200 * cpu / len(study.trials),
            "build_seconds": t_build, "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "mean_epochs": float(np.mean(epochs)),
            "via_cache": args.via_cache}, indent=1) + "\n")


if __name__ == "__main__":
    main()
