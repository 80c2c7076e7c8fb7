"""Parallelism and compilation, applied to the model from outside: DDP or FSDP2 over the ranks,
torch.compile, and the full state dicts that are the same on one process or many.

The model itself knows nothing of this; it only names the modules worth sharding one by one
(`GPT.shard_units`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from .distributed import World
from .errors import UserError
from .model import GPT, TIED_WEIGHTS


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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full model weights (fp32, on the CPU, no wrapper prefixes) and optimizer state keyed by
    parameter name. A collective: every rank calls it; with FSDP only rank 0 gets the contents."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    for tied, source in TIED_WEIGHTS.items():
        if tied in model_state:  # one tensor, so that it is saved once
            model_state[tied] = model_state[source]
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """Load what full_state_dicts() gave; the learning rate and weight decay stay this run's own."""
    weight_decay = [group["weight_decay"] for group in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
    for group, decay in zip(optimizer.param_groups, weight_decay):
        group["weight_decay"] = decay
