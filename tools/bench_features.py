"""Benchmark the features stage: arena's extraction against a naive baseline, measured side by side in one run.

    python tools/bench_features.py [--videos 3] [--image-size 299] [--frames 24,32,48] [--workers 2]

* arena: ``arena.features.extract_features`` (decoder workers, channels_last, the runtime's ``auto`` precision,
  batched forward across TTA variants), writing a real cache.
* naive: the same decode + TTA functions in the main process, fp32, NCHW, one backbone batch per video and
  variant (what a first notebook does).
* bare backbone: the same encoder and precision as arena on random uint8 tensors of the same shape: the ceiling
  the pipeline can reach if decoding hides behind compute (the ratio pipeline/bare is issue 7's target).

The videos are competition-like (640x360, 10 s, 30 fps H.264) from ``arena demo-data`` and cached in bench_out/.
Prints a markdown table; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arena.cache import FeatureCache  # noqa: E402
from arena.clips import ClipDataset  # noqa: E402
from arena.data import load_dataset  # noqa: E402
from arena.features import extract_features  # noqa: E402
from arena.model import create_encoder  # noqa: E402
from arena.runtime import autocast, resolve_device  # noqa: E402
from arena.tta import VARIANTS  # noqa: E402


def bench_data(root: Path, n: int, seconds: float, size: str, fps: float) -> Path:
    """A small competition-like dataset (n train videos, 1 test video), generated once and reused."""
    out = root / f"features_{n}_{size}_{seconds:g}s_{fps:g}fps"
    if not (out / "test_public.csv").exists():
        from arena.demo import generate_dataset

        w, h = (int(x) for x in size.split("x"))
        half = max(2, (n + 1) // 2)  # the split needs two videos of each class
        generate_dataset(out, n_train_real=half, n_train_fake=half, n_test=1, seconds=seconds,
                         size=(w, h), fps=fps, seed=0, overwrite=True, progress=False)
    return out


def naive_run(items, encoder, frame_counts, variants, device) -> tuple[float, int]:
    """Same decode + TTA, inline, fp32 NCHW, one forward per video and variant."""
    ds = ClipDataset(items, size=encoder.input_size, variants=variants, frame_counts=frame_counts)
    frames = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(ds)):
            clip = ds[i]
            for v in range(clip.views.shape[0]):
                x = clip.views[v].to(device)
                encoder(x)
                frames += x.shape[0]
    return time.perf_counter() - t0, frames


def bare_run(encoder, shape, batches: int, frame_batch: int, device) -> tuple[float, int]:
    """The encoder alone on random uint8 frames, with arena's precision and memory format."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (frame_batch, *shape), generator=g, dtype=torch.uint8)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(batches):
            chunk = x.to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                encoder(chunk)
    return time.perf_counter() - t0, batches * frame_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--image-size", type=int, default=None, help="default: the backbone's (299)")
    ap.add_argument("--backbone", default="inception_resnet_v2.tf_in1k")
    ap.add_argument("--frames", default="24,32,48")
    ap.add_argument("--variants", type=int, default=len(VARIANTS), help="number of TTA variants (1..5)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frame-batch", dest="frame_batch", type=int, default=64, help="frames per backbone forward")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--json", default=None)
    ap.add_argument("--data", default=None, help="an existing dataset to take the videos from (default: generate one)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    frame_counts = tuple(int(k) for k in args.frames.split(","))
    variants = VARIANTS[: args.variants]
    data = Path(args.data) if args.data else bench_data(Path(args.out), args.videos, args.seconds, args.size, args.fps)
    dataset = load_dataset(data)
    items = (list(dataset.train) + list(dataset.test))[: args.videos]  # test videos too when --data is small
    encoder = create_encoder(args.backbone, pretrained=False, image_size=args.image_size, seed=0).to(device).eval()

    # Warm-up: first forward pays for oneDNN kernel selection in every mode.
    bare_run(encoder, (3, *encoder.input_size), 1, 8, device)

    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        t0 = time.perf_counter()
        summary = extract_features(
            data=data, cache=tmp / "f.h5", frame_counts=frame_counts,
            tta=args.variants == len(VARIANTS), backbone=args.backbone, pretrained=False,
            image_size=args.image_size, device=str(device), workers=args.workers, frame_batch=args.frame_batch,
            limit=args.videos,
        )
        arena_s = time.perf_counter() - t0
        arena_frames = summary.frames
        cache = FeatureCache.open(tmp / "f.h5")
        size_per_video = cache.size_bytes() / max(1, len(cache.keys))
        cache.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    encoder_fp32 = create_encoder(args.backbone, pretrained=False, image_size=args.image_size, seed=0).to(device).eval()
    naive_s, naive_frames = naive_run(items, encoder_fp32, frame_counts, variants, device)
    n_batches = max(1, arena_frames // args.frame_batch)
    bare_s, bare_frames = bare_run(encoder, (3, *encoder.input_size), n_batches, args.frame_batch, device)

    arena_fps = arena_frames / arena_s
    naive_fps = naive_frames / naive_s
    bare_fps = bare_frames / bare_s
    rows = [
        ("extraction frames/s (decode+TTA+backbone)", f"{arena_fps:.1f}", f"naive {naive_fps:.1f}",
         f"{arena_fps / naive_fps:.2f}x", ">= 2.5x on CPU"),
        ("pipeline / bare backbone frames/s", f"{arena_fps:.1f}", f"bare {bare_fps:.1f}",
         f"{arena_fps / bare_fps:.2f}", ">= 0.8 CPU, >= 0.9 GPU"),
        ("cache size per video", f"{size_per_video / 2**20:.2f} MiB", "", "", ""),
    ]
    print(f"\n{len(items)} videos {args.size} {args.seconds:g}s@{args.fps:g}fps, input {encoder.input_size[0]}², "
          f"frames {args.frames}, {len(variants)} variants, device {device}, torch threads {torch.get_num_threads()}, "
          f"cpu count {os.cpu_count()}\n")
    print("| measure | arena | baseline | ratio | target |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            arena_fps=arena_fps, naive_fps=naive_fps, bare_fps=bare_fps, arena_frames=arena_frames,
            naive_frames=naive_frames, cache_bytes_per_video=size_per_video, videos=len(items),
            input=encoder.input_size, frames=frame_counts, variants=len(variants), device=str(device),
            seconds=dict(arena=arena_s, naive=naive_s, bare=bare_s),
        ), indent=2))
    np.testing.assert_equal(arena_frames, naive_frames)  # both computed the same frames


if __name__ == "__main__":
    main()
