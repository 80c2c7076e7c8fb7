"""Parallelism and compilation, applied to the model from outside: DDP or FSDP2 over the ranks,
torch.compile, and the full state dicts (FullModelState, FullOptimizerState) that are the same on one
process or many.

The model itself knows nothing of this; it only names the modules worth sharding one by one
(`GPT.shard_units`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..model import GPT, TIED_WEIGHTS
from .distributed import World


@dataclass
class Parallelized:
    forward: nn.Module  # what the training step calls: the model, compiled and/or wrapped
    sharded: bool  # FSDP2: each rank holds a shard of the weights, gradients and optimizer state


def parallelize(model: GPT, device: torch.device, dtype: torch.dtype, world: World = World(), fsdp: bool = False,
                compile: bool = False, compile_blocks: bool = False) -> Parallelized:
    """Shard (FSDP2) or replicate (DDP) the model over the ranks, and compile it: as a whole, or
    with `compile_blocks` each shard unit (transformer block) on its own, in place.

    Build the optimizer after this: under FSDP it must hold the shards. On one process the model
    is only compiled, if asked.
    """
    if compile and compile_blocks:
        # The blocks are alike, so they share one compiled graph: compiled once, not twelve times
        # over in one whole-model graph. Before sharding, as FSDP2 expects compiled units.
        for unit in model.shard_units():
            unit.compile()
        compile = False
    sharded = fsdp and world.distributed
    if sharded:
        if dtype == torch.float16:
            raise UserError("--fsdp trains in bf16 or fp32, not fp16: use --dtype bfloat16")
        for unit in model.shard_units():  # each unit's weights are gathered only while it runs
            fully_shard(unit)
        fully_shard(model)
    forward = torch.compile(model) if compile else model  # shares the model's parameters
    if world.distributed and not sharded:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    return Parallelized(forward, sharded)


# Full state dicts: gathered from the shards under FSDP, on the CPU, with no wrapper prefixes.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FullModelState:
    """The model's weights as one full fp32 state dict, the same on one process or many, the tied weight
    kept as one tensor so that it is saved once. Saving is a collective under FSDP (every rank calls it;
    only rank 0 gets the contents)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        state = get_model_state_dict(self.model, options=FULL)
        for tied, source in TIED_WEIGHTS.items():
            if tied in state:
                state[tied] = state[source]
        return state

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class FullOptimizerState:
    """The optimizer's state keyed by parameter name (not by position), full as FullModelState is.
    Loading keeps this run's own learning rate and weight decay."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def load_state_dict(self, state: dict) -> None:
        weight_decay = [group["weight_decay"] for group in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        for group, decay in zip(self.optimizer.param_groups, weight_decay):
            group["weight_decay"] = decay
