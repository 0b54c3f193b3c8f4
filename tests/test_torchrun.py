"""`features` and `submit` under torchrun: two gloo processes on the CPU give the one-process cache and CSV, byte for
byte; a rank that dies brings the run down (no hang) and a rerun resumes from the shard files."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _world import BACKBONE, FRAMES, IMAGE_SIZE, World, build_world
from click.testing import CliRunner

from arena.cache import CacheWriter, FeatureCache, absorb_shards, shard_path
from arena.cli import main
from arena.distributed import setup_distributed
from arena.errors import OptionError
from arena.features import extract_features
from arena.submit import make_submission

FEATURE_ARGS = ["--backbone", BACKBONE, "--no-pretrained", "--image-size", str(IMAGE_SIZE), "--frames", str(FRAMES),
                "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def _features(world: World, cache: Path, **kw):
    """In this process, with one thread as torchrun gives each worker (the same kernels: the same bytes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_features(data=world.data, cache=cache, frame_counts=(FRAMES,), backbone=BACKBONE,
                                pretrained=False, image_size=IMAGE_SIZE, seed=0, device="cpu", workers=0, **kw)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(world: World, tmp_path_factory) -> Path:
    """The one-process cache."""
    cache = tmp_path_factory.mktemp("one_process") / "features.h5"
    _features(world, cache)
    return cache


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "arena",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_dead_rank_stops_the_run_and_the_rerun_resumes_to_the_one_process_bytes(world, reference, tmp_path):
    cache = tmp_path / "features.h5"
    _features(world, cache, shard=(1, 2), limit=1)  # rank 1 of an earlier run died after one video
    _features(world, cache, shard=(2, 3), limit=1)  # and a run with three processes left one too
    # Rank 0 cannot start (another process holds its shard): the run must end, not hang, and merge nothing.
    holder = CacheWriter(cache, FeatureCache.open(reference).provenance, shard=(0, 2))
    try:
        failed = _torchrun("features", "--data", str(world.data), "--cache", str(cache), *FEATURE_ARGS)
    finally:
        holder.abandon()
    assert failed.returncode != 0 and "being written by another process" in failed.stderr
    assert not cache.exists() and shard_path(cache, 1, 2).exists()

    run = _torchrun("features", "--data", str(world.data), "--cache", str(cache), *FEATURE_ARGS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert filecmp.cmp(cache, reference, shallow=False)
    # shards merged and removed; beside the cache only its lock and the runs' records (rank 0 writes them)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5", "features.h5.lock", "features.h5.runs"]
    lines = [line for line in run.stdout.splitlines() if line.startswith("done ")]
    assert len(lines) == 1 and "(2 processes)" in lines[0]  # rank 0 reports the whole run, once
    done, skipped = map(int, re.match(r"done (\d+) .*skipped \(already cached\) (\d+)", lines[0]).groups())
    assert done + skipped == 8 and skipped >= 2  # the shards' videos were not computed again


def test_the_merge_is_safe_to_rerun_after_a_crash_and_leaves_a_complete_cache_untouched(world, reference, tmp_path):
    cache = tmp_path / "features.h5"
    for i in range(2):
        _features(world, cache, shard=(i, 2))
    shards = [shard_path(cache, i, 2) for i in range(2)]
    kept = tmp_path / "kept"
    kept.mkdir()
    for s in shards:
        shutil.copy(s, kept / s.name)
    absorb_shards(cache, shards)
    assert filecmp.cmp(cache, reference, shallow=False) and not any(s.exists() for s in shards)
    for s in shards:  # killed after the rename, before the shards were deleted
        shutil.copy(kept / s.name, s)
    stamp = cache.stat().st_mtime_ns
    absorb_shards(cache, shards)
    assert filecmp.cmp(cache, reference, shallow=False) and not any(s.exists() for s in shards)
    assert cache.stat().st_mtime_ns == stamp  # nothing to add: not rewritten


def test_shard_under_torchrun_is_refused(world, monkeypatch, tmp_path):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(OptionError, match=r"--shard 1/2 under torchrun \(WORLD_SIZE=2\).*Drop --shard"):
        extract_features(data=world.data, cache=tmp_path / "f.h5", shard=(1, 2), device="cpu")
    assert not list(tmp_path.iterdir())


def test_more_processes_than_gpus_and_evaluate_under_torchrun_are_refused(world, monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(OptionError, match=r"2 processes on this machine, but 1 GPU\(s\) .*--nproc-per-node 1"):
        setup_distributed(torch.device("cuda"))
    res = CliRunner().invoke(main, ["evaluate", "--data", str(world.data), "--models", str(world.models)])
    assert res.exit_code == 1 and "arena evaluate runs in one process" in res.output


def test_two_ranks_write_the_one_process_submission(world, tmp_path):
    # An ensemble of a head and a fine-tuned model, verified: every member's predictions and the fine-tuned one's
    # features travel to rank 0.
    models = [world.models, world.models_ft]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_submission(data=world.data, models=models, out=tmp_path / "one" / "P.CSV", verify=world.cache,
                        workers=0, device="cpu", progress=False, echo=None)
    finally:
        torch.set_num_threads(before)
    run = _torchrun("submit", "--data", str(world.data), *(a for m in models for a in ("--models", str(m))),
                    "--verify", str(world.cache), "--out", str(tmp_path / "two" / "P.CSV"), "--device", "cpu",
                    "--workers", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("P.CSV", "predictions_detail.csv"):
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False), name
    assert run.stdout.count("wrote ") == 1 and "2 processes (torchrun) predicted a share each" in run.stdout
    assert run.stdout.count("verify (fine-tuned backbone)") == 1
