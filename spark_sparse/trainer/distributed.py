"""Process group setup from torchrun's environment: NCCL on GPUs, gloo on the CPU, or a single process."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job: global rank, number of processes, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group spans more than one process."""
        return self.world_size > 1


def world_size_from_env() -> int:
    """Return ``WORLD_SIZE`` as torchrun sets it, or 1 for a plain ``python main.py``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def init_world() -> Iterator[World]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) for the block.

    Each process uses GPU ``LOCAL_RANK`` when CUDA is available (NCCL), else the
    CPU (gloo), one rank per process. Without torchrun's variables, the block runs
    as a single process with no process group.

    NOTE: the tests run only the CPU and gloo path; the GPU and NCCL path is untested.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    started = world_size > 1 and not dist.is_initialized()
    if started:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    finally:
        if started:
            dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Return the mean of ``value`` over all processes (``value`` itself in a single process)."""
    if not world.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world.world_size


def barrier(world: World) -> None:
    """Wait until every process reaches this point."""
    if world.distributed:
        dist.barrier()
