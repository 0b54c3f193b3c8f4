"""Run by tests/test_train_guard.py under torchrun (two gloo processes): train-full where only rank 1's GPU sensor
runs hot and only rank 1 runs out of memory.

Epoch 1: rank 1's card is hot at its first check and cools two polls later; its second training forward runs out
of memory at 4 frames. Epoch 2: rank 1's card stays hot, so the pause reaches its maximum wait. Each rank writes
what it saw to ``OUT/rank<r>.json``; a rank stopped by the timeout exits with ThermalTimeout's status (75).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_guard_ddp.py DATA MODELS OUT
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import arena.train as train_mod
from arena.errors import ThermalTimeout
from arena.hardware import GpuGuard
from arena.train_config import TrainConfig


def main(data: str, models: str, out: str) -> int:
    rank = int(os.environ["RANK"])
    state = {"epoch": 1, "reads": 0, "forwards": 0}
    seen: dict = {"rank": rank, "rows": [], "messages": [], "error": None}

    def read_temp() -> float:
        state["reads"] += 1
        if rank == 0:
            return 40.0
        if state["epoch"] >= 2:
            return 90.0  # never cools
        return {1: 85.0, 2: 80.0}.get(state["reads"], 60.0)

    real_build = train_mod.build_model

    def build_with_small_memory(cfg, tuned):
        model = real_build(cfg, tuned)
        forward = model.forward

        def limited(frames, mask=None):
            if model.training:
                state["forwards"] += 1
                if rank == 1 and state["forwards"] == 2 and frames.shape[1] > 2:
                    raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes")
            return forward(frames, mask)

        model.forward = limited
        return model

    train_mod.build_model = build_with_small_memory

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen["messages"].append(record.getMessage())

    logging.getLogger("arena").addHandler(Collect())
    logging.getLogger("arena").setLevel(logging.INFO)
    guard = GpuGuard(read_temp=read_temp, read_mem=lambda: (1, 100), poll_seconds=0.05, max_wait_s=0.5,
                     log=seen["messages"].append)

    def on_epoch_end(epoch: int, row: dict) -> None:
        seen["rows"].append(row)
        state["epoch"] = epoch + 1

    cfg = TrainConfig(data=data, models=models, backbone="test_resnet", pretrained=False, image_size=32, frames=4,
                      min_frames=2, epochs=2, batch_size=1, accum_steps=2, lr=2e-3, workers=0, seed=3, device="cpu",
                      limit_train=4, limit_val=2)
    status = 0
    try:
        train_mod.train(cfg, guard=guard, on_epoch_end=on_epoch_end)
    except ThermalTimeout as exc:
        seen["error"], status = str(exc), exc.exit_status
    seen["pauses"] = [p.seconds for p in guard.pauses]
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
