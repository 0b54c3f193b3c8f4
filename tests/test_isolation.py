"""Per-video isolation (`arena.isolation`, `arena.faults`): a decode worker that crashes, hangs or runs out of
memory costs only its video, recorded as failed with the reason, and the run completes with exit status 3; any
exception or NaN in one video's processing is that video's failure. Through the CLI with ``ARENA_FAULT_INJECT``,
small limits (``ARENA_VIDEO_TIMEOUT``, ``ARENA_WORKER_MEMORY_MB``) and the tiny world of `_world`."""

from __future__ import annotations

import csv
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _world import BACKBONE, FRAMES, IMAGE_SIZE, World, build_world
from click.testing import CliRunner

from arena import features as features_module
from arena.cache import FeatureCache
from arena.cli import main
from arena.clips import ClipViews
from arena.errors import OptionError
from arena.faults import fault_plan
from arena.isolation import ClipLoader, isolated, worker_limits

TRAIN_VIDEO, TEST_VIDEO = "real_0002.mp4", "test_0002.mp4"
FEATURES = ["--frames", str(FRAMES), "--backbone", BACKBONE, "--no-pretrained", "--image-size", str(IMAGE_SIZE),
            "--device", "cpu", "--workers", "2"]
REASONS = {"crash": "decoder crashed (signal 11, SIGSEGV)",
           "hang": "timed out after 3 s (the per-video limit, ARENA_VIDEO_TIMEOUT)",
           "oom": "exceeded the memory limit of 200 MB (ARENA_WORKER_MEMORY_MB)"}
LIMITS = {"ARENA_VIDEO_TIMEOUT": "3", "ARENA_WORKER_MEMORY_MB": "200"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def cli(args: list[str], fault: str | None = None):
    env = {**LIMITS, "ARENA_FAULT_INJECT": fault or ""}
    if fault and fault.startswith("oom:"):  # a loaded machine may take seconds to fill 200 MB: only memory may stop it
        env["ARENA_VIDEO_TIMEOUT"] = "120"
    return CliRunner().invoke(main, args, env=env)


def _read(path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["filename"]: r for r in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize("kind", ["crash", "hang", "oom"])
def test_features_records_the_faulty_video_and_completes_the_rest(world, tmp_path, kind):
    cache = tmp_path / "f.h5"
    args = ["features", "--data", str(world.data), "--cache", str(cache), *FEATURES]
    t0 = time.monotonic()
    res = cli(args, f"{kind}:{TRAIN_VIDEO}")
    assert res.exit_code == 3, res.output
    key = f"train/real/{TRAIN_VIDEO}"
    assert f"failed {key}: {REASONS[kind]}" in res.output, res.output[-600:]
    with FeatureCache.open(cache) as c:
        assert c.failures() == {key: REASONS[kind]}
        assert len(c.keys) == 7  # every other video of the 4 train + 4 test is done
    # A failed video stays failed (the cache's rule): the rerun does not try it again, so no fault fires.
    res = cli(args, f"{kind}:{TRAIN_VIDEO}")
    assert res.exit_code == 0, res.output
    assert "skipped (already cached) 8, failed 0" in res.output
    print(f"{kind}: both runs {time.monotonic() - t0:.1f} s")


def test_bad_fault_switch_and_limits_are_refused_before_any_decode(world, tmp_path):
    args = ["features", "--data", str(world.data), "--cache", str(tmp_path / "f.h5"), *FEATURES]
    res = cli(args, "explode:x.mp4")
    assert res.exit_code == 1 and "ARENA_FAULT_INJECT: 'explode:x.mp4' is not KIND:NAME" in res.output
    res = CliRunner().invoke(main, args, env={"ARENA_VIDEO_TIMEOUT": "soon"})
    assert res.exit_code == 1 and "ARENA_VIDEO_TIMEOUT='soon': give a positive number" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(OptionError, match="NAME a video's file name"):
        fault_plan("crash:train/real/x.mp4")
    assert fault_plan(" crash:a.mp4, hang:b.mp4 ,oom:c.mp4") == {"a.mp4": "crash", "b.mp4": "hang", "c.mp4": "oom"}


# ------------------------------------------------------------------------------------------------ full-video path


@pytest.mark.parametrize("command", ["submit", "evaluate"])
def test_submit_and_evaluate_give_the_crashed_video_the_row_of_an_undecodable_one(world, tmp_path, command):
    out = tmp_path / ("P.CSV" if command == "submit" else "evaluation.json")
    args = [command, "--data", str(world.data), "--models", str(world.models), "--out", str(out), "--workers", "2",
            "--device", "cpu"]
    if command == "evaluate":
        args += ["--labels", str(world.data / "test_labels.csv")]
    res = cli(args, f"crash:{TEST_VIDEO}")
    assert res.exit_code == 3, res.output
    key = f"test/{TEST_VIDEO}"
    if command == "submit":
        rows, detail = _read(out), _read(tmp_path / "predictions_detail.csv")
        assert len(rows) == 4 and rows[key]["probability"] == "0.500000"
        assert detail[key]["fallback"] == "0.5 (decode failed)" and detail[key]["status"] == "failed"
        assert detail[key]["error"] == REASONS["crash"]
        assert all(d["status"] == "ok" for k, d in detail.items() if k != key)
    else:
        doc = json.loads(out.read_text())
        assert doc["failed"] == {key: REASONS["crash"]} and doc["n"] == 4


# ------------------------------------------------------------------------------------------------ train-full


def test_train_full_skips_the_hung_video_and_finishes(world, tmp_path):
    models = tmp_path / "m"
    res = cli(["train-full", "--data", str(world.data), "--models", str(models), "--backbone", BACKBONE,
               "--no-pretrained", "--image-size", "32", "--frames", "4", "--epochs", "1", "--workers", "1",
               "--accum-steps", "1", "--batch-size", "1", "--device", "cpu", "--limit-val", "2"],
              f"hang:{TRAIN_VIDEO}")
    assert res.exit_code == 3, res.output
    assert f"train/real/{TRAIN_VIDEO}" in res.output and REASONS["hang"] in res.output
    assert (models / f"{BACKBONE}_best.pt").exists()


# ------------------------------------------------------------------------------------------------ units


class _Flaky:
    """A dataset whose item 1 raises, as a damaged frame does."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> str:
        if i == 1:
            raise ValueError("damaged frame 7")
        return f"ok {i}"

    def failed(self, i: int, reason: str) -> str:
        return f"failed {i}: {reason}"


class _Dies:
    """A dataset whose worker exits on video 1, noting each try in ``log``."""

    def __init__(self, log) -> None:
        self.log = log

    def __len__(self) -> int:
        return 3

    def __getitem__(self, key: tuple[int, int]) -> int:
        if key[1] == 1:
            with open(self.log, "a") as f:
                f.write("x")
            os._exit(7)
        return key[1]

    def failed(self, key: tuple[int, int], reason: str) -> str:
        return f"failed {key[1]}: {reason}"


class _Epochs:
    """The keys of one epoch, as `arena.distributed.EpochSampler` gives them."""

    epoch = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(3)])

    def __len__(self) -> int:
        return 3


def test_training_batches_skip_a_lost_video_for_the_rest_of_the_run(tmp_path):
    sampler = _Epochs()
    loader = ClipLoader(_Dies(tmp_path / "tries"), sampler, batch_size=2, collate=list, workers=1)
    assert len(loader) == 2
    for epoch in range(2):
        sampler.epoch = epoch
        assert list(loader) == [[0, "failed 1: decode worker exited with status 7"], [2]]
    assert (tmp_path / "tries").read_text() == "x"  # tried in the first epoch only


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_one_video_is_that_videos_failure(workers):
    got = list(isolated(_Flaky(), range(3), workers=workers))
    assert got == ["ok 0", "failed 1: ValueError: damaged frame 7", "ok 2"]  # in order, the others untouched


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ARENA_VIDEO_TIMEOUT", "7.5")
    monkeypatch.setenv("ARENA_WORKER_MEMORY_MB", "300")
    limits = worker_limits(4)
    assert (limits.seconds, limits.memory_mb) == (7.5, 300)


def test_a_nan_feature_fails_its_video_and_the_run_goes_on(world, tmp_path, monkeypatch):
    real = features_module.create_encoder
    calls = []

    def nan_on_third(*args, **kwargs):
        enc = real(*args, **kwargs)
        forward = enc.forward

        def patched(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            y = forward(x)
            return y * float("nan") if len(calls) == 3 else y
        enc.forward = patched
        return enc

    monkeypatch.setattr(features_module, "create_encoder", nan_on_third)
    summary = features_module.extract_features(data=world.data, cache=tmp_path / "f.h5", frame_counts=(FRAMES,),
                                               backbone=BACKBONE, pretrained=False, image_size=IMAGE_SIZE,
                                               device="cpu", workers=0)
    assert summary.done == 7 and list(summary.failed.values()) == [
        "ValueError: the backbone gave non-finite features (NaN or inf)"]
    with FeatureCache.open(tmp_path / "f.h5") as c:
        assert c.failures() == summary.failed
        key = next(iter(summary.failed))
        assert all(np.isfinite(c.features(k, FRAMES, "original")[0]).all() for k in c.keys if k != key)


def test_clip_views_of_a_failed_video_keep_key_label_and_index(world):
    from arena.clips import ClipDataset

    item = SimpleNamespace(key="k.mp4", path=world.data / "nope.mp4", label=1)
    clip = ClipDataset([item], size=(32, 32), frames=4).failed((3, 0), "why")
    assert isinstance(clip, ClipViews) and (clip.key, clip.label, clip.index, clip.status) == ("k.mp4", 1, 0, "failed")
    assert clip.views is None and clip.message == "why"
