"""Benchmark the submission's full-video path: videos/s with decode overlapped in workers vs decoded inline.

Both runs use the same code (arena.predict.predict_items: arena.clips decode + 5 TTA views -> encode_views ->
head) on the same generated videos in one process; only ``workers`` differs (N decoding processes running ahead
of the model vs 0 = decode, then compute, one video after the other). Also measured: decode alone (workers=0, no
model), so the ideal overlapped rate, 1 / max(decode, compute), can be compared with what the overlap achieves.

CPU example (random-init InceptionResNetV2 at 299 px, 8 frames, 4 videos):
    python tools/bench_submit.py --videos 4 --frames 8
GPU example (competition scale, 200 videos of 10 s at 640x360, 24 frames):
    python tools/bench_submit.py --videos 200 --frames 24 --seconds 10 --device cuda --workers 8 --frame-batch 120
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arena.clips import ClipDataset, iter_clips
from arena.data import load_dataset
from arena.demo import write_video
from arena.limits import DEFAULT_BACKBONE
from arena.model import DetectorHead, create_encoder
from arena.predict import LoadedModel, predict_items
from arena.runtime import resolve_device
from arena.tta import VARIANTS


@dataclass(frozen=True)
class _Item:
    key: str
    path: Path
    label: int | None = None


def make_videos(folder: Path, n: int, *, width: int, height: int, seconds: float, fps: float, seed: int) -> list:
    """``n`` H.264 videos with moving texture and grain (roughly the decode cost of real footage)."""
    rng = np.random.default_rng(seed)
    t = int(round(seconds * fps))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    items = []
    for i in range(n):
        fx, fy = rng.uniform(0.01, 0.05, size=2)
        frames = np.empty((t, height, width, 3), dtype=np.uint8)
        for j in range(t):
            base = 128 + 60 * np.sin(fx * (xx + 3 * j)) * np.cos(fy * (yy + 2 * j))
            grain = rng.normal(0, 6, size=(height, width, 1))
            frames[j] = np.clip(base[..., None] + grain + np.array([0, 10, -10]), 0, 255).astype(np.uint8)
        path = write_video(folder / f"bench_{i:04d}.mp4", frames, fps, gop=int(fps * 2))
        items.append(_Item(f"test/{path.name}", path))
    return items


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8, help="frames per video (the submission's default is 24)")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--image-size", type=int, default=None, help="default: the backbone's (299 for IRv2)")
    ap.add_argument("--video-size", default="640x360", help="WIDTHxHEIGHT of the generated videos")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the overlapped run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frame-batch", type=int, default=64, help="frames per backbone forward pass")
    ap.add_argument("--no-amp", action="store_true", help="float32 (else the runtime's auto precision)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--data", type=Path, default=None,
                    help="take the videos from this dataset (test, then train) instead of generating them")
    args = ap.parse_args(argv)
    if args.videos < 1 or args.frames < 1 or args.workers < 1 or args.frame_batch < 1:
        ap.error("--videos, --frames, --workers and --frame-batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.video_size.lower().split("x"))
    dev = resolve_device(args.device)

    encoder = create_encoder(args.backbone, pretrained=False, image_size=args.image_size, seed=0)
    encoder = encoder.to(dev).eval()
    encoder.to_channels_last()
    torch.manual_seed(0)
    head = DetectorHead(encoder.feature_dim).to(dev).eval()
    model = LoadedModel("head-only", encoder, head, args.frames, "--frames", tuple(VARIANTS), Path("<bench>"),
                        round_fp16=True)
    run_opts = dict(device=dev, frame_batch=args.frame_batch, precision="fp32" if args.no_amp else "auto",
                    progress=False)

    with tempfile.TemporaryDirectory(prefix="bench_submit_") as tmp:
        t0 = time.perf_counter()
        if args.data is not None:  # e.g. on a machine without the FFmpeg CLI to encode with
            dataset = load_dataset(args.data)
            items = (list(dataset.test) + list(dataset.train))[: args.videos]
            args.videos = len(items)
            where = f"took {args.videos} videos from {args.data}"
        else:
            items = make_videos(Path(tmp), args.videos, width=width, height=height, seconds=args.seconds,
                                fps=args.fps, seed=0)
            where = f"generated {args.videos} videos {width}x{height}, {args.seconds:g} s at {args.fps:g} fps"
        gen_s = time.perf_counter() - t0
        print(f"{where} in {gen_s:.1f} s; model {args.backbone} random init at {encoder.input_size[0]} px on {dev}, "
              f"{args.frames} frames x {len(VARIANTS)} TTA views", flush=True)

        predict_items(items[:1], model, workers=0, **run_opts)  # warm-up: allocator, kernels, page cache

        t0 = time.perf_counter()
        ds = ClipDataset(items, size=encoder.input_size, variants=VARIANTS, frames=args.frames)
        for _ in iter_clips(ds, workers=0):
            pass
        decode_s = time.perf_counter() - t0

        results = {}
        for name, workers in (("naive (workers=0)", 0), (f"overlap (workers={args.workers})", args.workers)):
            run = predict_items(items, model, workers=workers, **run_opts)
            results[name] = {"workers": workers, "seconds": run.seconds, "videos_per_s": args.videos / run.seconds,
                             "frames_per_s": run.frames_encoded / run.seconds}
            print(f"  {name:22s} {run.seconds:8.2f} s  {args.videos / run.seconds:7.3f} videos/s  "
                  f"{run.frames_encoded / run.seconds:8.1f} frames/s", flush=True)

    naive = results["naive (workers=0)"]["seconds"]
    overlap = results[f"overlap (workers={args.workers})"]["seconds"]
    compute_s = max(naive - decode_s, 1e-9)
    out = {
        "config": vars(args) | {"json": str(args.json) if args.json else None, "device": str(dev),
                                "data": str(args.data) if args.data else None,
                                "image_size": list(encoder.input_size), "variants": len(VARIANTS)},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None},
        "decode_only_seconds": decode_s,
        "compute_seconds_estimate": compute_s,
        "runs": results,
        "speedup_overlap_vs_naive": naive / overlap,
        "ideal_overlap_seconds": max(decode_s, compute_s),
    }
    print(f"decode alone {decode_s:.2f} s ({decode_s / args.videos:.3f} s/video), compute ~{compute_s:.2f} s; "
          f"overlap speed-up {naive / overlap:.2f}x (ideal {naive / max(decode_s, compute_s):.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
