#!/usr/bin/env python
"""The Python half of tools/gpu_check.sh: every GPU figure issue 7 asks for, in one run, written as JSON.

    python tools/gpu_check.py --out $OUT --device cuda            # on the GPU machine (gpu_check.sh calls this)
    python tools/gpu_check.py --out /tmp/gc --device cpu --tiny   # the same code path on CPU, seconds-scale

Steps (each guarded: one failing step is recorded and the others still run; results land in OUT/gpu_check.json):
  nvml      pynvml temperature and memory actually read (arena.hardware.nvml_readers), before and after
  data      a small competition-like set (640x360, 10 s, 30 fps, crf 26) from arena.demo.generate_dataset
  decode    24 frames -> 299² per video: decode_uniform(device="cuda") (NVDEC) vs device="cpu"
  features  tools/bench_features.py: arena (fp16 + channels_last, workers) vs naive vs bare backbone (pipeline/bare)
  train     tools/bench_train.py at the seed's settings (299², 24 frames, batch 1): s/video, cuda max allocated
  submit    tools/bench_submit.py with 5-variant TTA, 24 frames: videos/s -> seconds for 200 videos
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nvml_reading() -> dict:
    from arena.hardware import nvml_readers

    readers = nvml_readers(0)
    if isinstance(readers, str):
        return {"error": readers}
    temp, mem = readers
    return {"temperature_c": temp(), "memory": mem()}


def step_data(args) -> dict:
    from arena.demo import generate_dataset

    if args.data_from:  # carried videos: the GPU image has no FFmpeg CLI to encode with
        from arena.data import load_dataset

        args.data = Path(args.data_from)
        if args.replicate > 1:  # more videos than fit in one call's carry: the carried ones, hard-linked N times
            args.data = replicate_dataset(args.data, Path(args.work) / "replicated", args.replicate)
        ds = load_dataset(args.data)
        return {"carried": str(args.data_from), "replicate": args.replicate, "train": len(ds.train),
                "test": len(ds.test)}
    out = Path(args.work) / "data"
    if args.tiny:
        s = generate_dataset(out, n_train_real=2, n_train_fake=2, n_test=2, seconds=1.0, size=(64, 96), fps=10.0,
                             seed=0, overwrite=True, progress=False)
    else:
        s = generate_dataset(out, preset="competition", n_train_real=args.n_train, n_train_fake=args.n_train,
                             n_test=args.n_test, seed=0, overwrite=True, progress=False)
    args.data = out
    return {k: v for k, v in s.items() if k != "config"}


def replicate_dataset(src: Path, out: Path, times: int) -> Path:
    """A dataset whose every video is one of ``src``'s under ``times`` distinct names (hard links, else copies)."""
    import shutil

    from arena.data import load_dataset

    ds = load_dataset(src)
    shutil.rmtree(out, ignore_errors=True)
    rows, test_rows = ["filename,label"], ["filename"]
    for r in range(times):
        for it in ds.train:
            cls = "fake" if it.label else "real"
            name = f"r{r}_{it.path.name}"
            dst = out / "train" / cls / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(it.path, dst)
            except OSError:
                shutil.copy2(it.path, dst)
            rows.append(f"{name},{it.label}")
        for it in ds.test:
            name = f"r{r}_{it.path.name}"
            dst = out / "test" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(it.path, dst)
            except OSError:
                shutil.copy2(it.path, dst)
            test_rows.append(name)
    (out / "train_labels.csv").write_text("\n".join(rows) + "\n")
    (out / "test_public.csv").write_text("\n".join(test_rows) + "\n")
    return out


def step_decode(args) -> dict:
    import statistics

    import torch

    from arena.data import load_dataset
    from arena.video import decode_uniform

    items = list(load_dataset(args.data).test)[: args.decode_videos]
    res = {}
    for dev in (["cuda", "cpu"] if args.device == "cuda" else ["cpu"]):
        decode_uniform(items[0].path, 24, size=(299, 299), device=dev)  # warm-up (NVDEC context, page cache)
        walls, notes = [], set()
        for it in items:
            t0 = time.perf_counter()
            clip = decode_uniform(it.path, 24, size=(299, 299), device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            notes.add(f"{clip.decoder}: {clip.message}"[:200])
        res[dev] = {"median_s_per_video": statistics.median(walls), "videos": len(walls),
                    "frame_device": str(clip.frames.device), "notes": sorted(notes)[:5]}
    if "cuda" in res:
        res["nvdec_over_cpu"] = res["cuda"]["median_s_per_video"] / res["cpu"]["median_s_per_video"]
    return res


def _tool(args, name: str, extra: list[str], tag: str | None = None) -> dict:
    out = Path(args.out) / f"{tag or name}.json"
    cmd = [sys.executable, str(ROOT / "tools" / f"bench_{name}.py"), *extra, "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout)
    (Path(args.out) / f"{tag or name}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
    return json.loads(out.read_text()) | {"step_wall_s": time.perf_counter() - t0}


def step_features(args) -> dict:
    if args.tiny:
        extra = ["--videos", "2", "--image-size", "75", "--frames", "4", "--workers", "0", "--frame-batch", "8",
                 "--backbone", "resnet18"]
    else:
        extra = ["--videos", str(2 * args.n_train), "--frames", "24,32,48", "--workers", str(args.workers),
                 "--frame-batch", "120"]
    r = _tool(args, "features", [*extra, "--device", args.device, "--data", str(args.data), "--out", args.work])
    r["pipeline_over_bare"] = r["arena_fps"] / r["bare_fps"]
    r["arena_over_naive"] = r["arena_fps"] / r["naive_fps"]
    return r


def step_train(args) -> dict:
    extra = (["--image-size", "75", "--frames", "2", "--steps", "1", "--accum-steps", "1", "--backbone", "resnet18"]
             if args.tiny else ["--steps", str(args.train_steps), "--warmup", "2"])
    r = _tool(args, "train", [*extra, "--device", args.device])
    r["epoch_600_videos_s"] = 600 * 0.7 * r["seconds_per_video"]  # the split trains on 70 %
    if not args.tiny:  # the 4 GB-card setting: activations recomputed in the backward pass
        try:
            gc = _tool(args, "train", [*extra, "--device", args.device, "--grad-checkpointing"], tag="train_gc")
            r["grad_checkpointing"] = {k: gc.get(k) for k in ("seconds_per_video", "cuda_max_allocated_gib")}
        except Exception as exc:  # noqa: BLE001
            r["grad_checkpointing"] = {"error": repr(exc)[-800:]}
    return r


def step_submit(args) -> dict:
    extra = (["--videos", "1", "--frames", "2", "--image-size", "75", "--seconds", "1", "--fps", "8",
              "--video-size", "96x64", "--workers", "1", "--backbone", "resnet18", "--frame-batch", "8"]
             if args.tiny else ["--videos", str(args.submit_videos), "--frames", "24", "--seconds", "10", "--fps", "30",
                                "--workers", str(args.workers), "--frame-batch", "120", "--data", str(args.data)])
    r = _tool(args, "submit", [*extra, "--device", args.device])
    best = max(r["runs"].values(), key=lambda x: x["videos_per_s"])
    r["seconds_for_200_videos"] = 200 / best["videos_per_s"]
    return r


STEPS = {"data": step_data, "decode": step_decode, "features": step_features, "train": step_train,
         "submit": step_submit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="scratch folder (default: OUT/../gpu_check_work or /tmp)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--n-train", type=int, default=8, help="train videos per class to generate")
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--decode-videos", type=int, default=8)
    ap.add_argument("--submit-videos", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--step-timeout", type=float, default=240)
    ap.add_argument("--data-from", default=None, help="an existing dataset to use instead of generating one")
    ap.add_argument("--replicate", type=int, default=1, help="with --data-from: use each video this many times")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work or "/tmp/gpu_check_work"
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.data = Path(args.work) / "data"
    import torch

    result: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "device": args.device, "cpus": os.cpu_count(), "tiny": args.tiny,
                    "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""), "steps": {}}
    try:
        result["nvml_before"] = nvml_reading()
    except Exception as exc:  # noqa: BLE001 - a missing pynvml is a finding, not a crash
        result["nvml_before"] = {"error": repr(exc)}
    out_json = Path(args.out) / "gpu_check.json"
    for name in [s for s in args.steps.split(",") if s]:
        t0 = time.perf_counter()
        try:
            r = STEPS[name](args)
            result["steps"][name] = {"ok": True, "wall_s": time.perf_counter() - t0, **r}
        except Exception as exc:  # noqa: BLE001 - record and go on: one device call must return every figure it can
            result["steps"][name] = {"ok": False, "wall_s": time.perf_counter() - t0, "error": repr(exc)[-1500:],
                                     "trace": traceback.format_exc()[-3000:]}
        print(f"[{name}] {'ok' if result['steps'][name]['ok'] else 'FAILED'} "
              f"{result['steps'][name]['wall_s']:.1f} s", flush=True)
        out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")  # partial results survive a kill
    try:
        result["nvml_after"] = nvml_reading()
        if args.device == "cuda":
            result["cuda_max_allocated_gib_this_process"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as exc:  # noqa: BLE001
        result["nvml_after"] = {"error": repr(exc)}
    s = result["steps"]
    result["targets"] = {
        "train_cuda_max_allocated_le_3.5GB": s.get("train", {}).get("cuda_max_allocated_gib"),
        "train_grad_checkpointing": s.get("train", {}).get("grad_checkpointing"),
        "submit_200_videos_le_45s": s.get("submit", {}).get("seconds_for_200_videos"),
        "train_epoch_600_videos_s": s.get("train", {}).get("epoch_600_videos_s"),
        "pipeline_over_bare_ge_0.9": s.get("features", {}).get("pipeline_over_bare"),
        "nvdec_over_cpu_decode": s.get("decode", {}).get("nvdec_over_cpu"),
    }
    out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result["targets"], indent=1))
    return 0 if all(v.get("ok") for v in s.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
