"""Stage one: `arena features` and the cache commands (`cache info`, `cache merge`)."""

from __future__ import annotations

import click

from arena.cli._config import long_command, runs_beside
from arena.cli._main import main
from arena.cli._options import (
    backbone_options,
    cache_pseudo_option,
    crop_options,
    decoder_option,
    device_option,
    face_config,
    frame_batch_option,
    parse_frame_counts,
    parse_shard,
    views_on_option,
    workers_option,
)


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

    from arena.cache import FeatureCache

    for path in paths:
        with FeatureCache.open(path) as cache:
            info = cache.info()
            n = max(info["videos"], 1)
            click.echo(f"cache: {', '.join(info['paths'])}")
            staged = "  [staged parts not yet compacted]" if info["staged"] else ""
            click.echo(f"  videos: {info['videos']} (ok {info['ok']}, partial {info['partial']}, "
                       f"failed {info['failed']}){staged}")
            if info["pseudo_fakes"]:
                click.echo(f"  of which pseudo-fake items (KEY#sbiI, label 1): {info['pseudo_fakes']}")
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
    from arena.cache import merge_shards

    with merge_shards(out, list(shards)) as cache:
        counts = cache.counts()
        click.echo(f"merged {len(shards)} path(s) into {out}: {len(cache.keys) + counts['failed']} videos "
                   f"(ok {counts['ok']}, partial {counts['partial']}, failed {counts['failed']})")


@main.command("features")
@long_command(runs_beside("cache"))
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--cache", type=click.Path(dir_okay=False), default="cache/features.h5", show_default=True)
@click.option("--models", default=None, hidden=True,
              help="Ignored: the cache does not depend on the split, so features do not use the models folder.")
@click.option("--frames", default="24,32,48", show_default=True, callback=parse_frame_counts,
              help="Frame counts to serve; the union of their frame indices is decoded once.")
@click.option("--tta/--no-tta", default=True, show_default=True,
              help="Cache all five TTA variants, or only the original.")
@backbone_options
@crop_options
@device_option
@decoder_option()
@views_on_option()
@workers_option
@frame_batch_option
@click.option("--limit", type=click.IntRange(1), default=None, help="Process at most N more videos (quick runs).")
@click.option("--shard", default=None, callback=parse_shard,
              help="i/n: this process handles every n-th video (not under torchrun, whose ranks are the shards).")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="Autocast as the runtime precision policy allows (auto: bf16/fp16 where the device runs it "
                   "natively, else fp32), or always fp32.")
@cache_pseudo_option
def features_cmd(data, cache, models, frames, tta, backbone, pretrained, weights, image_size, seed, crop,
                 face_detector, face_margin, detect_size, detect_frames, max_faces, device, decoder, views_on, workers,
                 frame_batch, limit, shard, amp, pseudo_fakes):
    """Decode every video once, run TTA + backbone, and store per-frame features in an HDF5 cache (resumable).

    The cache does not depend on the train/validation split: it serves every split and fold unchanged.
    Its provenance records the decoder that ran (--decoder auto as what it picked) and --views-on device; a cache
    is resumed only with the settings it was built with.

    Under torchrun each process takes its share of the videos (no --shard) on GPU LOCAL_RANK (or the CPU), writes
    it to its shard file (resumable), and rank 0 merges the shards into --cache (the same bytes one process writes)
    and reports; with several machines --cache must be on a folder they share. --limit counts per process.
    """
    from arena.distributed import launched
    from arena.features import extract_features

    summary = extract_features(
        data=data, cache=cache, frame_counts=frames, tta=tta, backbone=backbone,
        pretrained=pretrained and weights is None, weights=weights, image_size=image_size, seed=seed,
        device=device, workers=workers, frame_batch=frame_batch, limit=limit, shard=shard,
        precision="auto" if amp else "fp32",
        crop=face_config(crop, face_detector, face_margin, detect_size, detect_frames, max_faces),
        pseudo=pseudo_fakes, decoder=decoder, views_on=views_on,
    )
    if not launched().main:
        return  # rank 0 reports the whole run (and exits 3 if some videos failed)
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        click.echo(f"{len(summary.failed)} video(s) could not be decoded; they are recorded in the cache and "
                   "predicted 0.5 at submit time.")
    if summary.failed or summary.excluded:
        raise SystemExit(3)  # the cache is complete for what could be used; some videos are missing from it
