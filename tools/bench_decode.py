#!/usr/bin/env python
"""Decode benchmark: 24 uniformly sampled frames resized to 299x299, arena vs the seed's OpenCV way vs FFmpeg.

Videos: 10 s at 30 fps (300 frames), H.264 at 360p / 720p / 1080p with GOP 30 and 250, generated once into
``bench_out/videos`` (testsrc2 + temporal noise so the bitrate resembles camera footage).

Methods, each timed in the same run (median of ``--repeats``):
  arena          arena.video.decode_uniform(path, 24, size=(299, 299))           (exact seek, tensor resize)
  arena-decres   the same with torchcodec's decoder-side Resize                    (resize="decoder")
  tc-approx      plain torchcodec, seek_mode="approximate", + arena.video.resize_frames
  seed           OpenCV: CAP_PROP_POS_FRAMES seek per frame, read, BGR->RGB, cv2.resize (the seed's code path)
  cv-seq         OpenCV: grab() every frame, retrieve() only the sampled ones, cv2.resize
  ffmpeg-floor   ``ffmpeg -threads T -i X -f null -``: decodes the whole file, converts and resizes nothing

Usage: python tools/bench_decode.py [--threads 1] [--repeats 5] [--out bench_out] [--sizes 360,720,1080]
Prints a markdown table (seconds) with the ratios arena/seed and arena/ffmpeg-floor.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

K, SIDE, SECONDS, FPS = 24, 299, 10, 30
SIZES = {360: (640, 360), 720: (1280, 720), 1080: (1920, 1080)}


def make_video(out: Path, width: int, height: int, gop: int) -> Path:
    path = out / f"bench_{height}p_gop{gop}.mp4"
    if path.exists() and path.stat().st_size > 0:
        return path
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "lavfi",
           "-i", f"testsrc2=s={width}x{height}:r={FPS}:d={SECONDS}", "-vf", "noise=alls=12:allf=t",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-g", str(gop), "-keyint_min", str(gop),
           "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(path)
    return path


def m_arena(path: Path, threads: int) -> None:
    from arena.video import decode_uniform

    clip = decode_uniform(path, K, size=(SIDE, SIDE), num_threads=threads)
    assert clip.frames.shape == (K, 3, SIDE, SIDE) and clip.valid.all()


def m_arena_decoder_resize(path: Path, threads: int) -> None:
    from arena.video import decode_uniform

    clip = decode_uniform(path, K, size=(SIDE, SIDE), num_threads=threads, resize="decoder")
    assert clip.frames.shape == (K, 3, SIDE, SIDE)


def m_torchcodec_approx(path: Path, threads: int) -> None:
    from torchcodec.decoders import VideoDecoder

    from arena.sampling import uniform_indices
    from arena.video import resize_frames

    dec = VideoDecoder(str(path), seek_mode="approximate", num_ffmpeg_threads=threads)
    idx = uniform_indices(dec.metadata.num_frames, K)
    frames = resize_frames(dec.get_frames_at(idx.tolist()).data, (SIDE, SIDE))
    assert frames.shape == (K, 3, SIDE, SIDE)


def _capture(path: Path, threads: int):
    import cv2

    try:  # OpenCV >= 4.8 lets the caller set FFmpeg's decoding threads
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    except (AttributeError, cv2.error):
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise RuntimeError(f"OpenCV cannot open {path}")
    return cap


def m_seed(path: Path, threads: int) -> None:
    import cv2

    cap = _capture(path, threads)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    out = []
    for i in np.linspace(0, n - 1, K).astype(int):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, frame = cap.read()
        if not ok:
            raise RuntimeError(f"seed way: frame {i} of {path} unreadable")
        out.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (SIDE, SIDE)))
    cap.release()
    assert len(out) == K


def m_cv_sequential(path: Path, threads: int) -> None:
    import cv2

    cap = _capture(path, threads)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = set(np.linspace(0, n - 1, K).astype(int).tolist())
    out = []
    for i in range(n):
        if not cap.grab():
            break
        if i in wanted:
            ok, frame = cap.retrieve()
            out.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (SIDE, SIDE)))
    cap.release()
    assert len(out) == len(wanted)


def m_ffmpeg_floor(path: Path, threads: int) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-threads", str(threads), "-i", str(path), "-f", "null", "-"],
                   check=True)


METHODS: dict[str, Callable[[Path, int], None]] = {
    "arena": m_arena,
    "arena-decres": m_arena_decoder_resize,
    "tc-approx": m_torchcodec_approx,
    "seed": m_seed,
    "cv-seq": m_cv_sequential,
    "ffmpeg-floor": m_ffmpeg_floor,
}


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (the ffmpeg CLI)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def timeit(fn: Callable[[], None], repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (CPU time is the fair measure on a shared, loaded machine)."""
    if warmup:
        fn()  # page cache, decoder set-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="FFmpeg decoding threads for every method (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--sizes", default="360,720,1080")
    ap.add_argument("--gops", default="30,250")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="which median goes into the table (both are printed to stderr); use cpu on a busy machine")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed run per method and video")
    ap.add_argument("--json", type=Path, default=None, help="also write every median (wall and CPU) here")
    args = ap.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found on PATH", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    import cv2  # noqa: F401 - imports happen here, not inside the first timed call
    import torchvision.transforms.v2.functional  # noqa: F401

    import arena.video  # noqa: F401

    rows, records = [], []
    for h in (int(s) for s in args.sizes.split(",")):
        for gop in (int(g) for g in args.gops.split(",")):
            path = make_video(args.out / "videos", *SIZES[h], gop)
            both = {m: timeit(lambda m=m, p=path: METHODS[m](p, args.threads), args.repeats,
                                 not args.no_warmup) for m in methods}
            res = {m: w if args.clock == "wall" else c for m, (w, c) in both.items()}
            rows.append((f"{h}p", gop, res))
            records.append({"video": f"{h}p", "gop": gop, "threads": args.threads,
                            "wall": {m: w for m, (w, _) in both.items()}, "cpu": {m: c for m, (_, c) in both.items()}})
            print(f"{h}p gop{gop} (wall/cpu s): " + ", ".join(f"{m} {w:.3f}/{c:.3f}" for m, (w, c) in both.items()),
                  file=sys.stderr, flush=True)
    print(f"\n{K} frames -> {SIDE}x{SIDE}, 10 s @ 30 fps H.264, threads={args.threads}, median of {args.repeats}, "
          f"{args.clock} seconds, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    head = ["video", "GOP", *methods]
    has_ratio = "arena" in methods
    if has_ratio and "seed" in methods:
        head.append("arena/seed")
    if has_ratio and "ffmpeg-floor" in methods:
        head.append("arena/ffmpeg")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, gop, res in rows:
        cells = [name, str(gop), *(f"{res[m]:.3f}" for m in methods)]
        if "arena/seed" in head:
            cells.append(f"{res['arena'] / res['seed']:.2f}")
        if "arena/ffmpeg" in head:
            cells.append(f"{res['arena'] / res['ffmpeg-floor']:.2f}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"k": K, "side": SIDE, "repeats": args.repeats, "clock": args.clock,
                                         "load": os.getloadavg()[0], "rows": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
