"""Process groups: set-up from torchrun's environment, rank and world-size helpers that accept ``None``."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def init_distributed(backend: str | None = None) -> ProcessGroup | None:
    """Initialises the default group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL when CUDA is available, gloo otherwise; on CUDA each process takes the device LOCAL_RANK. Returns
    the default group, or ``None`` when the process was not started by torchrun (single process).

    A group created here is destroyed at interpreter exit, after two barriers, unless the script destroyed it first;
    a group the caller initialised is left alone. Without that, a rank of a script that keeps the model in a
    global can abort at exit ("terminate called without an active exception"): a gloo worker thread drops its
    last collective's tensors only after the interpreter has started finalising, cannot take the GIL to free
    them, and terminates the process. The barriers hold each rank until every rank has reached exit, which in
    practice leaves the worker threads time to finish with earlier collectives (a timing fix, not a guarantee).
    """
    if dist.is_initialized():
        return dist.group.WORLD
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    group = dist.group.WORLD
    atexit.register(_destroy_at_exit, group)
    return group


def _destroy_at_exit(group: ProcessGroup) -> None:
    # Only the group init_distributed made, and only while it is still the default one. destroy_process_group
    # alone does not stop gloo's worker threads while the model still holds the group.
    if dist.is_initialized() and dist.group.WORLD is group:
        # Two barriers. The likely mechanism (not verified in gloo's source): a worker thread holds its last work,
        # and what that work waited on, until it takes the next one; a second barrier makes it move past the
        # first, which holds no tensor. Measured on 2 CPU cores: one barrier, 2 of about 100 two-rank runs still
        # aborted (tests/parallel/test_exit.py); two barriers, 0 of 60.
        dist.barrier()
        dist.barrier()
        dist.destroy_process_group()


def default_group() -> ProcessGroup | None:
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def check_member(group: ProcessGroup | None) -> None:
    """Raises unless this process is one of ``group``'s ranks: torch gives a process outside a group rank -1 in it
    (and world size -1), which would otherwise slice the checkpoint at nonsense offsets."""
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group given, whose ranks "
            f"are {dist.get_process_group_ranks(group)}; load the model on the group's ranks only, or pass a group "
            f"this rank belongs to"
        )


def get_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def get_world_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass(frozen=True)
class Shard:
    """The half-open range ``[start, stop)`` of a dimension of size ``total`` that one rank holds."""

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def even_shard(total: int, rank: int, world_size: int, *, what: str, unit: int = 1) -> Shard:
    """Splits ``total`` (a multiple of ``unit``, e.g. head_dim) into equal contiguous parts, one per rank.

    Raises when ``total / unit`` does not divide by the world size, naming the numbers.
    """
    groups = total // unit
    if groups * unit != total or groups % world_size:
        raise ValueError(
            f"{what} = {groups} does not divide by the tensor-parallel world size {world_size}; "
            f"use a world size that divides it, or parallel='data' (every rank holds the full weights and runs "
            f"its share of the batch)"
        )
    per_rank = groups // world_size * unit
    return Shard(rank * per_rank, (rank + 1) * per_rank, total)


def ceil_shard(total: int, rank: int, world_size: int) -> Shard:
    """Splits ``total`` into ``world_size`` contiguous blocks of ``ceil(total / world_size)``; the last may be short."""
    block = -(-total // world_size)
    start = min(rank * block, total)
    return Shard(start, min(start + block, total), total)
