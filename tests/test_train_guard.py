"""The thermal pause's maximum wait and the ranks' agreement under DDP, on CPU with fake GPU sensors.

A pause that outlasts ``--thermal-max-wait`` stops train-full the way an interrupted run stops (``last.pt`` keeps
the last finished epoch, the same command continues, exit status 75); under DDP a pause, an out-of-memory retry
and that stop happen on every rank together even when only one rank's card is hot or short of memory.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _layout import write_dataset

from arena.errors import OptionError, ThermalTimeout, TrainError
from arena.hardware import GpuGuard
from arena.train import train
from arena.train_config import TrainConfig

SIZE = 32
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """8 real + 8 fake videos of 6 frames at 32 px (the runs below use 4 of the training part and 2 validation)."""
    rng = np.random.default_rng(0)

    def clip(fake: bool) -> np.ndarray:
        frames = rng.normal(110, 12, size=(6, SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
        if fake:
            y, x = rng.integers(4, SIZE - 16, size=2)
            frames[:, y:y + 12, x:x + 12] = 235
        return frames

    train_videos = ((f"train/{c}/{c}_{i}.mp4", label, clip(bool(label)))
                    for label, c in ((0, "real"), (1, "fake")) for i in range(8))
    return write_dataset(tmp_path_factory.mktemp("toy"), train_videos)


def tiny_config(data: Path, models: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), models=str(models), backbone="test_resnet", pretrained=False, image_size=SIZE,
                frames=4, epochs=2, batch_size=2, accum_steps=1, lr=2e-3, workers=0, seed=3, limit_train=4,
                limit_val=2)
    return TrainConfig(**{**base, **kw})


def test_a_pause_past_the_max_wait_stops_with_last_pt_and_the_same_command_resumes(toy_data, tmp_path):
    # The card is cool in epoch 1 and stays at 85 °C from epoch 2 on; the fake clock says one second per reading.
    epoch = {"now": 1}
    seconds = itertools.count()
    messages: list[str] = []
    hot_later = GpuGuard(read_temp=lambda: 40.0 if epoch["now"] == 1 else 85.0, read_mem=lambda: (1, 100),
                         sleep=lambda s: None, clock=lambda: float(next(seconds)), max_wait_s=30,
                         log=messages.append)
    with pytest.raises(ThermalTimeout) as stop:
        train(tiny_config(toy_data, tmp_path, thermal_max_wait_s=30), guard=hot_later,
              on_epoch_end=lambda e, row: epoch.update(now=e + 1))
    text = str(stop.value)
    assert "the GPU is still at 85 °C after a thermal pause of 30 s" in text
    assert "pause at 78 °C, resume at 72 °C, --thermal-max-wait 30 s" in text
    assert "raise --thermal-max-wait (none waits without limit)" in text
    assert f"{tmp_path / 'last.pt'} holds epoch 1; the same command continues from it (epoch 2 is redone)" in text
    assert stop.value.exit_status == 75
    assert any("pausing until it cools to 72" in m for m in messages)
    assert text in (tmp_path / "train.log").read_text()
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and not last["finished"]

    # The same command once the machine has cooled (a changed --thermal-max-wait is allowed): continues after epoch 1.
    cool = GpuGuard(read_temp=lambda: 40.0, read_mem=lambda: (1, 100), log=lambda m: None)
    again = train(tiny_config(toy_data, tmp_path, thermal_max_wait_s=None), guard=cool)
    assert (again.resumed_from, again.epochs_run, again.stop_reason) == (1, 2, "max_epochs")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["finished"]


def test_the_command_exits_75_with_the_message_and_reads_none_as_no_limit(toy_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import arena.train as train_mod
    from arena.cli import main

    seen = []

    def stopped(cfg):
        seen.append(cfg)
        raise ThermalTimeout("the GPU is still at 90 °C after a thermal pause of 1800 s (...). Training stopped: ...")

    monkeypatch.setattr(train_mod, "train", stopped)
    args = ["train-full", "--data", str(toy_data), "--models", str(tmp_path), "--backbone", "test_resnet",
            "--no-pretrained", "--image-size", str(SIZE)]
    result = CliRunner().invoke(main, [*args, "--thermal-max-wait", "none"])
    assert result.exit_code == 75, result.output
    assert "Error: the GPU is still at 90 °C after a thermal pause of 1800 s" in result.output
    assert seen[0].thermal_max_wait_s is None
    result = CliRunner().invoke(main, args)
    assert seen[1].thermal_max_wait_s == 1800.0  # the default
    result = CliRunner().invoke(main, [*args, "--thermal-max-wait", "-5"])
    assert result.exit_code == 2 and "neither a number of seconds >= 0 nor none" in result.output
    with pytest.raises(OptionError, match=r"--thermal-max-wait must be >= 0 seconds \(or none: no limit\), got -1"):
        TrainConfig(data="d", thermal_max_wait_s=-1)


def test_ddp_ranks_pause_retry_and_stop_together_when_only_rank_1_is_hot_or_short_of_memory(toy_data, tmp_path):
    # tests/_guard_ddp.py: rank 1 alone is hot (epoch 1, cools; epoch 2, never cools) and runs out of memory once.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_guard_ddp.py"), str(toy_data), str(tmp_path / "m"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)  # ~25 s; a hang (one rank in a collective alone) fails here
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail("the two processes hung")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # Epoch 1 finished on both: both paused once (rank 0's card was cool) and both retried the step at 2 frames.
        assert [row["epoch"] for row in r["rows"]] == [1] and r["rows"][0]["frames"] == 2, r
        assert any("retrying with frames=2" in m for m in r["messages"]), r["messages"]
        # Epoch 2: both paused again and both stopped at the maximum wait, with last.pt at epoch 1.
        assert len(r["pauses"]) == 2 and r["pauses"][1] >= 0.5, r["pauses"]
        assert "still at 90 °C" in r["error"] and "holds epoch 1" in r["error"], r["error"]
    assert any("another process's GPU reached the pause threshold" in m for m in ranks[0]["messages"])
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    summary = json.loads((tmp_path / "m" / "training_summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["gpu_guard"]["pauses"] == 1
    assert [e["frames"] for e in summary["out_of_memory_events"]] == [4]  # rank 0 wrote the agreed retry
    last = torch.load(tmp_path / "m" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and not last["finished"]


def test_out_of_memory_in_the_backward_that_all_reduces_is_a_clear_error_not_a_retry():
    # Under DDP the other ranks are inside that all-reduce: a retry would hang them, so the rank stops (torchrun then
    # ends the others) with a message saying what to change.
    from arena.distributed import Dist
    from arena.hardware import is_oom
    from arena.train import StepContext, _synced_backward

    class OutOfMemoryInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    loss = OutOfMemoryInBackward.apply(torch.ones(3, requires_grad=True)).sum()
    ctx = StepContext(device=torch.device("cpu"), amp_dtype=None, scaler=torch.amp.GradScaler("cpu", enabled=False),
                      guard=GpuGuard(read_temp=lambda: 40.0, log=lambda m: None), dist=Dist(rank=1, world=2),
                      frames=24, min_frames=4)
    with pytest.raises(TrainError, match=r"process 1 of 2 .* at 24 frames in the backward pass that all-reduces the "
                                         r"gradients.*--grad-checkpointing") as err:
        _synced_backward(loss, ctx, 24)
    assert not is_oom(err.value)  # so run_with_oom_fallback passes it on instead of retrying
