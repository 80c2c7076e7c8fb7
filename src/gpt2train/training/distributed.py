"""Many processes under torchrun: joining the process group, and the few collectives training needs.

A plain `gpt2train train` (no torchrun, or torchrun with one process) stays a single process with
no process group at all, so it runs exactly the single-device code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process among those on its machine: which GPU it drives
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place as torchrun describes it in RANK, LOCAL_RANK and WORLD_SIZE."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers: launch with torchrun") from None
    return World(rank, local_rank, size)


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group (nccl on GPUs, gloo on CPUs); returns the device this rank uses.

    Each rank drives its own GPU, cuda:LOCAL_RANK.
    """
    if not world.distributed:
        return device
    if device.type == "cuda":
        if device.index is not None and device.index != world.local_rank:
            raise UserError("under torchrun each process drives GPU LOCAL_RANK: use --device cuda (or auto), not cuda:N")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"distributed training runs on CUDA GPUs or CPUs, not {device.type}: use --device cuda or cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all ranks, in place, without waiting on the host."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(value, world: World) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
