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

from ..errors import UserError
from ..model import GPT, TIED_WEIGHTS
from .distributed import World


@dataclass
class Parallelized:
    forward: nn.Module  # what the training step calls: the model, compiled and/or wrapped
    sharded: bool  # FSDP2: each rank holds a shard of the weights, gradients and optimizer state


def parallelize(model: GPT, device: torch.device, dtype: torch.dtype, world: World = World(), fsdp: bool = False,
                compile: bool = False, compile_blocks: bool = False, compile_mode: str = "default") -> Parallelized:
    """Shard (FSDP2) or replicate (DDP) the model over the ranks, and compile it (in `compile_mode`): as
    a whole, or with `compile_blocks` each shard unit (transformer block) on its own, in place.

    Build the optimizer after this: under FSDP it must hold the shards. On one process the model
    is only compiled, if asked.
    """
    if compile and compile_blocks:
        # The blocks are alike, so they share one compiled graph: compiled once, not twelve times
        # over in one whole-model graph. Before sharding, as FSDP2 expects compiled units.
        for unit in model.shard_units():
            unit.compile(mode=compile_mode)
        compile = False
    sharded = fsdp and world.distributed
    if sharded:
        from torch.distributed.fsdp import fully_shard  # imported only when used: it takes a second

        if dtype == torch.float16:
            raise UserError("--fsdp trains in bf16 or fp32, not fp16: use --dtype bfloat16")
        for unit in model.shard_units():  # each unit's weights are gathered only while it runs
            fully_shard(unit)
        fully_shard(model)
    forward = torch.compile(model, mode=compile_mode) if compile else model  # shares the model's parameters
    if world.distributed and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    return Parallelized(forward, sharded)


class FullModelState:
    """The model's weights as one full fp32 state dict on the CPU, the same on one process or many, with
    no wrapper prefixes and the tied weight kept as one tensor (saved once). With `sharded` (FSDP2) the
    shards are gathered: then saving is a collective, and only rank 0 gets the contents."""

    def __init__(self, model: nn.Module, sharded: bool = False):
        self.model, self.sharded = model, sharded

    def state_dict(self) -> dict:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state = get_model_state_dict(self.model, options=_full_options(cpu_offload=True))
        else:
            state = {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}
        for tied, source in TIED_WEIGHTS.items():
            if tied in state:
                state[tied] = state[source]
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state, options=_full_options())
        else:
            self.model.load_state_dict(state)


class FullOptimizerState:
    """The optimizers' state keyed by parameter name, not by position (torch.distributed.checkpoint's
    full layout, whichever way the run was spread, so that a checkpoint resumes with or without FSDP):
    every optimizer's state under its parameters' names, and their groups one after another.
    Loading keeps this run's own learning rates and weight decay."""

    KEPT = ("weight_decay", "lr_scale")  # what the run's settings decide, not the checkpoint

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], sharded: bool = False):
        self.model, self.optimizers, self.sharded = model, optimizers, sharded

    def state_dict(self) -> dict:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizers, options=_full_options(cpu_offload=True))
        names, state, groups = self._names(), {}, []
        for optimizer in self.optimizers:
            saved = optimizer.state_dict()  # keyed by position in this optimizer's groups
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state.update({names[id(params[i])]: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                                 for k, v in moments.items()} for i, moments in saved["state"].items()})
            groups += [{**group, "params": [names[id(params[i])] for i in group["params"]]}
                       for group in saved["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        kept = [{key: group[key] for key in self.KEPT if key in group}
                for optimizer in self.optimizers for group in optimizer.param_groups]
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizers, state, options=_full_options())
        else:
            names, saved_groups = self._names(), iter(state["param_groups"])
            for optimizer in self.optimizers:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                index = {names[id(p)]: i for i, p in enumerate(params)}
                groups = [next(saved_groups) for _ in optimizer.param_groups]
                optimizer.load_state_dict({
                    "state": {index[name]: moments for name, moments in state["state"].items() if name in index},
                    "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in groups],
                })
        for group, settings in zip((g for o in self.optimizers for g in o.param_groups), kept):
            group.update(settings)

    def _names(self) -> dict[int, str]:
        """Each parameter's name (the first, for the tied one)."""
        return {id(p): name for name, p in self.model.named_parameters()}


def _full_options(cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
