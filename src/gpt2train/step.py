"""One training step, the hot path: forward and backward over the micro-batches, then the guarded
optimizer update; on one device or many (DDP by default, FSDP2 on request).

The two halves are separate so that on a GPU the training loop can queue the next step's forward
and backward before it reads the previous step's loss: nothing in a step makes the host wait for
the device. Non-finite gradients are caught on the device too: the gradient scaler skips such an
update without the host having to look at it first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .distributed import World
from .errors import UserError
from .model import GPT
from .optim import build_optimizer
from .runtime import autocast

# The flags any rank can raise for a step; they travel, summed over ranks, with the step's numbers,
# so that every rank takes the same decision at the same step.
STOP, CHECKPOINT = 0, 1


@dataclass
class StepResult:
    """What the host learns about a step once it reads it."""

    loss: float  # averaged over the micro-batches and the ranks
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite and the update was skipped
    stop: bool  # some rank was asked to stop (SIGINT or SIGTERM)
    checkpoint: bool  # rank 0 wants a checkpoint after this step


class PendingStep:
    """A step whose work has been queued; its numbers are copied to the host without waiting."""

    def __init__(self, step: int, loss: torch.Tensor, position: dict | None = None):
        self.step = step
        self.loss = loss  # detached, on the device
        self.position = position  # data and random state from before this step, to rewind to if it is dropped
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    def record(self, stats: torch.Tensor) -> None:
        if stats.device.type == "cuda":
            self._host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self._host.copy_(stats, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = stats

    def result(self) -> StepResult:
        if self._ready is not None:
            self._ready.synchronize()  # waits for this step only, not for work queued after it
        loss, grad_norm, applied, stop, checkpoint = self._host.tolist()
        return StepResult(loss, grad_norm, applied > 0, stop > 0, checkpoint > 0)


class Stepper:
    """Runs training steps of `model`: its optimizer, precision, and its share of the world's work."""

    def __init__(self, model: GPT, lr: float, weight_decay: float, device: torch.device, dtype: torch.dtype,
                 grad_clip: float, compile: bool = False, world: World = World(), fsdp: bool = False):
        self.model = model
        self.device, self.dtype, self.world = device, dtype, world
        self.grad_clip = grad_clip
        self.sharded = fsdp and world.distributed
        if self.sharded:
            if dtype == torch.float16:
                raise UserError("--fsdp trains in bf16 or fp32, not fp16: use --dtype bfloat16")
            for block in model.transformer.h:  # each block's weights are gathered only while it runs
                fully_shard(block)
            fully_shard(model)
        self.optimizer = build_optimizer(model, lr, weight_decay)  # after sharding: over the shards
        forward = torch.compile(model) if compile else model  # shares the model's parameters
        if world.distributed and not self.sharded:
            forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = forward
        # fp16 gradients underflow without loss scaling; bf16 and fp32 keep the scale at 1, where
        # scaling changes nothing, and use the scaler only for its on-device skip of non-finite steps.
        self.loss_scaling = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if self.loss_scaling else 1.0)

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gradients of the mean loss over the micro-batches, accumulated into .grad; returns that loss.

        Gradients are reduced over the ranks once, after the last micro-batch.
        """
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            with self._gradient_sync(i == len(batches) - 1), autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach().float()
        return total / len(batches)

    def _gradient_sync(self, last: bool):
        if last or not self.world.distributed:
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(False)
            return _restore_gradient_sync(self.model)
        return self.forward.no_sync()

    def update(self, lr: float, loss: torch.Tensor, flags: tuple[bool, bool] = (False, False)) -> torch.Tensor:
        """Clip, step and clear the gradients. Returns [loss, gradient norm, applied, stop, checkpoint]
        on the device, the loss averaged and the flags summed over all ranks."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.sharded:  # FSDP trains unscaled (bf16 or fp32)
            self.scaler.unscale_(self.optimizer)  # also finds non-finite gradients, on the device
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        applied = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.sharded:
            # Each rank sees only its shard's gradients, so the scaler could skip on some ranks and
            # not others; the global norm decides for all of them instead (at the price of a sync).
            if applied:
                self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skipped, on the device, when a gradient is not finite
            self.scaler.update(None if self.loss_scaling else 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        # Built on the device: a tensor made from host values would be a blocking copy on a GPU.
        shared = torch.zeros(1 + len(flags), device=self.device)
        shared[0] = loss
        for i, raised in enumerate(flags, start=1):
            if raised:
                shared[i] = 1.0
        distributed.sum_(shared, self.world)
        return torch.stack([shared[0] / self.world.size, grad_norm.float(), applied.float(), shared[1], shared[2]])

    def discard(self) -> None:
        """Drop gradients that were computed but will not be applied."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dicts(self) -> tuple[dict, dict]:
        """The full model weights (fp32, on the CPU, no wrapper prefixes) and optimizer state keyed by
        parameter name. A collective: every rank calls it; with FSDP only rank 0 gets the contents."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        if "lm_head.weight" in model_state:  # tied: one tensor, so that it is saved once
            model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
        return model_state, get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dicts(self, model_state: dict, optimizer_state: dict) -> None:
        """Load what state_dicts() gave; the learning rate and weight decay stay this run's own."""
        weight_decay = [group["weight_decay"] for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
        for group, decay in zip(self.optimizer.param_groups, weight_decay):
            group["weight_decay"] = decay

    def scaler_state(self) -> dict:
        return self.scaler.state_dict() if self.loss_scaling else {}

    def load_scaler_state(self, state: dict) -> None:
        if self.loss_scaling and state:
            self.scaler.load_state_dict(state)


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
