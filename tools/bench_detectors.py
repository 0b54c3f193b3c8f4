#!/usr/bin/env python
"""Face detector comparison: recall and CPU time per frame of each packaged detector on the shared face clips.

Per clip, ``--frames`` uniformly spaced frames are decoded once at full resolution (`arena.video.decode_uniform`),
downscaled to each ``--sizes`` long side the way the face stage does it (`arena.faces.crop.detection_scale`, never
upscaled) and given to each detector as one batch. Reported per detector, size and clip: the fraction of sampled
frames with at least one face, the median height (source pixels) of the best-scoring box and the mean number of
boxes per frame (two-person clips need both faces); per detector and
size: the recall over the clips where a face is visible throughout (`THROUGHOUT`), and CPU seconds per frame
(``time.process_time`` around ``detect``, all threads of this process) and wall seconds per frame.

Recall here counts frames with any box, so a false positive counts as a find; the median box heights and
``arena faces --strip`` show whether the boxes are faces.

Detectors: ``--detectors mtcnn,dlib-hog@40`` (``NAME@MIN_FACE`` overrides ``--min-face`` for one entry); those
whose package is not installed are listed as skipped.

Usage: python tools/bench_detectors.py [--videos DIR] [--frames 24] [--sizes 320,480,640] [--threads 2]
       [--detectors mtcnn,dlib-hog] [--min-face 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arena.errors import FaceDetectorUnavailable
from arena.faces.crop import detection_scale
from arena.faces.detect import DETECTORS, detector_info, make_detector
from arena.video import decode_uniform, resize_frames

ROOT = Path(__file__).resolve().parents[1]
# The MANIFEST's hamilton clip cuts between a wide stage shot (face ~20 px) and the audience, and the crowd clip has
# only small faces (~20-100 px at 1080p) of people walking in and out: a missed frame there is not a missed
# visible face, so they are left out of the recall (and reported per clip like the others).
NOT_THROUGHOUT = ("real_face_recognition_hamilton_stage_wide.mp4", "real_facenet_pytorch_crowd_walking_1080p.mp4")


def default_videos() -> Path:
    """``$ARENA_SHARED_VIDEOS/faces`` (as the tests use), else ``../shared/videos/faces`` next to the repository."""
    env = os.environ.get("ARENA_SHARED_VIDEOS")
    return (Path(env) if env else ROOT.parent / "shared" / "videos") / "faces"


def parse_detectors(text: str, min_face: int) -> list[tuple[str, int]]:
    """``"mtcnn,dlib-hog@40"`` -> ``[("mtcnn", min_face), ("dlib-hog", 40)]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, face = item.partition("@")
        out.append((name, int(face) if face else min_face))
    return out


def label(name: str, min_face: int, default_min_face: int) -> str:
    return name if min_face == default_min_face else f"{name}@{min_face}"


def bench(videos: list[Path], detectors: list[tuple[str, int]], sizes: list[int], frames: int,
          default_min_face: int) -> tuple[list[dict], list[str]]:
    """One row per (detector, size, clip); the labels of the detectors that could not be made are returned too."""
    built, skipped = {}, []
    for name, min_face in detectors:
        try:
            built[label(name, min_face, default_min_face)] = make_detector(name, min_face=min_face)
        except FaceDetectorUnavailable as e:
            skipped.append(f"{label(name, min_face, default_min_face)} ({e})")
    rows = []
    for path in videos:
        full = decode_uniform(path, frames).frames
        height, width = full.shape[-2:]
        for side in sizes:
            small = resize_frames(full, detection_scale(height, width, side))
            for key, det in built.items():
                det.detect(small[:1])  # first call on a new size pays one-off allocations, not per-frame work
                cpu, wall = time.process_time(), time.perf_counter()
                result = det.detect(small)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                to_source = height / small.shape[-2]
                tops = [float(d.boxes[0, 3] - d.boxes[0, 1]) * to_source for d in result if len(d)]
                rows.append(dict(detector=key, size=side, clip=path.name, detect_hw=list(small.shape[-2:]),
                                 frames=len(result), with_face=len(tops),
                                 median_box_height_px=round(statistics.median(tops), 1) if tops else None,
                                 mean_boxes=round(float(np.mean([len(d) for d in result])), 2),
                                 cpu_s=round(cpu, 4), wall_s=round(wall, 4)))
            print(f"  {path.name} {side}px done", file=sys.stderr, flush=True)
    return rows, skipped


def summarise(rows: list[dict]) -> list[dict]:
    """Per (detector, size): recall over the clips with a face throughout, CPU and wall seconds per frame."""
    out = []
    for key in dict.fromkeys((r["detector"], r["size"]) for r in rows):
        mine = [r for r in rows if (r["detector"], r["size"]) == key]
        kept = [r for r in mine if r["clip"] not in NOT_THROUGHOUT]
        n = sum(r["frames"] for r in mine)
        out.append(dict(detector=key[0], size=key[1], clips_throughout=len(kept),
                        recall=round(sum(r["with_face"] for r in kept) / max(1, sum(r["frames"] for r in kept)), 4),
                        cpu_s_per_frame=round(sum(r["cpu_s"] for r in mine) / n, 4),
                        wall_s_per_frame=round(sum(r["wall_s"] for r in mine) / n, 4)))
    return out


def render(rows: list[dict], summary: list[dict]) -> str:
    """One markdown table: clips down, detector x size across; recall and cost at the bottom."""
    cols = list(dict.fromkeys((r["detector"], r["size"]) for r in rows))
    cell = {(r["detector"], r["size"], r["clip"]): r for r in rows}
    lines = ["| clip | " + " | ".join(f"{d} {s}px" for d, s in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for clip in dict.fromkeys(r["clip"] for r in rows):
        mark = " (not in recall)" if clip in NOT_THROUGHOUT else ""
        parts = []
        for d, s in cols:
            r = cell[(d, s, clip)]
            h = f"{r['median_box_height_px']:.0f} px" if r["median_box_height_px"] is not None else "-"
            parts.append(f"{r['with_face']}/{r['frames']} · {h} · {r['mean_boxes']:.1f}")
        lines.append(f"| {clip}{mark} | " + " | ".join(parts) + " |")
    by = {(s["detector"], s["size"]): s for s in summary}
    n = by[cols[0]]["clips_throughout"] if cols else 0
    lines.append(f"| **recall, {n} clips with a face throughout** | "
                 + " | ".join(f"**{100 * by[c]['recall']:.1f} %**" for c in cols) + " |")
    lines.append("| CPU s / frame | " + " | ".join(f"{by[c]['cpu_s_per_frame']:.3f}" for c in cols) + " |")
    lines.append("| wall s / frame | " + " | ".join(f"{by[c]['wall_s_per_frame']:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=Path, default=None, help="folder of face clips (default: shared/videos/faces)")
    ap.add_argument("--frames", type=int, default=24, help="uniformly spaced frames per clip")
    ap.add_argument("--sizes", default="320,480,640", help="long sides (px) to detect at, comma-separated")
    ap.add_argument("--detect-size", type=int, default=None, help="one long side; overrides --sizes")
    ap.add_argument("--detectors", default=",".join(DETECTORS), help="NAME or NAME@MIN_FACE, comma-separated")
    ap.add_argument("--min-face", type=int, default=16, help="smallest face (px at detection size) looked for")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)

    folder = args.videos or default_videos()
    videos = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in (".mp4", ".mov", ".mkv",
                                                                                            ".webm", ".avi"))
    if not videos:
        print(f"no videos in {folder}; give --videos DIR", file=sys.stderr)
        return 2
    sizes = [args.detect_size] if args.detect_size else [int(s) for s in args.sizes.split(",")]
    detectors = parse_detectors(args.detectors, args.min_face)
    unknown = [n for n, _ in detectors if n not in DETECTORS]
    if unknown:
        ap.error(f"unknown detector(s) {', '.join(unknown)}; choose from {', '.join(DETECTORS)}")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows, skipped = bench(videos, detectors, sizes, args.frames, args.min_face)
    load_end = os.getloadavg()
    summary = summarise(rows)

    infos = {name: detector_info(name) for name in dict.fromkeys(n for n, _ in detectors)}
    versions = ", ".join(f"{n}: {i['package']} {i['version'] or 'not installed'}" for n, i in infos.items())
    print(f"`python tools/bench_detectors.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
          f"{len(videos)} clips from {folder.name}/, {args.frames} frames each, min face {args.min_face} px, torch "
          f"{torch.__version__} with {args.threads} threads on {os.cpu_count()} CPUs; load average "
          f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end  \n{versions}"
          + (f"  \nskipped: {'; '.join(skipped)}" if skipped else "") + "\n")
    print(render(rows, summary) if rows else "(no detector could be made)")
    print("\ncell: frames with >= 1 face / sampled · median height (source px) of the best box · boxes per frame")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, threads=args.threads,
                                             loadavg_start=load_start, loadavg_end=load_end, detectors=infos,
                                             skipped=skipped, rows=rows, summary=summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
