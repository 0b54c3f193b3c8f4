#!/usr/bin/env python
"""`make bench`: every speed claim of arena measured beside its baseline, in one run, as one table.

    python tools/bench_all.py                 # CPU scale (≲ 30 min on 2 cores), results in bench_out/
    python tools/bench_all.py --tiny          # seconds-scale smoke run (the test suite uses it)
    python tools/bench_all.py --only decode,tune

Steps (each one of the benchmark scripts in tools/, run as a subprocess that writes JSON to bench_out/raw/):

  data      the competition-like dataset (``arena demo-data --preset competition``: 640x360, 10 s, 30 fps, crf 26),
            generated once into bench_out/competition_<n>; a *subset* of the 600 + 200 videos on CPU (generation
            costs ~25 CPU-s per video here), with the same per-video settings. Generation time is recorded.
  decode    tools/bench_decode.py: 24 frames -> 299², arena vs the seed's OpenCV seek-per-frame vs ffmpeg full decode
  features  tools/bench_features.py on the generated videos: extraction vs naive, pipeline vs bare backbone
  tune      tools/bench_tune.py: head trials on a 600-video synthetic cache, projected to 200 trials
  submit    tools/bench_submit.py: full-video TTA path with decode workers vs inline decode
  train     tools/bench_train.py: train-full step at the seed's settings, s/video and peak memory

Every measure is printed as: measure | arena | baseline (same run) | ratio | target | met?, and written to
bench_out/summary.md and bench_out/summary.json. Timings are CPU seconds where the script offers them (the machine is
shared); the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
STEPS = ("data", "decode", "features", "tune", "submit", "train")

# name -> per-scale arguments. "full" fits a loaded 2-core CPU in ≲ 30 min; "tiny" runs in well under a minute.
SCALES: dict[str, dict] = {
    "full": dict(n_train=3, n_test=2, gen_size=None,
                 decode=["--sizes", "360,720", "--gops", "250", "--repeats", "1",
                         "--methods", "arena,seed,ffmpeg-floor", "--clock", "cpu"],
                 features=["--videos", "4", "--frames", "24,32,48", "--workers", "2"],
                 tune=["--trials", "200", "--videos", "600"],
                 submit=["--videos", "3", "--frames", "8", "--image-size", "160", "--seconds", "4"],
                 train=["--image-size", "299", "--frames", "24", "--steps", "2", "--warmup", "1"]),
    "tiny": dict(n_train=2, n_test=2, gen_size="160x96", gen_seconds="1", gen_fps="10",
                 decode=["--sizes", "360", "--gops", "30", "--repeats", "1", "--methods", "arena,seed,ffmpeg-floor",
                         "--clock", "cpu", "--no-warmup"],
                 features=["--videos", "2", "--image-size", "75", "--frames", "4",
                           "--workers", "0", "--frame-batch", "8", "--backbone", "resnet18"],
                 tune=["--trials", "2", "--videos", "40", "--dim", "16", "--epochs", "2", "--frames", "4,8",
                       "--source-frames", "30"],
                 submit=["--videos", "1", "--frames", "2", "--image-size", "75", "--seconds", "1", "--fps", "8",
                         "--video-size", "96x64", "--workers", "1", "--backbone", "resnet18", "--frame-batch", "8"],
                 train=["--image-size", "75", "--frames", "2", "--steps", "1", "--warmup", "1", "--accum-steps", "1",
                        "--backbone", "resnet18"]),
}


def _run(name: str, cmd: list[str], log: Path, timeout: float) -> tuple[bool, float, str]:
    """Run one step; returns (ok, wall seconds, last lines of output). A failed step never stops the others."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        ok, text = False, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    wall = time.perf_counter() - t0
    log.write_text(" ".join(cmd) + "\n\n" + (text if isinstance(text, str) else text.decode(errors="replace")))
    tail = "\n".join(str(text).strip().splitlines()[-3:])
    where = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
    print(f"[{name}] {'ok' if ok else 'FAILED'} in {wall:.0f} s (log {where})", flush=True)
    if not ok:
        print(tail, file=sys.stderr)
    return ok, wall, tail


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_dataset(out: Path, scale: dict, raw: Path) -> tuple[Path, dict]:
    """The competition-like dataset, generated once (the timing of that one generation is kept beside it)."""
    n_train, n_test = scale["n_train"], scale["n_test"]
    tag = "tiny" if scale.get("gen_size") else "competition"
    data = out / f"{tag}_{2 * n_train}+{n_test}"
    timing = data / "bench_generation.json"
    if (data / "test_public.csv").exists() and timing.exists():
        info = json.loads(timing.read_text()) | {"cached": True}
        return data, info
    cmd = [sys.executable, "-m", "arena", "demo-data", "--preset", "competition", "--n-train", str(n_train),
           "--n-test", str(n_test), "--force", str(data)]
    if scale.get("gen_size"):
        cmd += ["--size", scale["gen_size"], "--seconds", scale["gen_seconds"], "--fps", scale["gen_fps"]]
    c0 = _children_cpu()
    ok, wall, tail = _run("data", cmd, raw / "data.log", timeout=3600)
    if not ok:
        raise SystemExit(f"dataset generation failed:\n{tail}")
    cpu = _children_cpu() - c0
    n = 2 * n_train + n_test
    nbytes = sum(p.stat().st_size for p in data.rglob("*.mp4"))
    info = dict(videos=n, wall_s=wall, cpu_s=cpu, cpu_s_per_video=cpu / n, bytes=nbytes, bytes_per_video=nbytes / n,
                projected_800_cpu_h=cpu / n * 800 / 3600, cached=False)
    timing.write_text(json.dumps(info, indent=1) + "\n")
    return data, info


def _children_cpu() -> float:
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ch.ru_utime + ch.ru_stime


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def rows_from(raw: Path, data_info: dict | None) -> list[dict]:
    """The summary rows: measure, arena, baseline, ratio, target, met (None = no target / not measured)."""
    rows: list[dict] = []

    def add(measure, arena, baseline, ratio, target, met, note=""):
        rows.append(dict(measure=measure, arena=arena, baseline=baseline, ratio=ratio, target=target, met=met,
                         note=note))

    if data_info:
        add("dataset generation, CPU-s per 10 s 640x360 video", f"{data_info['cpu_s_per_video']:.1f}", "", None,
            "", None, f"{data_info['videos']} videos, {data_info['bytes_per_video'] / 1e6:.2f} MB/video; all 800 "
            f"≈ {data_info['projected_800_cpu_h']:.1f} CPU-h")
    dec = _load(raw / "decode.json")
    if dec:
        for r in dec["rows"]:
            c = r["cpu"]
            if "seed" in c:
                x = c["arena"] / c["seed"]
                add(f"decode 24 frames {r['video']} GOP {r['gop']} vs seed OpenCV seek (CPU s)", f"{c['arena']:.3f}",
                    f"{c['seed']:.3f}", x, "≤ 0.25×", x <= 0.25)
            if "ffmpeg-floor" in c:
                x = c["arena"] / c["ffmpeg-floor"]
                add(f"decode 24 frames {r['video']} GOP {r['gop']} vs ffmpeg full decode (CPU s)",
                    f"{c['arena']:.3f}", f"{c['ffmpeg-floor']:.3f}", x, "≤ 1.05×", x <= 1.05)
    fe = _load(raw / "features.json")
    if fe:
        x = fe["arena_fps"] / fe["naive_fps"]
        add("extraction frames/s vs naive (fp32, inline, per-video batches)", f"{fe['arena_fps']:.1f}",
            f"{fe['naive_fps']:.1f}", x, "≥ 2.5×", x >= 2.5, f"{fe['videos']} videos, {fe['input'][0]}² input")
        x = fe["arena_fps"] / fe["bare_fps"]
        add("pipeline frames/s over bare backbone (random tensors)", f"{fe['arena_fps']:.1f}", f"{fe['bare_fps']:.1f}",
            x, "≥ 0.8 (CPU)", x >= 0.8)
        add("cache size per video (MiB)", f"{fe['cache_bytes_per_video'] / 2**20:.2f}", "", None, "", None)
    tu = _load(raw / "tune.json")
    if tu:
        s200 = tu["projected_200_trials_s"]
        seed = 200 * 180.0  # the seed notebook: 30 min for 10 trials
        how = "measured" if tu["trials"] >= 200 else f"projected from {tu['trials']} trials"
        add(f"200 head trials on a {tu['videos']}-video cache (s, wall; {how})", f"{s200:.0f}",
            f"{seed:.0f} (seed, reported)", s200 / seed, "≤ 120 s", s200 <= 120,
            f"CPU-s projection {tu['projected_200_trials_cpu_s']:.0f}, load {tu['load']:.1f}")
    su = _load(raw / "submit.json")
    if su:
        runs = list(su["runs"].values())
        naive, over = runs[0], runs[1]
        x = over["videos_per_s"] / naive["videos_per_s"]
        add(f"submit videos/s, decode workers={over['workers']} vs inline", f"{over['videos_per_s']:.3f}",
            f"{naive['videos_per_s']:.3f}", x, "> 1×", x > 1.0,
            f"{su['config']['frames']} frames × {su['config']['variants']} TTA at {su['config']['image_size'][0]}²")
    tr = _load(raw / "train.json")
    if tr:
        cpu = tr.get("cpu_seconds_per_video")
        add(f"train-full s/video ({tr['image_size']}², {tr['frames']} frames, batch {tr['batch_size']}, "
            f"{tr['amp']})", f"{tr['seconds_per_video']:.2f}", "", None, "", None,
            f"CPU-s/video {cpu}" if cpu is not None else "")
        add("train-full peak memory (GiB, RSS)", f"{tr['peak_rss_gib']:.2f}", "", None, "≤ 3.5 GB (GPU, CUDA alloc)",
            None, "CPU RSS includes the interpreter and libraries; the CUDA figure comes from tools/gpu_check.sh")
    return rows


def render(rows: list[dict], header: str) -> str:
    lines = [header, "", "| measure | arena | baseline (same run) | ratio | target | met? |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×" if r["ratio"] >= 0.01 else f"{r['ratio']:.1e}×"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {r['arena']} | {r['baseline']} | {ratio} | {r['target']} | {met} |")
    notes = [f"- {r['measure']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--tiny", action="store_true", help="seconds-scale smoke run (tiny videos, resnet18)")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    ap.add_argument("--n-train", type=int, default=None, help="train videos per class to generate (default: scale's)")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step before it is abandoned")
    args = ap.parse_args(argv)
    steps = [s for s in args.only.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"unknown steps {bad}; choose from {', '.join(STEPS)}")
    scale = dict(SCALES["tiny" if args.tiny else "full"])
    if args.n_train:
        scale["n_train"] = args.n_train
    if args.n_test:
        scale["n_test"] = args.n_test
    out = args.out.resolve()
    raw = out / ("raw_tiny" if args.tiny else "raw")
    raw.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_all = time.perf_counter()
    data, data_info = None, None
    if {"data", "features"} & set(steps):
        data, data_info = ensure_dataset(out, scale, raw)
        print(f"[data] {data} ({'cached' if data_info.get('cached') else 'generated'}: "
              f"{data_info['cpu_s_per_video']:.1f} CPU-s/video)", flush=True)
    cmds = {
        "decode": [py, str(TOOLS / "bench_decode.py"), "--out", str(out), *scale["decode"]],
        "features": [py, str(TOOLS / "bench_features.py"), "--out", str(out), *scale["features"]]
        + (["--data", str(data)] if data else []),
        "tune": [py, str(TOOLS / "bench_tune.py"), *scale["tune"]],
        "submit": [py, str(TOOLS / "bench_submit.py"), *scale["submit"]],
        "train": [py, str(TOOLS / "bench_train.py"), *scale["train"]],
    }
    walls = {}
    for step in steps:
        if step == "data":
            continue
        (raw / f"{step}.json").unlink(missing_ok=True)
        ok, walls[step], _ = _run(step, [*cmds[step], "--json", str(raw / f"{step}.json")], raw / f"{step}.log",
                                  args.timeout)
    rows = rows_from(raw, data_info if "data" in steps else None)
    load = os.getloadavg()
    header = (f"arena bench ({'tiny' if args.tiny else 'CPU scale'}), {platform.machine()} {os.cpu_count()} CPUs, "
              f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, {time.perf_counter() - t_all:.0f} s in all, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = render(rows, header)
    print("\n" + text)
    name = "summary_tiny" if args.tiny else "summary"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(dict(header=header, rows=rows, step_wall_s=walls, data=data_info,
                                                      load=load), indent=1, default=str) + "\n")
    missing = [s for s in steps if s != "data" and not (raw / f"{s}.json").exists()]
    if missing:
        print(f"steps without results: {', '.join(missing)} (see their logs in {raw})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
