#!/usr/bin/env python
"""Cost of face crops: CPU time of ``features --crop faces`` against ``--crop none``, side by side in one run.

Issue 13's target: on 2 CPU cores, ``features --crop faces`` takes at most 1.5x the CPU time of ``--crop none`` per
video at 24 frames, 299² and the five TTA views, as ``make features`` runs (2 decoding workers).

    python tools/bench_faces.py [--videos 6] [--frames 24] [--repeat 1] [--faces DIR] [--json PATH]
                                [--face-config detect_size=480,detect_frames=8 ...] [--quick]

What runs: ``--videos`` shared face clips (``../shared/videos/faces`` next to the repository, or
``$ARENA_SHARED_VIDEOS/faces``, or ``--faces DIR``; the first N by name) are copied (the data check refuses links
that leave the data folder) round-robin into ``train/real``, ``train/fake`` and ``test`` of a temporary data
folder. Then `arena.features.extract_features` runs once per mode in this process, into a fresh cache each time:
``none`` (whole frames), then one row per ``--face-config``: ``faces`` for `FaceCropConfig`'s defaults (``""``,
the default), ``faces[detect_size=480, ...]`` for other settings (``--face-config "" --face-config
detect_size=480`` compares both with ``none``). With ``--repeat R`` every mode runs R times, the order reversed on every
other round, so neither mode always profits from a warm page cache; the table gives the mean. A warm-up forward of
the backbone first pays oneDNN's kernel selection, which would otherwise fall on whichever mode runs first.

CPU time: the backbone runs in this process and decoding (and face detection) in the DataLoader worker processes,
so ``time.process_time`` alone would miss the face stage. Each run is measured as the change of
``resource.getrusage(RUSAGE_SELF)`` plus that of ``RUSAGE_CHILDREN`` (user + system). The kernel adds a child's
time to ``RUSAGE_CHILDREN`` only when the child has exited and was waited for: the workers are not persistent and
are joined when the run's loader is exhausted, so each run's workers are counted in that run (and so are FFmpeg
helper processes such as ffprobe). CPU time does not grow when the machine is busy the way wall time does, but a
loaded machine still slows it somewhat (caches, frequency): the load average before and after is printed.

Prints one markdown table (mode, videos, wall s, CPU s, CPU s per video, CPU ratio over ``none``), the load
average and the machine; ``--json PATH`` writes every number. ``--quick`` is a smoke-test scale (see ``--help``).

``--breakdown`` adds where the face mode's extra time goes, per clip and face setting, measured in this process
on one thread (as a worker runs) with ``time.process_time``: the whole-frame decode of the sampled frames
(``none``), the full-resolution decode of the sampled plus detection frames (``faces``), the detection
(`FaceCropper.prepare`: decoding the detection frames again, downscaling, the detector), and tracking + cutting
the crops from the prepared detections. ``--skip-runs --breakdown`` gives the breakdown alone (minutes, not the
feature runs' tens of minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arena.clips import encode_views  # noqa: E402
from arena.faces.stage import FaceCropConfig, FaceCropper  # noqa: E402
from arena.features import extract_features  # noqa: E402
from arena.model import DEFAULT_BACKBONE, create_encoder  # noqa: E402
from arena.runtime import resolve_device  # noqa: E402
from arena.sampling import union_indices  # noqa: E402
from arena.tta import VARIANTS  # noqa: E402
from arena.video import decode_selected  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("train/real", "train/fake", "test")
#: ``--quick``: what each option is unless given (a smoke test of the script, not a measurement).
QUICK = dict(videos=2, frames="2", backbone="test_resnet", image_size=64,
             face_config=["detect_frames=4,detect_size=256"])
FULL = dict(videos=6, frames="24", backbone=DEFAULT_BACKBONE, image_size=299, face_config=[""])


def default_faces() -> Path:
    """``$ARENA_SHARED_VIDEOS/faces`` (as the tests use), else ``../shared/videos/faces`` next to the repository."""
    env = os.environ.get("ARENA_SHARED_VIDEOS")
    return (Path(env) if env else ROOT.parent / "shared" / "videos") / "faces"


def make_data(root: Path, clips: list[Path]) -> Path:
    """A data folder holding copies of ``clips``, round-robin over train/real, train/fake and test."""
    for sub in FOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips):
        shutil.copy(clip, root / FOLDERS[i % len(FOLDERS)] / clip.name)
    return root


def parse_face_config(text: str) -> FaceCropConfig:
    """``"detect_size=480,detect_frames=8"`` -> that `FaceCropConfig` (values read as JSON, else as text)."""
    settings = {}
    for pair in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--face-config {text!r}: expected KEY=VALUE pairs separated by commas, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value.strip()
    return FaceCropConfig.from_dict(settings)


def config_label(config: FaceCropConfig) -> str:
    """``faces`` for the defaults, else ``faces[detect_size=480, ...]`` with the settings that differ."""
    default = asdict(FaceCropConfig())
    diff = [f"{k}={v}" for k, v in asdict(config).items() if default[k] != v]
    return f"faces[{', '.join(diff)}]" if diff else "faces"


def cpu_seconds() -> tuple[float, float]:
    """(this process, its exited and waited-for children): user + system CPU seconds so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def warm_up(backbone: str, image_size: int, device: torch.device) -> None:
    """One forward through `encode_views` at the run's input size: oneDNN picks its kernels here, not in a run."""
    encoder = create_encoder(backbone, pretrained=False, image_size=image_size, seed=0).to(device).eval()
    views = torch.randint(0, 256, (1, 8, 3, *encoder.input_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    encode_views(encoder.to(memory_format=torch.channels_last), views, device=device)


def run_once(label: str, crop: FaceCropConfig | None, *, data: Path, cache: Path, args) -> dict:
    """One `extract_features` run; wall and CPU seconds (this process and its workers)."""
    cache.unlink(missing_ok=True)
    own0, kids0 = cpu_seconds()
    t0 = time.perf_counter()
    summary = extract_features(data=data, cache=cache, frame_counts=args.frame_counts, tta=True,
                               backbone=args.backbone, pretrained=False, image_size=args.image_size, seed=0,
                               device=args.device, workers=args.workers, crop=crop)
    wall = time.perf_counter() - t0
    own1, kids1 = cpu_seconds()
    return {"mode": label, "videos": summary.done, "failed": len(summary.failed), "no_face": len(summary.no_face),
            "frames": summary.frames, "wall_s": wall, "cpu_main_s": own1 - own0, "cpu_workers_s": kids1 - kids0,
            "cpu_s": (own1 - own0) + (kids1 - kids0)}


def _timed(fn, *args, **kwargs):
    """(result, CPU seconds of this process) of ``fn(*args, **kwargs)``."""
    t0 = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0


def clip_steps(clip: Path, config: FaceCropConfig, frame_counts: tuple[int, ...], size: tuple[int, int]) -> dict:
    """CPU seconds of the face mode's steps on one clip: its decode, detection (`FaceCropper.prepare`), crops."""
    cropper = FaceCropper(config)
    cropper.detector  # noqa: B018 - built outside the timings
    decoded, decode_s = _timed(decode_selected, clip, lambda n: np.union1d(union_indices(n, frame_counts),
                                                                           cropper.detection_indices(n)))
    failed, prepare_s = _timed(cropper.prepare, [clip])
    if failed:
        raise SystemExit(f"{clip}: {failed[str(clip)]}")
    n = decoded.num_source_frames
    crops, crop_s = _timed(cropper.crop, decoded.frames, decoded.frame_indices, union_indices(n, frame_counts), size,
                           num_source_frames=n, path=clip)
    found = cropper.detections(clip)
    height, width = decoded.frames.shape[-2:]
    return {"source": f"{width}x{height}", "decode_faces_s": decode_s, "prepare_s": prepare_s, "crop_s": crop_s,
            "detection_frames": len(found.counts), "with_face": int((found.counts > 0).sum()),
            "found": bool(crops.found)}


def breakdown(clips: list[Path], configs: list[tuple[str, FaceCropConfig]], frame_counts: tuple[int, ...],
              image_size: int) -> list[dict]:
    """CPU seconds of each step of the two modes, per clip and face setting, on one thread (see the docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    size = (image_size, image_size)
    rows = []
    try:
        for clip in clips:
            _, none_s = _timed(decode_selected, clip, partial(union_indices, frame_counts=frame_counts), size=size)
            for label, config in configs:
                rows.append({"clip": clip.name, "faces": label, "decode_none_s": none_s,
                             **clip_steps(clip, config, frame_counts, size)})
    finally:
        torch.set_num_threads(threads)
    return rows


def breakdown_table(rows: list[dict]) -> str:
    lines = ["| clip | source | faces | decode none | decode faces | detect once (prepare) | track + cut | "
             "detection frames with a face |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clip']} | {r['source']} | {r['faces']} | {r['decode_none_s']:.2f} | "
                     f"{r['decode_faces_s']:.2f} | {r['prepare_s']:.2f} | {r['crop_s']:.2f} | "
                     f"{r['with_face']}/{r['detection_frames']} |")
    return "\n".join(lines)


def summarise(runs: list[dict], modes: list[str]) -> list[dict]:
    """Mean per mode over the repeats; CPU per video and its ratio over ``none``."""
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, "videos": mine[0]["videos"], "runs": len(mine),
               **{k: statistics.fmean(r[k] for r in mine) for k in ("wall_s", "cpu_s", "cpu_main_s", "cpu_workers_s")},
               "failed": max(r["failed"] for r in mine), "no_face": max(r["no_face"] for r in mine)}
        row["cpu_s_per_video"] = row["cpu_s"] / max(1, row["videos"])
        rows.append(row)
    base = rows[0]["cpu_s_per_video"]
    for row in rows:
        row["ratio"] = row["cpu_s_per_video"] / base if base > 0 else float("nan")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | videos | wall s | CPU s (main + workers) | CPU s per video | ratio faces/none |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['videos']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} "
                     f"({r['cpu_main_s']:.1f} + {r['cpu_workers_s']:.1f}) | {r['cpu_s_per_video']:.2f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=None, help=f"shared face clips to copy (default {FULL['videos']})")
    ap.add_argument("--faces", type=Path, default=None, help="folder of face clips (default: the shared ones)")
    ap.add_argument("--frames", default=None, help="frame counts, e.g. 24 or 24,32,48 (default 24)")
    ap.add_argument("--backbone", default=None, help=f"timm model, random init (default {DEFAULT_BACKBONE})")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default 299)")
    ap.add_argument("--workers", type=int, default=2, help="decoding workers, as make features runs (default 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode, order reversed every other round")
    ap.add_argument("--face-config", action="append", default=None, metavar="KEY=VALUE,...",
                    help="a faces row with these FaceCropConfig settings, '' for the defaults (repeatable; "
                         "default: one row with the defaults)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each step of both modes per clip and face setting, on one thread (CPU s)")
    ap.add_argument("--skip-runs", action="store_true", help="only the --breakdown, not the features runs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test scale unless given: 2 videos, 2 frames, test_resnet at 64², faces with "
                         "detect_frames=4, detect_size=256")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.frame_counts = tuple(int(k) for k in args.frames.split(","))
    if args.videos < 2 or args.repeat < 1:
        ap.error("--videos must be >= 2 (one real and one fake training video) and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    faces = args.faces or default_faces()
    clips = sorted(p for p in faces.glob("*.mp4") if p.is_file())[: args.videos]
    if len(clips) < args.videos:
        raise SystemExit(f"{faces}: {len(clips)} .mp4 clips, --videos {args.videos} asked (give --faces DIR)")
    device = resolve_device(args.device)
    modes = [("none", None)] + [(config_label(c), c) for c in map(parse_face_config, args.face_config)]
    if len({label for label, _ in modes}) < len(modes):
        raise SystemExit(f"--face-config: the same settings twice in {args.face_config}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_faces_"))
    try:
        data = make_data(tmp / "data", clips)
        if not args.skip_runs:
            warm_up(args.backbone, args.image_size, device)
        load_before = os.getloadavg()
        runs = []
        for r in range(0 if args.skip_runs else args.repeat):
            for label, crop in modes if r % 2 == 0 else modes[::-1]:
                runs.append(run_once(label, crop, data=data, cache=tmp / "features.h5", args=args))
        steps = breakdown(clips, modes[1:], args.frame_counts, args.image_size) if args.breakdown else []
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = summarise(runs, [m for m, _ in modes]) if runs else []
    machine = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    settings = {"videos": [c.name for c in clips], "frame_counts": list(args.frame_counts), "backbone": args.backbone,
                "image_size": args.image_size, "views": len(VARIANTS), "workers": args.workers, "repeat": args.repeat,
                "faces": {label: None if c is None else asdict(c) for label, c in modes}}
    print(f"\n{len(clips)} face clips, frames {args.frames}, {args.backbone} (random init) at {args.image_size}², "
          f"{len(VARIANTS)} TTA views, {args.workers} workers, device {device}; mean of {args.repeat} run(s) per mode")
    print(f"machine: {machine['cpu_count']} CPUs ({machine['affinity']} usable), torch threads "
          f"{machine['torch_threads']}; load average before {load_before[0]:.2f} / {load_before[1]:.2f} / "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} "
          "(1 / 5 / 15 min)\n")
    if rows:
        print(table(rows))
    if steps:
        print("\nCPU seconds per clip on one thread (--breakdown):\n")
        print(breakdown_table(steps))
    result = {"rows": rows, "runs": runs, "breakdown": steps, "machine": machine, "settings": settings,
              "load_before": list(load_before), "load_after": list(load_after)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
