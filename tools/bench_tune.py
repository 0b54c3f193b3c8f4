"""Benchmark: Optuna head-tuning trials on a synthetic feature cache of the competition's size.

600 videos (420 train / 180 validation), 5 TTA variants, frame counts 24/32/48 on 300-frame videos, 1536-d
float16 features -- the shape `arena features` produces for the real archive with inception_resnet_v2.
Prints seconds per trial and the projected time for 200 trials (the seed notebook: 30 min for 10 trials).

With ``--folds K`` the same videos are also cut into K stratified folds and, in one run, measured side by side:

* a single-split study and a K-fold (cross-validated) study of ``--trials`` trials each: seconds per trial, and
  the measured or projected time of a 100-trial K-fold study;
* on the first ``--compare`` parameter points of the K-fold study, without pruning: one holdout head
  (``train_head``), the K fold heads trained together (``arena.cv_heads.train_folds``) and the K fold heads trained
  one after another (K ``train_head`` calls, each fold's standardised features prepared beforehand, untimed, as a
  study would keep them).

    python tools/bench_tune.py --trials 20            # features built in memory (fast)
    python tools/bench_tune.py --trials 20 --via-cache # written to an HDF5 cache and read back with FeatureCache
    python tools/bench_tune.py --folds 5 --trials 100  # + a 100-trial 5-fold study and the side-by-side
    python tools/bench_tune.py --folds 5 --trials 100 --single-trials 200 --pruners auto,median --compare 0
                                                       # pruners side by side, against 200 single-split trials
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each video's fold: every class shuffled and dealt round the folds."""
    fold = np.zeros(len(labels), dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return fold


def build_store(n_videos: int, frame_counts: tuple[int, ...], dim: int, n_source: int, seed: int,
                via_cache: Path | None, folds: int = 1):
    """A `HeadDataStore` of the 70:30 holdout; with ``folds > 1`` it also serves `get_folds` (K stratified folds
    of all the videos)."""
    from arena.cache import FEATURE_FORMAT, CacheWriter, FeatureCache, Provenance
    from arena.head_data import FoldData, HeadData, HeadDataStore
    from arena.sampling import sampling_spec, uniform_indices, union_indices

    rng = np.random.default_rng(seed)
    labels = np.arange(n_videos) % 2
    is_val = np.zeros(n_videos, dtype=bool)
    is_val[rng.permutation(n_videos)[: int(round(0.3 * n_videos))]] = True
    fold = stratified_folds(labels, folds, np.random.default_rng(seed + 1)) if folds > 1 else None
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

        @dataclasses.dataclass
        class _Item:
            key: str
            label: int

        split = SimpleNamespace(  # what HeadDataStore.from_cache reads of an arena.split.Split
            path=via_cache, folds=max(folds, 1),
            train=[_Item(k, int(y)) for k, y, v in zip(keys, labels, is_val, strict=True) if not v],
            val=[_Item(k, int(y)) for k, y, v in zip(keys, labels, is_val, strict=True) if v],
            fold_of={} if fold is None else dict(zip(keys, fold.tolist(), strict=True)))
        return HeadDataStore.from_cache(cache, split)
    blocks = np.stack([video_block(rng, int(y), len(union), dim, 24) for y in labels])  # [N, V, U, d]
    data, fold_data = {}, {}
    for k in frame_counts:
        pos = np.searchsorted(union, uniform_indices(n_source, k))
        x = torch.from_numpy(np.ascontiguousarray(blocks[:, :, pos]))
        mask = torch.ones(n_videos, k, dtype=torch.bool)
        y = torch.from_numpy(labels)
        tr, va = torch.from_numpy(~is_val), torch.from_numpy(is_val)
        data[k] = HeadData(k, VARIANTS, x[tr], mask[tr], y[tr], x[va][:, :1], mask[va], y[va])
        if fold is not None:
            fold_data[k] = FoldData(k, VARIANTS, x, mask, y, torch.from_numpy(fold), folds, keys=keys)
    return HeadDataStore.from_arrays(data, folds=fold_data or None)


def timed_study(store, tmp: str, name: str, trials: int, seed: int, config, cv: bool, pruner: str = "auto") -> dict:
    """A study of ``trials`` trials; wall and CPU seconds, states and epochs."""
    from arena.study import run_study
    from arena.study_storage import create_storage

    t0, c0 = time.perf_counter(), time.process_time()
    study = run_study(store, storage=create_storage(f"sqlite:///{tmp}/{name}.db"), study_name=name,
                      n_trials=trials, seed=seed, config=config, progress=False, cv=cv, pruner=pruner)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    states = [t.state.name for t in study.trials]
    n = len(study.trials)
    return {"study": study, "pruner": pruner, "trials": n, "seconds": elapsed, "cpu_seconds": cpu,
            "seconds_per_trial": elapsed / n,
            "cpu_seconds_per_trial": cpu / n, "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "mean_epochs": float(np.mean([len(t.intermediate_values) for t in study.trials]))}


def _clock(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _fold_alone(folds, i: int, params, config) -> tuple[float, float]:
    """Wall and CPU seconds of ``train_head`` on fold i alone, its standardised features prepared beforehand
    (untimed, as a study keeps them per fold); the fold's copy is freed on return."""
    from arena.head_train import _standardized, train_head
    from arena.model import DetectorHead
    from arena.runtime import autocast_dtype

    data = folds.fold_data(i)
    head = DetectorHead(data.dim)
    head.set_feature_stats(*data.feature_stats())
    _standardized(data, head.feat_mean, head.feat_std,
                  autocast_dtype(data.train_x.device, config.precision) or torch.float32)
    return _clock(lambda: train_head(params, data, config=config))


def compare_points(store, trials, points: int, config) -> dict:
    """Wall and CPU seconds per parameter point: one holdout head, K fold heads batched, K fold heads one by one."""
    from arena.cv_heads import train_folds
    from arena.head_train import HeadParams, train_head

    rows = []
    for t in trials[:points]:
        params = HeadParams.from_dict(t.params)
        folds = store.get_folds(params.frames)
        single = _clock(lambda: train_head(params, store.get(params.frames), config=config))  # noqa: B023
        batched = _clock(lambda: train_folds(params, folds, config=config))  # noqa: B023
        alone = [_fold_alone(folds, i, params, config) for i in range(folds.folds)]
        sequential = (sum(a[0] for a in alone), sum(a[1] for a in alone))
        rows.append({"params": t.params, "single": single, "batched": batched, "sequential": sequential})
        print(f"  point {t.number}: frames {params.frames}, attn {params.attn_dim}: single {single[0]:.1f} s, "
              f"{folds.folds}-fold batched {batched[0]:.1f} s, sequential {sequential[0]:.1f} s (wall)", flush=True)
    mean = {k: [float(np.mean([r[k][j] for r in rows])) for j in (0, 1)] for k in ("single", "batched", "sequential")}
    return {"rows": rows, "mean": mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--single-trials", type=int, default=None,
                    help="trials of the single-split study (default: --trials), e.g. 200 beside --folds 5 --trials 100")
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
    ap.add_argument("--folds", type=int, default=1, help="K > 1: also a K-fold study and the side-by-side")
    ap.add_argument("--compare", type=int, default=3,
                    help="parameter points timed side by side (single / batched / sequential) with --folds")
    ap.add_argument("--compare-epochs", type=int, default=None,
                    help="maximum epochs of the side-by-side points (default: --epochs)")
    ap.add_argument("--pruners", default="auto",
                    help="with --folds: the K-fold study once per pruner, side by side (comma-separated: auto, "
                         "median, halving, none; auto = what tune-head uses on K folds), e.g. auto,median")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    import optuna

    from arena.head_train import HeadTrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frame_counts = tuple(int(k) for k in args.frames.split(","))
    config = HeadTrainConfig(max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                             seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_store(args.videos, frame_counts, args.dim, args.source_frames, args.seed,
                            Path(tmp) / "cache.h5" if args.via_cache else None, folds=args.folds)
        for k in frame_counts:
            store.get(k)  # load every frame count before timing, as a long study would
            if args.folds > 1:
                store.get_folds(k)
        t_build = time.perf_counter() - t0
        single = timed_study(store, tmp, "bench", args.single_trials or args.trials, args.seed, config, cv=False)
        out = report_single(args, single, frame_counts, t_build)
        if args.folds > 1:
            studies = [timed_study(store, tmp, f"bench-cv-{pruner}", args.trials, args.seed, config, cv=True,
                                   pruner=pruner) for pruner in args.pruners.split(",")]
            out["folds"] = report_folds(args, store, studies, single, config)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def report_single(args, single: dict, frame_counts: tuple[int, ...], t_build: float) -> dict:
    """Print the single-split study and its 200-trial projection; return the numbers for --json."""
    best, per_trial, cpu = single["study"].best_trial, single["seconds_per_trial"], single["cpu_seconds"]
    print(f"threads={torch.get_num_threads()} videos={args.videos} dim={args.dim} frames={frame_counts} "
          f"data {'via HDF5 cache' if args.via_cache else 'in memory'}: built+loaded in {t_build:.1f} s")
    print(f"{single['trials']} trials in {single['seconds']:.1f} s: {per_trial:.2f} s/trial "
          f"({single['complete']} complete, {single['pruned']} pruned, mean {single['mean_epochs']:.1f} epochs)")
    print(f"CPU time {cpu:.1f} s ({single['cpu_seconds_per_trial']:.2f} CPU-s/trial; wall time is inflated when "
          f"other processes share the cores: load average {os.getloadavg()[0]:.1f})")
    how = "measured" if single["trials"] == 200 else "projected"
    print(f"{how} 200 trials: {200 * per_trial:.0f} s wall (target <= 120 s; seed: 1800 s for 10 trials)")
    print(f"best: val log loss {best.value:.4f}, AUC {best.user_attrs['auc']:.4f}, params {best.params}", flush=True)
    return {"videos": args.videos, "trials": single["trials"], "seconds": single["seconds"], "cpu_seconds": cpu,
            "seconds_per_trial": per_trial, "cpu_seconds_per_trial": single["cpu_seconds_per_trial"],
            "projected_200_trials_s": 200 * per_trial,
            "projected_200_trials_cpu_s": 200 * single["cpu_seconds_per_trial"], "build_seconds": t_build,
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0], "complete": single["complete"],
            "pruned": single["pruned"], "mean_epochs": single["mean_epochs"], "via_cache": args.via_cache}


def report_folds(args, store, studies: list[dict], single: dict, config) -> dict:
    """Print the K-fold studies (one per pruner), the side-by-side points and the 100-trial figures against the
    single-split study of the same run; return them for --json."""
    from arena.study import resolve_pruner

    k = args.folds
    # The issue's target, 300 s for 100 K-fold trials, was set where the 200-trial single-split study took 97-139 s:
    # as a ratio to that study measured in the same run, 300 / 139 = 2.16 holds on any machine.
    single_200 = 200 * single["seconds_per_trial"]
    how = "measured" if single["trials"] == 200 else "projected"
    print(f"\n{k}-fold CV studies (the K heads of a trial trained together; objective: out-of-fold log loss); "
          f"single split, 200 trials ({how}): {single_200:.0f} s wall, "
          f"{200 * single['cpu_seconds_per_trial']:.0f} CPU-s")
    print(f"{'pruner':<16}{'trials':>7}{'pruned':>7}{'epochs':>7}{'wall s':>8}{'CPU s':>8}{'100 trials':>11}"
          f"{'/ 200 single':>13}{'best OOF':>10}{'its AUC':>9}")
    rows = []
    for cv in studies:
        n = cv["trials"]
        hundred = cv["seconds"] if n == 100 else 100 * cv["seconds_per_trial"]
        hundred_cpu = cv["cpu_seconds"] if n == 100 else 100 * cv["cpu_seconds_per_trial"]
        best = cv["study"].best_trial
        name = resolve_pruner(cv["pruner"], True) + (" (auto)" if cv["pruner"] == "auto" else "")
        ratio = hundred_cpu / (200 * single["cpu_seconds_per_trial"])
        print(f"{name:<16}{n:>7}{cv['pruned']:>7}{cv['mean_epochs']:>7.1f}{cv['seconds']:>8.0f}{cv['cpu_seconds']:>8.0f}"
              f"{hundred:>10.0f}s{ratio:>13.2f}{best.value:>10.4f}{best.user_attrs['auc']:>9.4f}")
        rows.append({"pruner": resolve_pruner(cv["pruner"], True), "trials": n, "seconds": cv["seconds"],
                     "cpu_seconds": cv["cpu_seconds"], "seconds_per_trial": cv["seconds_per_trial"],
                     "cpu_seconds_per_trial": cv["cpu_seconds_per_trial"], "complete": cv["complete"],
                     "pruned": cv["pruned"], "mean_epochs": cv["mean_epochs"], "best_oof_log_loss": best.value,
                     "best_auc": best.user_attrs["auc"], "hundred_trials_s": hundred,
                     "hundred_trials_cpu_s": hundred_cpu, "ratio_to_200_single_cpu": ratio,
                     "hundred_trials_how": "measured" if n == 100 else f"projected from {n} trials"})
    print(f"target: 100 {k}-fold trials <= 300 s on 2 cores, set where 200 single-split trials took 97-139 s: a "
          f"CPU-time ratio to 200 single-split trials <= 2.16 (load average {os.getloadavg()[0]:.1f})")
    cmp_config = dataclasses.replace(config, max_epochs=args.compare_epochs or config.max_epochs)
    out = {"k": k, "single_200_s": single_200, "studies": rows}
    if args.compare < 1:
        return out
    print(f"side by side on the first {args.compare} parameter points of the first CV study (no pruning, at most "
          f"{cmp_config.max_epochs} epochs, patience {cmp_config.patience}):", flush=True)
    side = compare_points(store, studies[0]["study"].trials, args.compare, cmp_config)
    m = side["mean"]
    print(f"{'per trial':<34}{'wall s':>9}{'CPU s':>9}{'x single':>10}")
    for label, key in (("single split (1 head)", "single"), (f"{k}-fold batched (train_folds)", "batched"),
                       (f"{k}-fold sequential ({k} x train_head)", "sequential")):
        print(f"{label:<34}{m[key][0]:>9.2f}{m[key][1]:>9.2f}{m[key][1] / m['single'][1]:>10.2f}")
    print(f"batched / sequential: {m['batched'][1] / m['sequential'][1]:.2f} of the CPU time, "
          f"{m['batched'][0] / m['sequential'][0]:.2f} of the wall time; load average {os.getloadavg()[0]:.1f}")
    out["side_by_side"] = {"points": len(side["rows"]), "max_epochs": cmp_config.max_epochs,
                           "wall_s": {key: v[0] for key, v in m.items()}, "cpu_s": {key: v[1] for key, v in m.items()}}
    return out


if __name__ == "__main__":
    main()
