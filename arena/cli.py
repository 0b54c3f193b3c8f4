"""Command-line interface: one click group, each command parses options and calls one library function.

Commands import their modules lazily so that `arena --help` stays fast (torch and timm take seconds to import).
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="arena")
def main() -> None:
    """arena: train and run a video deepfake detector (features cache -> head tuning -> fine-tuning -> submission)."""


# Each stage registers its commands below, in its own section.

# --- section: video (inspect) ---


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


# --- section: demo (demo-data) ---


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
@click.option("--workers", type=int, default=None, help="Processes (default: all CPU cores).")
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def demo_data(out: str, preset: str, seed: int, n_train: int | None, n_test: int | None, seconds: float | None,
              size: tuple[int, int] | None, fps: float | None, difficulty: float, crf: int | None, unpaired: bool,
              workers: int | None, force: bool) -> None:
    """Write a synthetic deepfake dataset (competition layout, SBI-style fakes) into OUT."""
    from arena.demo import generate_dataset

    try:
        summary = generate_dataset(out, n_train_real=n_train, n_train_fake=n_train, n_test=n_test, seconds=seconds,
                                   size=size, fps=fps, seed=seed, difficulty=difficulty, preset=preset, crf=crf,
                                   paired=not unpaired, workers=workers, overwrite=force)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    cfg = summary["config"]
    h, w = cfg["size"]
    click.echo(f"wrote {summary['n_train_real']} real + {summary['n_train_fake']} fake train, "
               f"{summary['n_test']} test ({summary['n_test_fake']} fake) videos, {w}x{h}, "
               f"{summary['num_frames']} frames at {cfg['fps']:g} fps, "
               f"{summary['total_bytes'] / 1e6:.1f} MB in {summary['seconds_taken']:.1f} s -> {summary['out']}")

# --- section: data (doctor, split) ---


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
@click.option("--backbone", default="inception_resnet_v2.tf_in1k", show_default=True,
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
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the stratified permutation.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of each class held out for validation.")
@click.option("--new-split", is_flag=True, help="Replace an existing split.json (e.g. after the dataset changed).")
def split(data: str, out: str, seed: int, val_fraction: float, new_split: bool) -> None:
    """Write (or check and reuse) the stratified train/validation split and print its counts."""
    from arena.data import DataError, load_dataset, make_split

    try:
        dataset = load_dataset(data, require_test=False)
        result = make_split(dataset, out, val_fraction=val_fraction, seed=seed, new=new_split)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    if dataset.report.warnings:
        click.echo(str(dataset.report), err=True)
    c = result.counts()
    click.echo(f"split: train {len(result.train)} ({c['train_real']} real / {c['train_fake']} fake), "
               f"val {len(result.val)} ({c['val_real']} real / {c['val_fake']} fake), seed {result.seed}, "
               f"val_fraction {result.val_fraction:g} -> {result.path} (sha256 {result.sha256[:16]})")

# --- section: cache ---


@main.group("cache")
def cache_group() -> None:
    """Inspect and merge HDF5 feature caches."""


def _format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


@cache_group.command("info")
@click.argument("paths", nargs=-1, required=True)
@click.option("--max-failures", default=20, show_default=True, type=click.IntRange(min=0),
              help="How many failed videos to list with their reasons.")
def cache_info(paths: tuple[str, ...], max_failures: int) -> None:
    """Provenance, video counts (ok / partial / failed) and size of each cache PATH (a file, shard set or glob).

    Several PATHs are shown one by one; a missing cache.h5 whose shards exist is shown as the shard set.
    """
    import json

    from arena.cache import CacheError, FeatureCache

    for path in paths:
        try:
            cache = FeatureCache.open(path)
        except CacheError as exc:
            raise click.ClickException(str(exc)) from exc
        with cache:
            info = cache.info()
            n = max(info["videos"], 1)
            click.echo(f"cache: {', '.join(info['paths'])}")
            staged = "  [staged parts not yet compacted]" if info["staged"] else ""
            click.echo(f"  videos: {info['videos']} (ok {info['ok']}, partial {info['partial']}, "
                       f"failed {info['failed']}){staged}")
            click.echo(f"  size: {_format_bytes(info['size_bytes'])} ({_format_bytes(info['size_bytes'] // n)}/video), "
                       f"{info['rows']} frame rows")
            click.echo("  provenance:")
            for key, value in info["provenance"].items():
                click.echo(f"    {key}: {json.dumps(value, sort_keys=True)}")
            failures = cache.failures()
            for key, message in list(failures.items())[:max_failures]:
                click.echo(f"  failed: {key}: {message}")
            if len(failures) > max_failures:
                click.echo(f"  ... and {len(failures) - max_failures} more failed videos")


@cache_group.command("merge")
@click.argument("out")
@click.argument("shards", nargs=-1, required=True)
def cache_merge(out: str, shards: tuple[str, ...]) -> None:
    """Merge SHARDS (files written with --shard i/n, or a glob) into one compacted cache OUT.

    OUT is byte-identical to the cache a single process would have written for the same videos.
    """
    from arena.cache import CacheError, merge_shards

    try:
        with merge_shards(out, list(shards)) as cache:
            counts = cache.counts()
            click.echo(f"merged {len(shards)} path(s) into {out}: {len(cache.keys) + counts['failed']} videos "
                       f"(ok {counts['ok']}, partial {counts['partial']}, failed {counts['failed']})")
    except CacheError as exc:
        raise click.ClickException(str(exc)) from exc


# --- section: features ---


def parse_frame_counts(ctx, param, value: str) -> tuple[int, ...]:
    """Parse ``24,32,48`` into sorted unique positive ints, refusing anything else with the allowed range."""
    try:
        counts = sorted({int(x) for x in str(value).split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated frame counts, e.g. 24,32,48") from None
    if not counts or counts[0] < 1 or counts[-1] > 512:
        raise click.BadParameter(f"{value!r}: each frame count must be in 1..512")
    return tuple(counts)


def parse_shard(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{value!r}: need 0 <= i < n")
    return (i, n)


def backbone_options(f):
    """The options that choose and load the backbone, shared by every command that builds one."""
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random backbone (--no-pretrained) and of everything random.")(f)
    f = click.option("--image-size", type=click.IntRange(32, 1024), default=None,
                     help="Input size (square); default: the backbone's own (299 for inception_resnet_v2).")(f)
    f = click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Local .pth/.safetensors backbone weights (instead of the timm hub).")(f)
    f = click.option("--pretrained/--no-pretrained", default=True, show_default=True,
                     help="ImageNet weights from the timm hub cache, or a random backbone (tests, demo).")(f)
    f = click.option("--backbone", default="inception_resnet_v2.tf_in1k", show_default=True,
                     help="timm model name.")(f)
    return f


@main.command("features")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True)
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Output folder (holds the split file every stage reuses).")
@click.option("--frames", default="24,32,48", show_default=True, callback=parse_frame_counts,
              help="Frame counts to serve; the union of their frame indices is decoded once.")
@click.option("--tta/--no-tta", default=True, show_default=True,
              help="Cache all five TTA variants, or only the original.")
@backbone_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True, help="Decoder worker processes.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="Frames per forward.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Process at most N more videos (quick runs).")
@click.option("--shard", default=None, callback=parse_shard, help="i/n: this process handles every n-th video.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CPU, fp16 on CUDA.")
def features_cmd(data, cache, models, frames, tta, backbone, pretrained, weights, image_size, seed, device, workers,
                 batch_size, limit, shard, amp):
    """Decode every video once, run TTA + backbone, and store per-frame features in an HDF5 cache (resumable)."""
    from arena.cache import CacheError
    from arena.features import extract_features
    from arena.model import WeightsUnavailable

    try:
        summary = extract_features(
            data=data, cache=cache, models=models, frame_counts=frames, tta=tta, backbone=backbone,
            pretrained=pretrained and weights is None, weights=weights, image_size=image_size, seed=seed,
            device=device, workers=workers, batch_size=batch_size, limit=limit, shard=shard, amp=amp,
        )
    except (CacheError, ValueError, WeightsUnavailable) as exc:  # DataError is a ValueError: bad data folder/split
        raise click.ClickException(str(exc)) from exc
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        click.echo(f"{len(summary.failed)} video(s) could not be decoded; they are recorded in the cache and "
                   "predicted 0.5 at submit time.")
    if summary.failed or summary.excluded:
        raise SystemExit(3)  # the cache is complete for what could be used; some videos are missing from it


# --- section: tune (tune-head, frame-test) ---


def _tune_frames(ctx, param, value: str | None) -> tuple[int, ...] | None:
    return None if value is None else parse_frame_counts(ctx, param, value)


def _tune_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command("tune-head")
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True,
              help="Feature cache written by `arena features`.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder (for the split; test videos are never read).")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Holds split.json; receives best_head.pt, best_head_params.json, study_summary.json, plots.")
@click.option("--n-trials", type=click.IntRange(min=1), default=50, show_default=True,
              help="Total target of finished (complete or pruned) trials in the study; a rerun resumes up to it.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting new trials after this many seconds (this run).")
@click.option("--storage", default=None,
              help="Optuna storage: journal:<file> (several workers, one machine), postgresql://... (several "
                   "machines) or sqlite:///<file>. Default: sqlite:///<models>/optuna.db.")
@click.option("--study-name", default="head", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every head's training.")
@click.option("--frames", default=None, callback=_tune_frames,
              help="Candidate frame counts, e.g. 24,32,48 (default: every frame count in the cache).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Maximum epochs per trial (early stopping usually ends sooner).")
@click.option("--patience", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Epochs without validation improvement before a trial stops.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="Videos per step.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="torch CPU threads (default: torch's choice; use 1 per worker when several workers share cores).")
def tune_head_cmd(cache, data, models, n_trials, timeout, storage, study_name, seed, frames, epochs, patience,
                  batch_size, device, threads):
    """Optuna search over the attention head on cached features; objective: validation log loss."""
    from arena.tune import tune_head

    _tune_threads(threads)
    try:
        s = tune_head(cache, data, models, n_trials=n_trials, timeout=timeout, storage=storage, study_name=study_name,
                      seed=seed, frames=frames, epochs=epochs, patience=patience, batch_size=batch_size, device=device)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted: finished trials are kept in the study and the interrupted one is queued again; "
                   "run the same command to continue.", err=True)
        raise SystemExit(130) from None
    states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s["states"].items()))
    click.echo(f"study {s['study_name']!r} ({s['storage']}): {s['n_trials']} trials ({states}); "
               f"this run {s['this_run_seconds']:.1f} s")
    if s.get("best_trial"):
        b = s["best_trial"]
        a = {k: b["user_attrs"].get(k, float("nan")) for k in ("auc", "accuracy", "f1")}
        click.echo(f"best trial #{b['number']}: val log loss {b['value']:.4f}, AUC {a['auc']:.4f}, "
                   f"accuracy {a['accuracy']:.3f}, F1 {a['f1']:.3f}")
        click.echo(f"params: {b['params']}")
        click.echo(f"wrote {models}/best_head.pt, best_head_params.json, study_summary.json")
    else:
        click.echo("no complete trial yet: nothing written but study_summary.json")
    if s.get("skipped_videos"):
        click.echo(f"skipped {len(s['skipped_videos'])} video(s) whose features failed (see study_summary.json)")
    for name, where in s.get("plots", {}).items():
        if where.startswith("skipped"):
            click.echo(f"{name}: {where}")
    if not s.get("reached_target"):
        click.echo(f"target of {n_trials} finished trials not reached (timeout); run the command again to continue.")
    if not s.get("best_trial"):
        raise SystemExit(1)


@main.command("frame-test")
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder (for the split).")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Holds best_head_params.json from tune-head; receives frame_test.json.")
@click.option("--frames", default=None, callback=_tune_frames,
              help="Frame counts to compare (default: every frame count in the cache).")
@click.option("--seed", type=int, default=None, help="Default: the study's seed.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="Default: the study's maximum.")
@click.option("--patience", type=click.IntRange(1, 1000), default=None, help="Default: the study's patience.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="torch CPU threads.")
def frame_test_cmd(cache, data, models, frames, seed, epochs, patience, device, threads):
    """Compare frame counts with the tuned head on the validation split; recommends by validation log loss."""
    from arena.tune import frame_test

    _tune_threads(threads)
    try:
        out = frame_test(cache, data, models, frames=frames, seed=seed, epochs=epochs, patience=patience,
                         device=device)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{'frames':>6}  {'AUC':>6}  {'log loss':>8}  {'accuracy':>8}  {'avg conf (seed)':>15}")
    for k, r in out["results"].items():
        auc = "-" if r["auc"] is None else f"{r['auc']:.4f}"
        click.echo(f"{k:>6}  {auc:>6}  {r['log_loss']:>8.4f}  {r['accuracy']:>8.3f}  {r['mean_confidence']:>15.4f}")
    click.echo(f"recommended: {out['recommended_frames']} frames (lowest validation log loss); the seed's criterion "
               f"(average confidence) would pick {out['seed_criterion_pick']}. Wrote {models}/frame_test.json")

# --- section: train (train-full) ---


@main.command("train-full")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--models", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Output folder (split.json, frame_test.json and best_head.pt are read from it when present).")
@backbone_options
@click.option("--frames", type=click.IntRange(1, 512), default=None,
              help="Frames per video; default: frame_test.json's recommendation, else 24.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True, help="Videos per step.")
@click.option("--accum-steps", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Gradient accumulation steps (effective batch = batch size x steps x processes).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="AdamW learning rate of the backbone (and of the head without a tuned one).")
@click.option("--head-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Head learning rate; default: the tuned head's, else --lr.")
@click.option("--weight-decay", type=click.FloatRange(0), default=1e-5, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 10_000), default=30, show_default=True, help="At most this many.")
@click.option("--lr-patience", type=click.IntRange(0), default=2, show_default=True,
              help="ReduceLROnPlateau patience on validation loss (epochs).")
@click.option("--es-patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early stopping patience on validation loss (epochs).")
@click.option("--amp", type=click.Choice(["auto", "fp16", "bf16", "off"]), default="auto", show_default=True,
              help="auto: fp16 + GradScaler on CUDA, bf16 on CPU.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
              help="Recompute backbone activations in backward (the seed's settings in 4 GB of VRAM).")
@click.option("--head-init", type=click.Choice(["auto", "tuned", "default"]), default="auto", show_default=True,
              help="auto: start from tune-head's best_head.pt when it exists.")
@click.option("--head-stats", type=click.Choice(["auto", "keep", "train"]), default="auto", show_default=True,
              help="Head input standardisation: keep the tuned one, or recompute it from train-mode features "
                   "(auto: recompute for a tuned head on a random-init backbone).")
@click.option("--balanced/--no-balanced", default=True, show_default=True,
              help="Class-balanced training order: real and fake clips alternate, so each batch holds both.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True, help="Decoder processes.")
@click.option("--resume", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              is_flag=False, flag_value="yes",
              help="auto: continue an unfinished last.pt with the same settings; --resume: require it; no: start over.")
@click.option("--limit-train", type=click.IntRange(2), default=None, help="At most N training videos (quick runs).")
@click.option("--limit-val", type=click.IntRange(2), default=None, help="At most N validation videos.")
@click.option("--min-frames", type=click.IntRange(1, 512), default=4, show_default=True,
              help="Fewest frames an out-of-memory retry may fall back to.")
@click.option("--temp-pause", type=click.FloatRange(30, 110), default=78.0, show_default=True,
              help="Pause when the GPU reaches this temperature (°C).")
@click.option("--temp-resume", type=click.FloatRange(20, 105), default=72.0, show_default=True,
              help="Resume when it has cooled to this (°C).")
@click.option("--vram-warn", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Warn and empty the CUDA cache at this fraction of VRAM in use.")
@click.option("--empty-cache-each-video/--no-empty-cache-each-video", default=False, show_default=True)
def train_full_cmd(data, models, backbone, pretrained, weights, image_size, seed, frames, batch_size, accum_steps, lr,
                   head_lr, weight_decay, epochs, lr_patience, es_patience, amp, grad_checkpointing, head_init,
                   head_stats, balanced, device, workers, resume, limit_train, limit_val, min_frames, temp_pause,
                   temp_resume, vram_warn, empty_cache_each_video):
    """Fine-tune backbone + attention head end to end (resumable; DDP under torchrun -m arena train-full)."""
    import logging

    from arena.model import WeightsUnavailable
    from arena.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig(
            data=data, models=models, backbone=backbone, pretrained=pretrained and weights is None, weights=weights,
            image_size=image_size, frames=frames, batch_size=batch_size, accum_steps=accum_steps, lr=lr,
            head_lr=head_lr, weight_decay=weight_decay, epochs=epochs, lr_patience=lr_patience,
            es_patience=es_patience, amp=amp, grad_checkpointing=grad_checkpointing, head_init=head_init,
            head_stats=head_stats, balanced=balanced,
            workers=workers, seed=seed, device=device, resume=resume, limit_train=limit_train, limit_val=limit_val,
            min_frames=min_frames, temp_pause_c=temp_pause, temp_resume_c=temp_resume, vram_warn_frac=vram_warn,
            empty_cache_each_video=empty_cache_each_video,
        )
        result = train(cfg)
    except (ValueError, WeightsUnavailable) as exc:  # bad data/split/options, missing weights, resume mismatch
        raise click.ClickException(str(exc)) from exc
    if result.main:
        for line in result.lines():
            click.echo(line)
    if result.skipped:
        raise SystemExit(3)  # outputs complete, but some videos could not be decoded (listed above)

# --- section: submit (submit, evaluate) ---


@main.command("submit")
@click.option("--data", "data", type=click.Path(file_okay=False), required=True,
              help="Data folder with test_public.csv and test/.")
@click.option("--models", type=click.Path(file_okay=False), required=True,
              help="Models folder: inception_resnet_v2_best.pt (train-full) or best_head.pt (tune-head).")
@click.option("--out", type=click.Path(dir_okay=False), default="SUBMISSION_DIRECTORY/PREDICTIONS.CSV",
              show_default=True, help="The submission CSV; predictions_detail.csv is written beside it.")
@click.option("--model", "kind", type=click.Choice(["auto", "finetuned", "head-only"]), default="auto",
              show_default=True, help="auto: the fine-tuned checkpoint when present, else the tuned head.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames per video [default: frame_test.json's recommendation, else 24].")
@click.option("--tta/--no-tta", default=True, show_default=True, help="Average the five TTA variants.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Decoding processes running ahead of the model (0: decode in the main process).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Frames per backbone batch.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (fp16 CUDA, bf16 CPU).")
@click.option("--verify", "verify", type=click.Path(), default=None,
              help="Feature cache to verify the full path against (fails above 1e-3 in p_fake).")
@click.option("--verify-sample", type=click.IntRange(min=1), default=8, show_default=True,
              help="Test videos compared by --verify.")
@click.option("--verify-all", is_flag=True, help="Compare every test video with --verify.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (torch, verification sample).")
def submit_cmd(data: str, models: str, out: str, kind: str, frames: int | None, tta: bool, device: str,
               workers: int, batch_size: int, amp: bool, verify: str | None, verify_sample: int, verify_all: bool,
               seed: int) -> None:
    """Predict every test video (decode -> 5 TTA views -> backbone -> head), validate and write the CSV.

    Exit status: 0 complete; 3 complete and valid, but some rows are 0.5 because their video could not be
    predicted (listed in predictions_detail.csv); 1 nothing written (the previous CSV is untouched).
    """
    from arena.data import DataError
    from arena.predict import PredictError
    from arena.submit import SubmissionError, make_submission

    try:
        result = make_submission(data=data, models=models, out=out, kind=kind, frames=frames, tta=tta, device=device,
                                 workers=workers, batch_size=batch_size, amp=amp, verify=verify,
                                 verify_sample=None if verify_all else verify_sample, seed=seed, echo=click.echo)
    except (SubmissionError, PredictError, DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    failed = [p for p in result.predictions if p.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} row(s) are 0.5 because the video could not be predicted (see "
                   f"{result.report.detail_path}).")
        raise SystemExit(3)  # the CSV is complete and valid, but some rows carry no prediction


@main.command("evaluate")
@click.option("--data", "data", type=click.Path(file_okay=False), required=True, help="Data folder.")
@click.option("--models", type=click.Path(file_okay=False), required=True,
              help="Models folder (model and split.json).")
@click.option("--split", type=click.Choice(["val"]), default="val", show_default=True,
              help="Evaluate on the persisted validation split (unless --labels is given).")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="CSV of test labels (e.g. the demo's test_labels.csv): evaluate on the test videos instead.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON output [default: MODELS/evaluation.json]; attention PNGs go to its folder's attention/.")
@click.option("--attention", multiple=True, help="Video key for the attention report (repeatable).")
@click.option("--attention-first", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also report attention for the first N evaluated videos.")
@click.option("--model", "kind", type=click.Choice(["auto", "finetuned", "head-only"]), default="auto",
              show_default=True, help="auto: the fine-tuned checkpoint when present, else the tuned head.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames per video [default: frame_test.json's recommendation, else 24].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Decoding processes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Frames per backbone batch.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (fp16 CUDA, bf16 CPU).")
@click.option("--seed", type=int, default=0, show_default=True)
def evaluate_cmd(data: str, models: str, split: str, labels: str | None, out: str | None, attention: tuple[str, ...],
                 attention_first: int, kind: str, frames: int | None, device: str, workers: int, batch_size: int,
                 amp: bool, seed: int) -> None:
    """AUC, log loss, accuracy, F1 and confusion with and without TTA; attention report for chosen videos.

    Exit status: 0 complete; 3 written, but some videos could not be predicted (counted as 0.5).
    """
    from arena.data import DataError
    from arena.predict import PredictError, evaluate, metrics_lines

    try:
        result = evaluate(data=data, models=models, split=split, labels=labels, out=out, attention=attention,
                          attention_first=attention_first, kind=kind, frames=frames, device=device, workers=workers,
                          batch_size=batch_size, amp=amp, seed=seed)
    except (PredictError, DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in metrics_lines(result):
        click.echo(line)
    if result["failed"]:
        click.echo(f"{len(result['failed'])} video(s) could not be predicted and count as 0.5 in the metrics.")
        raise SystemExit(3)
