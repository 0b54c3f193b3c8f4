"""`arena.distributed`: the (epoch, index) sampler and each process's device under torchrun (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from arena.distributed import Dist, EpochSampler, all_max, gather, setup_distributed
from arena.errors import OptionError


def test_balanced_order_alternates_classes_keeps_each_video_once_and_splits_pairs_across_ranks():
    labels = [0] * 5 + [1] * 7
    one = EpochSampler(list(range(12)), world=1, rank=0, shuffle=True, seed=0, labels=labels)
    one.set_epoch(2)
    order = [i for _, i in one]
    assert sorted(order) == list(range(12))
    assert all({labels[order[j]], labels[order[j + 1]]} == {0, 1} for j in range(0, 10, 2))
    one.set_epoch(3)
    assert [i for _, i in one] != order  # reshuffled every epoch (seeded by seed and epoch)
    ranks = [EpochSampler(list(range(12)), world=2, rank=r, shuffle=True, seed=0, labels=labels) for r in (0, 1)]
    parts = []
    for r in ranks:
        r.set_epoch(2)
        parts.append([i for _, i in r])
    assert len(parts[0]) == len(parts[1]) and not set(parts[0]) & set(parts[1])
    assert all(e == 2 for r in ranks for e, _ in r)


def test_unbalanced_order_is_distributed_samplers_with_the_epoch_in_each_key():
    s = EpochSampler(list(range(5)), world=1, rank=0, shuffle=False, seed=0)
    s.set_epoch(4)
    assert list(s) == [(4, i) for i in range(5)] and len(s) == 5


def test_one_process_keeps_the_device_and_gathers_its_own_object(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = setup_distributed(torch.device("cpu"))
    assert dist == Dist() and dist.main and not dist.enabled and device == torch.device("cpu")
    assert gather({"a": 1}, dist) == [{"a": 1}]


def test_cuda_n_with_several_processes_per_machine_is_refused(monkeypatch):
    # Every process would land on GPU N; the error says how to choose GPUs instead.
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(OptionError, match=r"--device cuda:1 with 2 processes per machine.*CUDA_VISIBLE_DEVICES"):
        setup_distributed(torch.device("cuda", 1))


def test_all_max_with_one_process_is_the_values_themselves_without_a_collective(monkeypatch):
    # No process group exists here: any collective would raise. (Two gloo processes: tests/test_train_guard.py.)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("collective with one process"))
    assert all_max([True, 0, 81.5], Dist(), torch.device("cpu")) == [1.0, 0.0, 81.5]
