#!/usr/bin/env python
"""How each stage's cost grows with its work: CSV + log-log PNG + the fitted exponent per curve.

    python tools/bench_scaling.py                       # all stages, results in bench_out/scaling.{csv,png}
    python tools/bench_scaling.py --stages decode_length,decode_resolution --tiny

Curves (x = the work, y = CPU seconds of the process and its children, median of --repeats):
  decode_length      arena.video.decode_uniform(24 frames -> 299²) on 360p H.264 (GOP 250) of 2 … 60 s
                     (exact seek, the default) and the same with seek_mode="approximate" (plain torchcodec)
  decode_resolution  the same on 10 s videos of 360p … 1080p (x = pixels per frame); tensor vs decoder-side resize
  decode_parallel    wall seconds for 8 decodes of 720p by P parallel processes × T FFmpeg threads each
                     (not a power law: the decoder's thread-vs-process choice)
  features_workers   arena.features.extract_features wall seconds vs decode workers (0, 1, 2) on generated videos
  tune_videos        tools/bench_tune.py CPU seconds for 20 trials vs cache size (150, 300, 600 videos)
  tune_trials        tools/bench_tune.py CPU seconds vs trials (10, 40, 160) on 300 videos

The exponent is the least-squares slope of log(y) against log(x): 1 = linear; > 1.15 is flagged (a stage
growing faster than linearly in its input is a bug or needs an explanation). Wall clock is noisy on a shared
machine; CPU time is used wherever the work happens in this process or its children.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("decode_length", "decode_resolution", "decode_parallel", "features_workers", "tune_videos", "tune_trials")
SIZES = {360: (640, 360), 540: (960, 540), 720: (1280, 720), 1080: (1920, 1080)}


def cpu_now() -> float:
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def measure(fn, repeats: int) -> tuple[float, float]:
    """Median (cpu, wall) seconds over ``repeats`` runs after one untimed warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = cpu_now(), time.perf_counter()
        fn()
        cpu.append(cpu_now() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(cpu), statistics.median(wall)


def make_video(folder: Path, height: int, seconds: float, fps: int = 30, gop: int = 250) -> Path:
    """testsrc2 + temporal noise H.264 (camera-like bitrate), generated once."""
    w, h = SIZES[height] if height in SIZES else (height * 16 // 9 // 2 * 2, height)
    path = folder / f"scal_{h}p_{seconds:g}s_gop{gop}.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i",
                        f"testsrc2=s={w}x{h}:r={fps}:d={seconds}", "-vf", "noise=alls=12:allf=t", "-c:v", "libx264",
                        "-preset", "ultrafast", "-crf", "23", "-g", str(gop), "-keyint_min", str(gop),
                        "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(tmp)], check=True)
        tmp.rename(path)
    return path


def _arena(path: Path, resize: str = "tensor", threads: int = 1) -> None:
    from arena.video import decode_uniform

    clip = decode_uniform(path, 24, size=(299, 299), num_threads=threads, resize=resize)
    assert clip.frames.shape[0] == 24


def _approx(path: Path) -> None:
    from torchcodec.decoders import VideoDecoder

    from arena.sampling import uniform_indices
    from arena.video import resize_frames

    dec = VideoDecoder(str(path), seek_mode="approximate", num_ffmpeg_threads=1)
    resize_frames(dec.get_frames_at(uniform_indices(dec.metadata.num_frames, 24).tolist()).data, (299, 299))


def stage_decode_length(args, videos: Path) -> list[dict]:
    rows = []
    for s in args.lengths:
        p = make_video(videos, 360, s)
        for method, fn in (("exact (arena)", lambda p=p: _arena(p)), ("approximate", lambda p=p: _approx(p))):
            cpu, wall = measure(fn, args.repeats)
            rows.append(dict(stage="decode_length", series=method, x=s, x_unit="seconds of video", cpu_s=cpu,
                             wall_s=wall))
            print(f"decode_length {method} {s:g}s: {cpu:.3f} CPU-s", flush=True)
    return rows


def stage_decode_resolution(args, videos: Path) -> list[dict]:
    rows = []
    for h in args.heights:
        p = make_video(videos, h, args.res_seconds)
        w = SIZES[h][0]
        for method in ("tensor", "decoder"):
            cpu, wall = measure(lambda p=p, m=method: _arena(p, m), args.repeats)
            rows.append(dict(stage="decode_resolution", series=f"resize={method}", x=w * h, x_unit="pixels per frame",
                             cpu_s=cpu, wall_s=wall))
            print(f"decode_resolution {h}p resize={method}: {cpu:.3f} CPU-s", flush=True)
    return rows


def _decode_many(paths: list[str], threads: int) -> None:
    for p in paths:
        _arena(Path(p), threads=threads)


def stage_decode_parallel(args, videos: Path) -> list[dict]:
    p = str(make_video(videos, 720, args.res_seconds))
    jobs = 8 if not args.tiny else 2
    rows = []
    for procs in (1, 2):
        for threads in (1, 2):
            chunks = [[p] * (jobs // procs)] * procs
            # spawn: a forked child of a process that already ran torch/FFmpeg threads can deadlock
            with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
                list(ex.map(_decode_many, [[p]] * procs, [threads] * procs))  # warm the workers

                def run(ex=ex, chunks=chunks, threads=threads):
                    list(ex.map(_decode_many, chunks, [threads] * len(chunks)))

                walls = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run()
                    walls.append(time.perf_counter() - t0)
            wall = statistics.median(walls)
            rows.append(dict(stage="decode_parallel", series=f"threads={threads}", x=procs, x_unit="parallel decoders",
                             cpu_s=float("nan"), wall_s=wall, note=f"{jobs} decodes of 720p 10 s"))
            print(f"decode_parallel procs={procs} threads={threads}: {wall:.2f} wall-s for {jobs}", flush=True)
    return rows


def stage_features_workers(args, data: Path | None) -> list[dict]:
    from arena.features import extract_features

    if data is None:
        from arena.demo import generate_dataset

        data = Path(args.out) / "scaling_features_data"
        if not (data / "test_public.csv").exists():
            generate_dataset(data, n_train_real=2, n_train_fake=2, n_test=1, seconds=4.0 if not args.tiny else 1.0,
                             size=(180, 320), fps=30.0, seed=0, overwrite=True, progress=False)
    rows = []
    for workers in (0, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), cpu_now()
            s = extract_features(data=data, cache=Path(tmp) / "f.h5", frame_counts=(8,), backbone=args.backbone,
                                 pretrained=False, image_size=args.image_size, device="cpu", workers=workers,
                                 frame_batch=32, limit=args.feature_videos)
            wall, cpu = time.perf_counter() - t0, cpu_now() - c0
        rows.append(dict(stage="features_workers", series=args.backbone, x=workers, x_unit="decode workers",
                         cpu_s=cpu, wall_s=wall, note=f"{s.frames} frames, {s.frames / wall:.1f} frames/s"))
        print(f"features workers={workers}: {wall:.1f} wall-s, {s.frames / wall:.1f} frames/s", flush=True)
    return rows


def _tune(videos: int, trials: int, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.json"
        cmd = [sys.executable, str(ROOT / "tools" / "bench_tune.py"), "--videos", str(videos), "--trials", str(trials),
               "--json", str(out)]
        if tiny:
            cmd += ["--dim", "16", "--epochs", "2", "--frames", "4,8", "--source-frames", "30"]
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads(out.read_text())


def stage_tune(args, which: str) -> list[dict]:
    rows = []
    grid = ([(v, args.tune_trials) for v in args.tune_videos] if which == "tune_videos"
            else [(args.tune_videos[1], t) for t in args.trials])
    for v, t in grid:
        r = _tune(v, t, args.tiny)
        x = v if which == "tune_videos" else t
        rows.append(dict(stage=which, series="run_study", x=x, x_unit="videos" if which == "tune_videos" else "trials",
                         cpu_s=r["cpu_seconds"], wall_s=r["seconds"],
                         note=f"{r['complete']} complete {r['pruned']} pruned, {r['mean_epochs']:.1f} epochs/trial"))
        print(f"{which} videos={v} trials={t}: {r['cpu_seconds']:.1f} CPU-s", flush=True)
    return rows


def exponents(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["stage"], r["series"]) for r in rows})
    for stage, series in keys:
        pts = [(r["x"], r["cpu_s"] if np.isfinite(r["cpu_s"]) else r["wall_s"]) for r in rows
               if r["stage"] == stage and r["series"] == series and r["x"] > 0]
        if len(pts) < 2 or stage in ("decode_parallel", "features_workers"):
            continue
        x, y = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-6) for p in pts])
        slope = float(np.polyfit(x, y, 1)[0])
        out.append(dict(stage=stage, series=series, exponent=slope, superlinear=slope > 1.15))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        sub = [r for r in rows if r["stage"] == stage]
        for series in sorted({r["series"] for r in sub}):
            pts = sorted((r["x"], r["cpu_s"] if np.isfinite(r["cpu_s"]) else r["wall_s"]) for r in sub
                         if r["series"] == series)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=series)
        if stage not in ("decode_parallel", "features_workers"):
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel(sub[0]["x_unit"])
        ax.set_ylabel("CPU s" if np.isfinite(sub[0]["cpu_s"]) else "wall s")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--tiny", action="store_true", help="seconds-scale smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="dataset for features_workers (default: generate one)")
    ap.add_argument("--backbone", default="inception_resnet_v2.tf_in1k")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--feature-videos", type=int, default=2)
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        ap.error(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    if args.tiny:
        args.lengths, args.heights, args.res_seconds = [1, 2], [360, 540], 1
        args.tune_videos, args.trials, args.tune_trials = [20, 40], [1, 2], 1
        args.repeats, args.backbone, args.image_size, args.feature_videos = 1, "resnet18", 75, 1
    else:
        args.lengths, args.heights, args.res_seconds = [2, 5, 15, 60], [360, 540, 720, 1080], 10
        # ~0.9 CPU-s per trial on a 600-video cache (2 idle cores): videos 150 … 600 at 20 trials, and 10 … 160
        # trials on 300 videos, long enough that the sampler's unpruned start-up trials do not dominate
        args.tune_videos, args.trials, args.tune_trials = [150, 300, 600], [10, 40, 160], 20
    args.out.mkdir(parents=True, exist_ok=True)
    videos = args.out / "videos"
    name = "scaling_tiny" if args.tiny else "scaling"
    csv_path = args.out / f"{name}.csv"
    fields = ["stage", "series", "x", "x_unit", "cpu_s", "wall_s", "note"]
    kept: list[dict] = []
    if csv_path.exists():  # keep the rows of stages not rerun now, so stages can be measured one run at a time
        with open(csv_path) as f:
            kept = [dict(r, x=float(r["x"]), cpu_s=float(r["cpu_s"]), wall_s=float(r["wall_s"]))
                    for r in csv.DictReader(f) if r["stage"] not in stages]
    rows: list[dict] = []
    for stage in stages:
        if stage == "decode_length":
            rows += stage_decode_length(args, videos)
        elif stage == "decode_resolution":
            rows += stage_decode_resolution(args, videos)
        elif stage == "decode_parallel":
            rows += stage_decode_parallel(args, videos)
        elif stage == "features_workers":
            rows += stage_features_workers(args, args.data)
        else:
            rows += stage_tune(args, stage)
        with open(csv_path, "w", newline="") as f:  # after every stage: a killed run keeps what it measured
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in kept + rows:
                w.writerow({k: r.get(k, "") for k in fields})
    rows = kept + rows
    exps = exponents(rows)
    (args.out / f"{name}_exponents.json").write_text(json.dumps(dict(exponents=exps, load=os.getloadavg()), indent=1))
    plot(rows, args.out / f"{name}.png")
    print(f"\nload average {os.getloadavg()[0]:.1f}; exponents (slope of log CPU-s vs log work):")
    for e in exps:
        flag = "  <-- faster than linear" if e["superlinear"] else ""
        print(f"  {e['stage']:18s} {e['series']:18s} {e['exponent']:+.2f}{flag}")
    print(f"wrote {args.out / (name + '.csv')} and {args.out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
