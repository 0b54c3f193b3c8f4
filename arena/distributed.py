"""Several processes, one run: torchrun's process group, each rank's device and data, and merging their results.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; without it everything here is
the one-process case (``Dist()``), so the training code has a single path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from arena.errors import OptionError


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU) and pick this process's device.

    Under torchrun on CUDA each process uses GPU ``LOCAL_RANK`` of those visible (choose them with
    ``CUDA_VISIBLE_DEVICES``); an explicit ``cuda:N`` is honoured when one process runs per machine. One process:
    nothing to join, ``device`` as given.

    Raises:
        OptionError: ``cuda:N`` with several processes per machine (they would all share GPU N).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # so that anything allocated "on cuda" lands on GPU N too
        return Dist(), device
    dist = Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if device.type == "cuda":
        if device.index is not None and dist.local_world > 1:
            raise OptionError(f"--device {device} with {dist.local_world} processes per machine: each process uses "
                              "GPU LOCAL_RANK. Pass --device cuda (or auto) and choose the GPUs with "
                              "CUDA_VISIBLE_DEVICES.")
        device = device if device.index is not None else torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def gather(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one item without DDP)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_max(values: Sequence[float], dist: Dist, device: torch.device) -> list[float]:
    """The element-wise maximum of every rank's ``values``: with 0/1 flags, "did any rank ...".

    One all_reduce of a tensor of ``len(values)`` numbers on ``device`` (NCCL needs it on the GPU); without DDP
    the values themselves and no collective. Every rank must call it at the same point, with as many values.
    """
    if not dist.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def barrier(dist: Dist) -> None:
    """Wait for every rank (nothing to wait for with one process)."""
    if dist.enabled:
        torch.distributed.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class EpochSampler(Sampler):
    """DistributedSampler (also with one process) that yields ``(epoch, index)`` keys.

    The epoch travels with each key because worker processes hold a copy of the dataset made when the epoch
    started; keys are the one thing every worker sees fresh (`arena.clips.ClipDataset` seeds a clip's augmentation
    with them).

    With ``labels`` (training), the order is class-balanced: a shuffled real and a shuffled fake alternate, so every
    batch of an even size (and every pair of steps at batch 1) holds both classes. Train-mode BatchNorm then
    normalises real and fake clips together, which is what makes a subtle local artefact learnable from few clips.
    Each video still appears once per epoch (the larger class's surplus comes last); under DDP each rank gets whole
    pairs.
    """

    def __init__(self, dataset: Dataset, *, world: int, rank: int, shuffle: bool, seed: int,
                 labels: list[int] | None = None) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.world, self.rank, self.seed = world, rank, seed
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def _balanced(self) -> list[int]:
        g = np.random.default_rng([self.seed, self.epoch, 17])
        real = g.permutation(np.flatnonzero(self.labels == 0)).tolist()
        fake = g.permutation(np.flatnonzero(self.labels == 1)).tolist()
        m = min(len(real), len(fake))
        pairs = [[real[i], fake[i]] for i in range(m)]
        rest = g.permutation(np.array(real[m:] + fake[m:], dtype=np.int64)).tolist()
        pairs += [rest[i:i + 2] for i in range(0, len(rest), 2)]
        while len(pairs) % self.world:  # every rank the same number of steps (DDP), like DistributedSampler's padding
            pairs.append(pairs[len(pairs) % max(1, m)])
        return [i for pair in pairs[self.rank::self.world] for i in pair]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._balanced() if self.labels is not None else self.inner
        return ((self.epoch, int(i)) for i in order)

    def __len__(self) -> int:
        return len(self._balanced()) if self.labels is not None else len(self.inner)
