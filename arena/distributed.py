"""Several processes, one run: torchrun's process group, each rank's device and data, and merging their results.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; `launched` reads them (the one
place that does); without them everything here is the one-process case (``Dist()``), so the training code has a
single path. `features` and `submit` run under torchrun too: each rank takes its share of the videos and rank 0
puts the shares together (`shared_run`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


#: How long a rank of `shared_run` waits for the others at a collective. Shares are equal, but a rerun that resumes
#: can leave one rank with nearly all the work: the others wait for it, possibly for hours. A rank that dies does not
#: make the others wait this long: its sockets close (gloo raises at once) and torchrun stops the other workers.
SHARED_RUN_TIMEOUT = datetime.timedelta(days=7)


def launched() -> Dist:
    """This process's place as torchrun's environment gives it (``Dist()`` when not launched by torchrun, or with
    ``WORLD_SIZE`` 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def setup_distributed(device: torch.device, *, backend: str | None = None,
                      timeout: datetime.timedelta | None = None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU) and pick this process's device.

    Under torchrun on CUDA each process uses GPU ``LOCAL_RANK`` of those visible (choose them with
    ``CUDA_VISIBLE_DEVICES``); an explicit ``cuda:N`` is honoured when one process runs per machine. One process:
    nothing to join, ``device`` as given.

    Args:
        backend: the group's backend (default NCCL on CUDA, gloo on CPU). timeout: of its collectives (torch's
            default when None).

    Raises:
        OptionError: ``cuda:N`` with several processes per machine (they would all share GPU N).
    """
    dist = launched()
    if not dist.enabled:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # so that anything allocated "on cuda" lands on GPU N too
        return dist, device
    if device.type == "cuda":
        if device.index is not None and dist.local_world > 1:
            raise OptionError(f"--device {device} with {dist.local_world} processes per machine: each process uses "
                              "GPU LOCAL_RANK. Pass --device cuda (or auto) and choose the GPUs with "
                              "CUDA_VISIBLE_DEVICES.")
        if device.index is None and dist.local_rank >= torch.cuda.device_count():
            raise OptionError(f"torchrun started {dist.local_world} processes on this machine, but "
                              f"{torch.cuda.device_count()} GPU(s) are visible: start one process per GPU "
                              f"(--nproc-per-node {torch.cuda.device_count()}), or pass --device cpu.")
        device = device if device.index is not None else torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
                                             timeout=timeout)
    return dist, device


@contextmanager
def shared_run(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """A run whose ranks each take a share of the videos and hand their results to rank 0 (`features`, `submit`).

    Under torchrun this joins a gloo group (the exchanges are small Python objects, and gloo's wait can be long:
    `SHARED_RUN_TIMEOUT`; NCCL's watchdog would end a rank that waits for a slow one), each rank on its device as
    `setup_distributed` picks it, and leaves the group afterwards if it joined it. One process: ``(Dist(), device)``.
    """
    owns_group = not torch.distributed.is_initialized()
    dist, device = setup_distributed(device, backend="gloo", timeout=SHARED_RUN_TIMEOUT)
    try:
        yield dist, device
    finally:
        if owns_group and dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def gather_to_main(obj: Any, dist: Dist) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks (``[obj]`` without torchrun)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] | None = [None] * dist.world if dist.main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


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
