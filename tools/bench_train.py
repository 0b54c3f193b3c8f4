"""Seconds per training video and peak memory of `arena train-full`'s training step at the seed's settings.

Runs the real training step (arena.train.train_one_epoch: autocast, loss, backward, GradScaler, AdamW) on random
uint8 clips, so decoding is not timed (it runs in DataLoader workers, in parallel with the step).
Defaults are the seed's: inception_resnet_v2 (random init), 299 x 299, 24 frames, batch 1, AMP.

    python tools/bench_train.py                       # CPU or the visible GPU
    python tools/bench_train.py --grad-checkpointing  # the 4 GB-card setting
    python tools/bench_train.py --image-size 112 --frames 4 --batch-size 8

Prints one JSON line with the numbers (and the device that gave them). On a shared CPU, trust
cpu_seconds_per_video more than the wall-clock seconds_per_video.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="inception_resnet_v2.tf_in1k")
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--accum-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16", "off"], default="auto",
                    help="precision, arena.runtime's policy (auto: bf16 where native, else fp16 on CUDA / fp32)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()

    from arena.distributed import Dist
    from arena.hardware import GpuGuard
    from arena.runtime import autocast_dtype, needs_grad_scaler, precision_name, resolve_device
    from arena.train import StepContext, train_one_epoch
    from arena.train_config import TrainConfig
    from arena.train_data import ClipBatch
    from arena.train_model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = TrainConfig(data=".", backbone=args.backbone, pretrained=False, image_size=args.image_size,
                      frames=args.frames, batch_size=args.batch_size, accum_steps=args.accum_steps,
                      grad_checkpointing=args.grad_checkpointing, amp=args.amp, device=args.device)
    model = build_model(cfg, None).to(device)
    if device.type == "cuda":
        model.encoder.to_channels_last()
    amp = autocast_dtype(device, args.amp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp))
    guard = GpuGuard(read_temp=lambda: None, read_mem=lambda: None, log=lambda m: None)
    ctx = StepContext(device=device, amp_dtype=amp, scaler=scaler, guard=guard, dist=Dist(), frames=args.frames,
                      min_frames=min(4, args.frames))

    h, w = model.encoder.input_size
    gen = torch.Generator().manual_seed(0)

    def batches(n: int) -> list[ClipBatch]:
        return [ClipBatch(
            frames=torch.randint(0, 256, (args.batch_size, args.frames, 3, h, w), dtype=torch.uint8, generator=gen),
            valid=torch.ones(args.batch_size, args.frames, dtype=torch.bool),
            label=torch.arange(args.batch_size) % 2, index=torch.arange(args.batch_size) + 100 * i,
            ok=torch.ones(args.batch_size, dtype=torch.bool), key=[f"v{i}_{j}" for j in range(args.batch_size)],
            message=[""] * args.batch_size) for i in range(n)]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_one_epoch(model, batches(args.warmup), optimizer, ctx, epoch=0, accum_steps=args.accum_steps, show=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = train_one_epoch(model, batches(args.steps), optimizer, ctx, epoch=1, accum_steps=args.accum_steps,
                          show=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    videos = args.steps * args.batch_size
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "frames": args.frames,
        "batch_size": args.batch_size, "accum_steps": args.accum_steps, "amp": precision_name(amp),
        "grad_checkpointing": args.grad_checkpointing, "steps": args.steps,
        "seconds_per_video": round(seconds / videos, 4), "seconds_per_frame": round(seconds / videos / args.frames, 5),
        "cpu_seconds_per_video": round(cpu / videos, 4),  # steadier than wall time on a shared machine
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "oom_events": len(ctx.oom_events), "frames_after_oom": ctx.frames, "train_loss": out["loss"],
    }
    if device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    print(json.dumps(result))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
