"""Benchmark: FFmpeg threads per decoder against the number of decoders running in parallel.

    python tools/bench_decode_parallel.py                     # 8 videos per codec, 720p, 10 s, GOP 250
    python tools/bench_decode_parallel.py --configs 1x1,2x1,1x2 --codecs h264 --videos 4

Decodes ``k`` uniformly spaced frames resized to ``side``² (arena's ``decode_uniform``, exact seek, tensor resize:
what ``arena features`` and ``arena submit`` do per video) from every video of a set, with ``P`` decoder processes
(each given its share of the videos) of ``T`` FFmpeg threads each (``T = 0``: FFmpeg's own choice). Prints wall
seconds per video and videos/s per configuration, all measured in one run, so the ratios between rows are fair.
The videos are generated once with the FFmpeg CLI (moving test pattern plus per-frame noise, so the encoder cannot
make the frames trivially cheap) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENCODERS = {"h264": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23"],
            "hevc": ["-c:v", "libx265", "-preset", "veryfast", "-crf", "26", "-x265-params", "log-level=error"]}


def make_videos(out: Path, codec: str, n: int, size: str, seconds: float, gop: int) -> list[Path]:
    folder = out / f"{codec}_{size}_{seconds:g}s_gop{gop}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"v{i:02d}.mp4"
        if not path.is_file():
            tmp = path.with_suffix(".tmp.mp4")
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc2=size={size}:rate=30:duration={seconds}",
                            "-vf", f"noise=alls=12:allf=t+u:all_seed={i}", *ENCODERS[codec], "-g", str(gop),
                            "-pix_fmt", "yuv420p", str(tmp)], check=True)
            tmp.rename(path)
        paths.append(path)
    return paths


def _decode_share(args: tuple[list[str], int, int, int]) -> float:
    paths, k, side, threads = args
    import torch

    torch.set_num_threads(1)
    from arena.video import decode_uniform

    c0 = time.process_time()
    for p in paths:
        clip = decode_uniform(p, k, size=(side, side), num_threads=threads)
        assert clip.frames.shape[0] == k
    return time.process_time() - c0


def run_config(paths: list[Path], decoders: int, threads: int, k: int, side: int) -> dict:
    shares = [[str(p) for p in paths[i::decoders]] for i in range(decoders)]
    with ProcessPoolExecutor(decoders) as pool:
        list(pool.map(_decode_share, [(s[:1], k, side, threads) for s in shares]))  # warm-up: imports, first open
        t0 = time.perf_counter()
        cpu = sum(pool.map(_decode_share, [(s, k, side, threads) for s in shares]))
        wall = time.perf_counter() - t0
    return {"decoders": decoders, "threads": threads, "wall_s": wall, "videos_per_s": len(paths) / wall,
            "cpu_s_per_video": cpu / len(paths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--codecs", default="h264,hevc")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--gop", type=int, default=250)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--side", type=int, default=299)
    ap.add_argument("--configs", default=None,
                    help="PxT list, e.g. 1x1,1x2,2x1 (default: every P, T in 1..cores with P*T <= 2*cores, plus 1x0)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/decode_parallel"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    else:
        configs = [(p, t) for p in range(1, cores + 1) for t in range(1, cores + 1) if p * t <= 2 * cores]
        configs.append((1, 0))
    print(f"{cores} CPU cores; {args.videos} videos per codec, {args.size}, {args.seconds:g} s at 30 fps, GOP "
          f"{args.gop}; {args.frames} uniformly spaced frames -> {args.side}x{args.side}")
    results = {}
    for codec in args.codecs.split(","):
        paths = make_videos(args.out, codec, args.videos, args.size, args.seconds, args.gop)
        rows = [run_config(paths, p, t, args.frames, args.side) for p, t in configs]
        best = max(rows, key=lambda r: r["videos_per_s"])
        print(f"\n{codec}: | decoders × FFmpeg threads | s/video (wall) | videos/s | CPU-s/video | vs best |")
        print("|---|---|---|---|---|")
        for r in rows:
            t = "auto" if r["threads"] == 0 else r["threads"]
            print(f"| {r['decoders']} × {t} | {r['wall_s'] / args.videos:.3f} | {r['videos_per_s']:.2f} | "
                  f"{r['cpu_s_per_video']:.3f} | {r['videos_per_s'] / best['videos_per_s']:.2f} |")
        results[codec] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cores": cores, "config": vars(args) | {"out": str(args.out),
                                                                                  "json": str(args.json)},
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
