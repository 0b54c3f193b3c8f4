"""The validation recipe measured on the demo: is there a leak, does calibration help, does the fold ensemble beat
one fold? (issue 14, item 6; the README's "Validation you can trust" table.)

Runs three head studies from ONE feature cache (no video is decoded again) and scores every resulting model on the
held-out test videos (the demo's test_labels.csv) from the cache's test features, which `submit --verify` checks
are the full path's within 1e-3:

1. ungrouped 70:30 holdout (the seed's split: a fake and its source may fall on both sides),
2. grouped 70:30 holdout,
3. grouped K-fold with out-of-fold tuning, one out-of-fold temperature and the K fold heads averaged.

For each: validation AUC (what the study believed) against test AUC (what it got), and the gap; test log loss and
ECE before and after the temperature; for the folds, every fold head's test AUC, their mean and the ensemble's.

    python tools/recipe_demo.py                         # demo/data + demo/features.h5 (make demo builds them)
    python tools/recipe_demo.py --trials 40 --folds 5 --seeds 0,1,2 --json bench_out/recipe.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arena import metrics  # noqa: E402
from arena.cache import FeatureCache  # noqa: E402
from arena.calibration import (  # noqa: E402
    apply_temperature,
    expected_calibration_error,
    probs_to_logits,
    temperature_of,
)
from arena.data import load_dataset  # noqa: E402
from arena.evaluate import labelled_items  # noqa: E402
from arena.models_folder import BEST_HEAD_FILE, HeadCheckpoint, fold_dirs  # noqa: E402
from arena.split import make_split  # noqa: E402
from arena.study import tune_head  # noqa: E402
from arena.study_folds import view_logits  # noqa: E402
from arena.tta import VARIANTS  # noqa: E402


def head_logits(ckpt: HeadCheckpoint, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logit difference (fake - real) per video and TTA view, ``[N, V]``, from cached features ``[N, V, K, d]``."""
    return view_logits(ckpt.build().eval(), torch.from_numpy(x), torch.from_numpy(mask))


def probs(z: np.ndarray, temperature: float) -> np.ndarray:
    """P(fake), TTA mean of the views: the softmax of the two logits is the sigmoid of their difference."""
    return apply_temperature(z, temperature)


def score(y: np.ndarray, z: np.ndarray, temperature: float) -> dict[str, float]:
    p0, p1 = probs(z, 1.0), probs(z, temperature)
    return {"auc": metrics.summary(y, p1)["auc"], "T": temperature,
            "log_loss_before": metrics.log_loss(y, p0), "log_loss_after": metrics.log_loss(y, p1),
            "ece_before": expected_calibration_error(y, p0), "ece_after": expected_calibration_error(y, p1)}


def run(data: Path, cache_path: Path, work: Path, *, trials: int, folds: int, seed: int) -> dict:
    dataset = load_dataset(data)
    test = labelled_items(dataset, data / "test_labels.csv")
    y = np.array([it.label for it in test])
    out: dict = {"seed": seed, "n_test": len(test)}
    with FeatureCache.open(cache_path) as cache:
        feats = {k: cache.batch([it.key for it in test], k, list(VARIANTS)) for k in cache.provenance.frame_counts}
    for name, groups, k_folds in (("ungrouped holdout", "none", 1), ("grouped holdout", "auto", 1),
                                  (f"grouped {folds}-fold", "auto", folds)):
        models = work / f"{name.replace(' ', '_')}_{seed}"
        shutil.rmtree(models, ignore_errors=True)
        make_split(dataset, models, seed=42 + seed, folds=k_folds, groups=groups)
        started = time.monotonic()
        summary = tune_head(cache_path, data, models, n_trials=trials, batch_size=16, seed=seed, progress=False,
                            device="cpu")
        row: dict = {"tune_seconds": round(time.monotonic() - started, 1)}
        if k_folds == 1:
            ckpt = HeadCheckpoint.load(models / BEST_HEAD_FILE)
            row["val_auc"] = summary["retrained"]["metrics"]["auc"]
            row["test"] = score(y, head_logits(ckpt, *feats[ckpt.frames]), temperature_of(ckpt.calibration))
        else:
            ckpts = [HeadCheckpoint.load(d / BEST_HEAD_FILE) for d in fold_dirs(models)]
            zs = [head_logits(c, *feats[c.frames]) for c in ckpts]
            t = temperature_of(ckpts[0].calibration)
            row["val_auc"] = summary["cv"]["oof"]["auc"]
            row["fold_test_auc"] = [score(y, z, t)["auc"] for z in zs]
            row["mean_fold_test_auc"] = float(np.mean(row["fold_test_auc"]))
            p_ens = np.mean([probs(z, t) for z in zs], axis=0)
            p_ens0 = np.mean([probs(z, 1.0) for z in zs], axis=0)
            row["test"] = {"auc": metrics.summary(y, p_ens)["auc"], "T": t,
                           "log_loss_before": metrics.log_loss(y, p_ens0), "log_loss_after": metrics.log_loss(y, p_ens),
                           "ece_before": expected_calibration_error(y, p_ens0),
                           "ece_after": expected_calibration_error(y, p_ens)}
            # `--ensemble logit`: the sigmoid of the mean of the members' (calibrated) logits
            p_log = expit(np.mean([probs_to_logits(probs(z, t)) for z in zs], axis=0))
            p_log0 = expit(np.mean([probs_to_logits(probs(z, 1.0)) for z in zs], axis=0))
            row["test_logit"] = {"auc": metrics.summary(y, p_log)["auc"],
                                 "log_loss_before": metrics.log_loss(y, p_log0),
                                 "log_loss_after": metrics.log_loss(y, p_log),
                                 "ece_before": expected_calibration_error(y, p_log0),
                                 "ece_after": expected_calibration_error(y, p_log)}
        row["gap"] = row["val_auc"] - row["test"]["auc"]
        out[name] = row
    return out


def table(runs: list[dict]) -> str:
    names = [k for k in runs[0] if isinstance(runs[0][k], dict)]
    lines = ["| split | val AUC | test AUC | val − test | test log loss before → after T | ECE before → after |"
             " fold heads' test AUC (mean) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        rows = [r[name] for r in runs]

        def m(get, rows: list[dict] = rows) -> str:
            vals = [get(r) for r in rows]
            return f"{np.mean(vals):.3f}" + (f" ± {np.std(vals):.3f}" if len(vals) > 1 else "")

        folds = m(lambda r: r["mean_fold_test_auc"]) if "mean_fold_test_auc" in rows[0] else "—"
        lines.append(f"| {name} | {m(lambda r: r['val_auc'])} | {m(lambda r: r['test']['auc'])} | "
                     f"{m(lambda r: r['gap'])} | {m(lambda r: r['test']['log_loss_before'])} → "
                     f"{m(lambda r: r['test']['log_loss_after'])} | {m(lambda r: r['test']['ece_before'])} → "
                     f"{m(lambda r: r['test']['ece_after'])} | {folds} |")
    folds = [r[n] for r in runs for n in names if "test_logit" in r[n]]
    if folds:
        def m(key: str) -> str:
            vals = [f["test_logit"][key] for f in folds]
            return f"{np.mean(vals):.3f}" + (f" ± {np.std(vals):.3f}" if len(vals) > 1 else "")

        lines.append(f"| ↳ the same folds, `--ensemble logit` | | {m('auc')} | | {m('log_loss_before')} → "
                     f"{m('log_loss_after')} | {m('ece_before')} → {m('ece_after')} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "demo" / "data")
    ap.add_argument("--cache", type=Path, default=ROOT / "demo" / "features.h5")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0", help="comma-separated: split seed 42+s and study seed s per run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(args.data, args.cache, Path(tmp), trials=args.trials, folds=args.folds, seed=int(s))
                for s in args.seeds.split(",")]
    print(table(runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
