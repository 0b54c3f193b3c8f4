"""Commands about the input: inspect videos, generate the demo data, check the set-up, write the split."""

from __future__ import annotations

import click

from arena.cli._main import main
from arena.limits import DEFAULT_BACKBONE


@main.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--decode", "decode_k", type=click.IntRange(min=1), default=None,
              help="Also decode K uniformly sampled frames and report ok / partial / error.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list (one object per file).")
def inspect_cmd(paths: tuple[str, ...], decode_k: int | None, as_json: bool) -> None:
    """Container, codec, size, fps, frame count, duration and rotation of each video (exit 0 whatever they are)."""
    import json

    from arena.video import inspect_videos

    rows = inspect_videos(paths, decode=decode_k)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ["file", "container", "codec", "width", "height", "fps", "num_frames", "duration_seconds", "rotation",
            "status"]
    table = [[_fmt_cell(r.get(c)) for c in cols] for r in rows]
    for r, t in zip(rows, table, strict=True):
        if "decoded" in r:  # distinct decoded frames / rows asked for
            t[-1] += f" {r['decoded']}/{r['requested']}"
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r, t in zip(rows, table, strict=True):
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
        if r.get("message"):
            click.echo(f"    {r['message']}")


def _fmt_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)



def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` (FFmpeg's order) or one number for a square -> ``(height, width)``."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 128x128 or 640x360, got {value!r}.")
    return parts[1], parts[0]


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["demo", "competition"]), default="demo", show_default=True,
              help="Defaults for the options below: demo = 100+100 train, 40 test, 2 s, 112x112, 15 fps; "
                   "competition = 300+300 train, 200 test, 10 s, 640x360, 30 fps, crf 26 (~700 MB).")
@click.option("--seed", type=int, default=0, show_default=True, help="Master seed; the same seed gives the same bytes.")
@click.option("--n-train", type=int, default=None, help="Training videos per class (real and fake each).")
@click.option("--n-test", type=int, default=None, help="Test videos (half real, half fake, shuffled).")
@click.option("--seconds", type=float, default=None, help="Length of every video.")
@click.option("--size", callback=_parse_size, default=None, help="WIDTHxHEIGHT (even numbers), e.g. 128x128.")
@click.option("--fps", type=float, default=None, help="Frame rate of every video.")
@click.option("--difficulty", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Blend strength of the fakes: 0 obvious .. 1 subtle.")
@click.option("--crf", type=int, default=None, help="x264 quality (same for reals and fakes).")
@click.option("--unpaired", is_flag=True, help="Give every fake a scene of its own (default: fake i is made from "
                                               "the scene of real i, as SBI makes fakes from reals).")
@click.option("--fake-method", type=click.Choice(["blend", "splice", "mixed"]), default="blend", show_default=True,
              help="Manipulation family of the fakes: blend = a self-blended copy of the frame (SBI-style); splice = "
                   "another scene's region, generator-upsampled and colour-transferred; mixed = both, alternating. "
                   "The family of each fake is the method column of train_labels.csv and test_labels.csv.")
@click.option("--test-fake-method", type=click.Choice(["blend", "splice", "mixed"]), default=None,
              help="Family of the test fakes (default: --fake-method). --fake-method blend --test-fake-method mixed "
                   "holds out a family that training never sees.")
@click.option("--workers", type=int, default=None, help="Processes (default: all CPU cores).")
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def demo_data(out: str, preset: str, seed: int, n_train: int | None, n_test: int | None, seconds: float | None,
              size: tuple[int, int] | None, fps: float | None, difficulty: float, crf: int | None, unpaired: bool,
              fake_method: str, test_fake_method: str | None, workers: int | None, force: bool) -> None:
    """Write a synthetic deepfake dataset (competition layout, SBI-style or spliced fakes) into OUT."""
    from arena.demo import generate_dataset

    summary = generate_dataset(out, n_train_real=n_train, n_train_fake=n_train, n_test=n_test, seconds=seconds,
                               size=size, fps=fps, seed=seed, difficulty=difficulty, preset=preset, crf=crf,
                               paired=not unpaired, fake_method=fake_method, test_fake_method=test_fake_method,
                               workers=workers, overwrite=force)
    cfg = summary["config"]
    h, w = cfg["size"]
    families = ", ".join(f"{n} {m}" for m, n in summary["fakes_by_method"].items() if n)
    click.echo(f"wrote {summary['n_train_real']} real + {summary['n_train_fake']} fake train, "
               f"{summary['n_test']} test ({summary['n_test_fake']} fake) videos, {w}x{h}, "
               f"{summary['num_frames']} frames at {cfg['fps']:g} fps, "
               f"{summary['total_bytes'] / 1e6:.1f} MB in {summary['seconds_taken']:.1f} s -> {summary['out']}"
               + (f" (fakes: {families})" if families else ""))


def _parse_counts(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int, int] | None:
    """``REAL,FAKE,TEST`` -> a tuple of three counts; ``none`` -> None (only print what is found)."""
    if value.strip().lower() == "none":
        return None
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0:
        raise click.BadParameter(f"expected REAL,FAKE,TEST such as 300,300,200 (or none), got {value!r}.")
    return counts  # type: ignore[return-value]


@main.command("doctor")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Data folder to check (layout, labels, counts). Without it only the machine is checked.")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="timm model whose pretrained weights must be reachable offline.")
@click.option("--weights", type=click.Path(path_type=str), default=None,
              help="Local weights file to check instead of the Hugging Face cache.")
@click.option("--expect", callback=_parse_counts, default="300,300,200", show_default=True,
              help="Expected real,fake,test counts (the competition's); 'none' to only print what is found.")
def doctor(data: str | None, backbone: str, weights: str | None, expect: tuple[int, int, int] | None) -> None:
    """Check the data folder, FFmpeg, the torch stack, GPU/NVML and backbone weights; exit 1 if essentials fail."""
    from arena.doctor import run_doctor

    result = run_doctor(data, backbone=backbone, weights=weights, expect=expect)
    click.echo(result.table())
    if result.layout_report:
        click.echo("\n" + result.layout_report)
    if not result.ok:
        raise SystemExit(1)


@main.command("split")
@click.option("--data", type=click.Path(path_type=str), required=True, help="Data folder (seed layout).")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Folder of split.json (created; the file is reused by every later stage).")
@click.option("--seed", type=int, default=42, show_default=True, help="random_state of the split.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of the videos held out for validation (--folds 1 only).")
@click.option("--groups", "groups_mode", type=click.Choice(["auto", "column", "none"]), default="auto",
              show_default=True,
              help="Keep videos that share a source on one side. column: from train_labels.csv's original/source/"
                   "group column or a DFDC-style metadata.json; auto: those when present, else detected "
                   "near-duplicate videos; none: no groups.")
@click.option("--folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="1: one stratified holdout; K > 1: K stratified grouped folds (stages use fold 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (pairs, folds with counts per class).")
@click.option("--new-split", is_flag=True, help="Replace an existing split.json (e.g. after the dataset changed).")
@click.pass_context
def split(ctx: click.Context, data: str, out: str, seed: int, val_fraction: float, groups_mode: str, folds: int,
          as_json: bool, new_split: bool) -> None:
    """Write (or check and reuse) the stratified, grouped train/validation split; print its groups and counts."""
    import json
    from pathlib import Path

    from arena.data import load_dataset
    from arena.groups import find_groups
    from arena.split import AFTER_NEW_SPLIT, SPLIT_FILE, make_split, stored_parts

    if folds > 1 and ctx.get_parameter_source("val_fraction") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--val-fraction applies to --folds 1 only: each of K folds validates on 1/K.")
    dataset = load_dataset(data, require_test=False)
    if dataset.report.warnings:
        click.echo(str(dataset.report), err=True)
    found = find_groups(dataset, groups_mode)
    old = Path(out) / SPLIT_FILE
    previous = stored_parts(out)
    leaked = None if previous is None else len(found.across(previous))
    say = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    say(found.summary())
    if leaked is not None:
        say(f"the existing {old} puts {leaked} of these {len(found.pairs)} pair(s) on both sides (train and "
            "validation, or two folds)")
    old_bytes = old.read_bytes() if new_split and old.is_file() else None
    result = make_split(dataset, out, val_fraction=val_fraction, seed=seed, folds=folds, groups=found,
                        new=new_split)
    per_fold = result.fold_counts()
    if as_json:
        name = dataset.listed_names.get
        click.echo(json.dumps({
            "path": str(result.path), "sha256": result.sha256, "seed": result.seed,
            "val_fraction": result.val_fraction, "groups": result.groups, "group_source": found.source,
            "pairs": [[name(p.a, p.a), name(p.b, p.b)] for p in found.pairs],
            "pair_details": [{"a": name(p.a, p.a), "b": name(p.b, p.b), "from": p.origin,
                              "similarity": p.similarity} for p in found.pairs],
            "undecodable": [name(k, k) for k in found.undecodable],
            "previous_pairs_across": leaked,
            "folds": [{"fold": i, "train": {"real": c["train_real"], "fake": c["train_fake"]},
                       "val": {"real": c["val_real"], "fake": c["val_fake"]}} for i, c in enumerate(per_fold)],
        }, indent=1))
        return
    parts = [f"train {c['train_real'] + c['train_fake']} ({c['train_real']} real / {c['train_fake']} fake), "
             f"val {c['val_real'] + c['val_fake']} ({c['val_real']} real / {c['val_fake']} fake)" for c in per_fold]
    where = f"groups {result.groups} -> {result.path} (sha256 {result.sha256[:16]})"
    if result.folds == 1:
        click.echo(f"split: {parts[0]}, seed {result.seed}, val_fraction {result.val_fraction:g}, {where}")
    else:
        click.echo("\n".join(f"fold {i}: {text}" for i, text in enumerate(parts)))
        click.echo(f"split: {result.folds} folds, seed {result.seed}, {where}")
    if old_bytes is not None:
        same = old_bytes == result.path.read_bytes()
        click.echo("the new split equals the old one; nothing to rerun" if same
                   else f"replaced the previous split: {AFTER_NEW_SPLIT}")
