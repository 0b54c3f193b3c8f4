"""Benchmark the feature cache: size per video and the time to write, compact, open and read it all.

Synthetic data shaped like the real thing (default: 600 videos x 5 TTA variants x the union of frames for
k in {24, 32, 48} (~90 rows for a 300-frame video) x 1536-d float16). No decoding, no model.

    python tools/bench_cache.py                 # 600 videos, in a temporary folder
    python tools/bench_cache.py --videos 60 --dim 256 --out /tmp/bench

Read times are with the file in the OS page cache (written just before); a cold read adds disk time
(~0.8 GB at the disk's sequential speed). Each time is printed as wall (process CPU) seconds: on a shared,
busy machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from arena.cache import FEATURE_FORMAT, CacheWriter, FeatureCache, Provenance
from arena.sampling import sampling_spec, union_indices

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f} s ({self.cpu:.2f} s CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=600)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--variants", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--frames", default="24,32,48", help="frame counts whose union is stored")
    parser.add_argument("--out", type=Path, default=None, help="folder for the cache (default: a temporary one)")
    args = parser.parse_args()
    counts = tuple(int(k) for k in args.frames.split(","))
    variants = VARIANTS[: args.variants]
    prov = Provenance(
        backbone="inception_resnet_v2.tf_in1k", weights_source="random:seed=0", weights_hash="0" * 64,
        input_size=(299, 299), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear-antialias",
        decoder={"device": "cpu", "resize": "tensor"}, tta={}, variants=variants, sampling=sampling_spec(),
        frame_counts=counts, feature_dim=args.dim, feature_format=FEATURE_FORMAT,
    )
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = Path(tmp) / "bench.h5"
        rng = np.random.default_rng(0)
        # One random pool sliced per video: generating 0.4 G random numbers would dominate the run.
        pool = rng.standard_normal((len(variants), 1000, args.dim)).astype(np.float16)
        lengths = rng.integers(250, 351, size=args.videos)  # frame counts n of 250..350-frame videos
        rows = 0
        with Clock() as t_stage:
            writer = CacheWriter(path, prov)
            for i, n in enumerate(lengths):
                idx = union_indices(int(n), counts)
                rows += len(idx)
                start = (i * 7) % (1000 - len(idx))
                key = f"train/{'fake' if i % 2 else 'real'}/v{i:04d}.mp4"
                writer.write(key, features=pool[:, start : start + len(idx)], frame_indices=idx,
                             num_source_frames=int(n), label=i % 2)
        with Clock() as t_compact:
            writer.close()
        size = path.stat().st_size

        with Clock() as t_open:
            cache = FeatureCache.open(path, expect=prov)
        keys = cache.keys
        timings = {}
        for k in (counts[0], counts[-1]):
            with Clock() as timings[k]:
                feats, mask = cache.batch(keys, k, "all")
        with Clock() as t_single:
            for key in keys:
                cache.features(key, counts[1], "hflip" if len(variants) > 1 else "original")
        cache.close()
        with Clock() as t_fresh, FeatureCache.open(path) as fresh:  # a new reader reads the file again
            fresh.batch(keys, counts[-1], "all")

    gib = size / 2**30
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"cache: {args.videos} videos x {len(variants)} variants x {rows / args.videos:.1f} rows (mean union of "
          f"k in {list(counts)}, n in 250..350) x {args.dim}-d float16")
    print(f"size: {gib:.3f} GiB total, {size / args.videos / 2**20:.2f} MiB per video "
          f"(payload {rows * len(variants) * args.dim * 2 / args.videos / 2**20:.2f} MiB)")
    print(f"write: staging {t_stage} ({args.videos / t_stage.wall:.0f} videos/s), compaction {t_compact}")
    print(f"open (index + provenance check): {t_open}")
    for k, t in timings.items():
        print(f"batch(all {args.videos} keys, k={k}, all variants): {t}"
              f"{'  (first call: maps the file)' if k == counts[0] else ''}")
    print(f"batch from a fresh reader (open + load + gather, k={counts[-1]}): {t_fresh}")
    print(f"features() one video at a time, {args.videos} calls (k={counts[1]}): {t_single}")
    print(f"result of the last batch: float16 {list(feats.shape)}, mask {list(mask.shape)}")


if __name__ == "__main__":
    main()
