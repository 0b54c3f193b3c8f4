"""Held-out AUC per manipulation family of `arena train-full` with self-blended pseudo-fakes (issue 15, item 5).

On the demo data with training fakes of the ``blend`` family only and test fakes of both families (``arena
demo-data --fake-method blend --test-fake-method mixed``: half blend, half ``splice``, a family SBI never makes),
three fine-tuning runs of the random-init backbone at the demo's settings (inception_resnet_v2, 112 px, seed 0,
3 frames, batch 8, no tuned head, 4 epochs), all on the same split and validation videos:

    real+sbi    --train-on real --pseudo-fakes sbi[:P]   the SBI protocol: the training reals and their blends only
    fakes       --train-on all                           the real (blend) fakes
    fakes+sbi   --train-on all --pseudo-fakes sbi[:P]    both

Each run's best checkpoint (``--monitor auc``: highest validation AUC; validation holds real blend fakes in every
run, and a model of pseudo-fakes ranks them well epochs before its validation loss drops) is evaluated
on the held-out test videos (`arena evaluate --labels test_labels.csv`); the AUC of a family is the test reals
against that family's test fakes (the ``method`` column). Training CPU-minutes are this process's user + system
time and its reaped children's (the DataLoader workers) over the `arena.train.train` call, so a loaded machine
inflates wall time, not the CPU figure (run it with OMP_NUM_THREADS=1 on a shared machine: spinning threads of an
oversubscribed OpenMP pool burn CPU time without work).

    python tools/bench_pseudo.py --out /tmp/bench_pseudo             # full: ~3 x 8 CPU-min of training
    python tools/bench_pseudo.py --quick --out /tmp/bench_pseudo_q   # smoke run: tiny data, test_resnet, seconds

Targets (issue 15): real+sbi >= 0.90 held-out AUC on blend and >= 0.80 on splice within 10 training CPU-minutes;
fakes+sbi not below fakes on either family. Writes ``bench_pseudo.json`` and ``bench_pseudo.md`` into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sklearn.metrics import roc_auc_score

RUNS = {  # name -> (train_on, with pseudo-fakes)
    "real+sbi": ("real", True),
    "fakes": ("all", False),
    "fakes+sbi": ("all", True),
}
FAMILIES = ("blend", "splice")
FULL = dict(backbone="inception_resnet_v2.tf_in1k", image_size=112, frames=3, batch_size=8, workers=2,
            data=dict(n_train_real=100, n_train_fake=100, n_test=160))
QUICK = dict(backbone="test_resnet", image_size=32, frames=2, batch_size=2, workers=0,
             data=dict(n_train_real=6, n_train_fake=6, n_test=12, seconds=1.0, size=(48, 48), fps=6.0))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def family_aucs(videos: list[dict[str, Any]], labels_csv: Path) -> dict[str, float | None]:
    """AUC of the test reals against each family's test fakes (and against all fakes), from evaluate's videos."""
    with open(labels_csv, newline="") as fh:
        method = {row["filename"]: row.get("method", "") for row in csv.DictReader(fh)}
    p = {v["key"]: v["p_fake"] for v in videos if v["status"] != "failed"}
    reals = [p[k] for k in p if method.get(k) == ""]
    out: dict[str, float | None] = {}
    for family in (*FAMILIES, "all"):
        fakes = [p[k] for k in p if method.get(k) and (family == "all" or method[k] == family)]
        out[family] = (float(roc_auc_score([0] * len(reals) + [1] * len(fakes), reals + fakes))
                       if reals and fakes else None)
    return out


def make_data(out: Path, *, quick: bool, seed: int) -> Path:
    """The demo data (blend training fakes, mixed test fakes) and one split of it, made once and reused."""
    from arena.data import load_dataset
    from arena.demo import generate_dataset
    from arena.split import make_split

    data = out / "data"
    if not (data / "test_labels.csv").is_file():
        settings = (QUICK if quick else FULL)["data"]
        generate_dataset(data, **settings, seed=seed, fake_method="blend", test_fake_method="mixed",
                         workers=None if not quick else 1, overwrite=True, progress=False)
    if not (out / "split.json").is_file():
        make_split(load_dataset(data, require_test=False), out)
    return data


def run_one(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one run into ``out/<name>`` (the shared split copied in) and evaluate it on the test videos."""
    from arena.evaluate import evaluate
    from arena.train import train
    from arena.train_config import TrainConfig

    settings = QUICK if args.quick else FULL
    train_on, pseudo = RUNS[name]
    models = out / name.replace("+", "_")
    if models.exists() and args.fresh:
        shutil.rmtree(models)
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "split.json", models / "split.json")
    cfg = TrainConfig(data=str(data), models=str(models), backbone=settings["backbone"], pretrained=False,
                      image_size=settings["image_size"], frames=settings["frames"], batch_size=settings["batch_size"],
                      accum_steps=1, epochs=args.epochs, es_patience=args.es_patience, lr=args.lr,
                      workers=settings["workers"] if args.workers is None else args.workers, seed=args.seed,
                      device=args.device, head_init="default", augment=args.augment,
                      pseudo_fakes=f"sbi:{args.p:g}" if pseudo else None, train_on=train_on, monitor=args.monitor)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    result = train(cfg)
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    # A run continued from its last.pt (or already finished) adds to what its earlier part cost.
    spent = models / "bench_cost.json"
    if result.resumed_from and spent.is_file():
        before = json.loads(spent.read_text())
        cpu, wall = cpu + before["cpu_seconds"], wall + before["wall_seconds"]
    spent.write_text(json.dumps({"cpu_seconds": cpu, "wall_seconds": wall}) + "\n")
    evaluation = evaluate(data=data, checkpoints=str(result.best_path), kind="finetuned",
                          labels=data / "test_labels.csv", out=models / "evaluation.json", device=args.device,
                          workers=cfg.workers, progress=False)
    best = result.history[result.best_epoch - 1] if result.best_epoch else result.history[-1]
    return {"run": name, "train_on": train_on, "pseudo_fakes": cfg.pseudo_fakes, "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "val_auc": best["val_auc"], "train_cpu_minutes": cpu / 60,
            "train_wall_minutes": wall / 60, "test_auc": family_aucs(evaluation["videos"], data / "test_labels.csv"),
            "test_videos": evaluation["n"]}


def targets(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, each with the numbers that meet or miss it."""
    lines = []
    a = rows.get("real+sbi")
    if a:
        ok = ((a["test_auc"]["blend"] or 0) >= 0.90 and (a["test_auc"]["splice"] or 0) >= 0.80
              and a["train_cpu_minutes"] <= 10)
        lines.append(f"real+sbi >= 0.90 blend, >= 0.80 splice within 10 CPU-min: {'met' if ok else 'MISSED'} "
                     f"(blend {_fmt(a['test_auc']['blend'])}, splice {_fmt(a['test_auc']['splice'])}, "
                     f"{a['train_cpu_minutes']:.1f} CPU-min)")
    b, c = rows.get("fakes"), rows.get("fakes+sbi")
    if b and c:
        for family in FAMILIES:
            ok = (c["test_auc"][family] or 0) >= (b["test_auc"][family] or 0)
            lines.append(f"fakes+sbi not below fakes on {family}: {'met' if ok else 'MISSED'} "
                         f"({_fmt(c['test_auc'][family])} vs {_fmt(b['test_auc'][family])})")
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | train on | pseudo-fakes | epochs (best) | val AUC | test AUC blend | test AUC splice | "
            "test AUC all | train CPU-min | train wall-min |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        t = r["test_auc"]
        lines.append(f"| {r['run']} | {r['train_on']} | {r['pseudo_fakes'] or 'off'} | {r['epochs_run']} "
                     f"({r['best_epoch']}) | {_fmt(r['val_auc'])} | {_fmt(t['blend'])} | {_fmt(t['splice'])} | "
                     f"{_fmt(t['all'])} | {r['train_cpu_minutes']:.1f} | {r['train_wall_minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_pseudo"), help="data, runs and results go here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, test_resnet at 32 px, 1 epoch")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--p", type=float, default=1.0, help="--pseudo-fakes sbi:P")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; quick 1)")
    ap.add_argument("--es-patience", type=int, default=None, help="early stopping patience (default: --epochs)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--monitor", default="auc", choices=["loss", "auc"],
                    help="train-full --monitor for every run (auc: the SBI model's validation loss on real fakes "
                         "lags its ranking by epochs)")
    ap.add_argument("--augment", default="none", choices=["none", "light", "strong"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default 2; quick 0)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fresh", action="store_true", help="retrain runs whose folder exists (else they resume)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.epochs = args.epochs or (1 if args.quick else 4)
    args.es_patience = args.es_patience or args.epochs
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")

    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out, quick=args.quick, seed=args.seed)
    rows = [run_one(name, data, args.out, args) for name in names]
    by_name = {r["run"]: r for r in rows}
    load = os.getloadavg()
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "loadavg": load, "rows": rows, "targets": targets(by_name), "python": sys.version.split()[0]}
    (args.out / "bench_pseudo.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(rows) + "\n\n" + "\n".join(f"- {t}" for t in report["targets"]) + "\n"
    (args.out / "bench_pseudo.md").write_text(text)
    print(text + f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; results in {args.out}")


if __name__ == "__main__":
    main()
