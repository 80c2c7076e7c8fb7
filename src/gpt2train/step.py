"""The training step, the hot path: forward and backward over the micro-batches, then the guarded
optimizer update; and the pipeline that runs steps one after another.

The two halves are separate so that on a GPU the pipeline queues the next step's forward and
backward before it reads the previous step's loss: nothing in a step makes the host wait for the
device. Non-finite gradients are caught on the device too: the gradient scaler skips such an
update without the host having to look at it first. The model arrives already compiled and
wrapped for DDP or FSDP (parallel.py); the step only calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from . import distributed
from .distributed import World
from .runtime import autocast

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # one (inputs, targets) per micro-step


@dataclass(frozen=True)
class Flags:
    """What any rank can raise for a step; summed over the ranks with the step's numbers, so that
    every rank takes the same decision at the same step."""

    stop: bool = False  # a stop signal (SIGINT or SIGTERM) arrived
    checkpoint: bool = False  # rank 0 wants a checkpoint after this step


@dataclass
class StepResult:
    """What the host learns about a step once it reads it."""

    loss: float  # averaged over the micro-batches and the ranks
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite and the update was skipped
    stop: bool  # some rank was asked to stop
    checkpoint: bool  # rank 0 wants a checkpoint after this step


class PendingStep:
    """A step whose work has been queued; its numbers are copied to the host without waiting."""

    def __init__(self, step: int, loss: torch.Tensor, position: dict | None = None):
        self.step = step
        self.loss = loss  # detached, on the device
        self.position = position  # data and random state from before this step, to rewind to if it is dropped
        self.queued_after: PendingStep | None = None  # the step launched before this one was read
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
    """Runs training steps of `model` through `forward` (the model, or its compiled or DDP wrapper)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype,
                 grad_clip: float, forward: nn.Module | None = None, world: World = World(), sharded: bool = False,
                 fused_loss: bool = False):
        self.model, self.optimizer = model, optimizer
        self.forward = forward if forward is not None else model
        self.device, self.dtype, self.world, self.sharded = device, dtype, world, sharded
        self.grad_clip = grad_clip
        self.fused_loss = fused_loss  # the loss without the batch's logits (GPT.forward's return_logits=False)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 keep the scale at 1, where
        # scaling changes nothing, and use the scaler only for its on-device skip of non-finite steps.
        self.loss_scaling = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if self.loss_scaling else 1.0)

    def forward_backward(self, batches: Batches) -> torch.Tensor:
        """Gradients of the mean loss over the micro-batches, accumulated into .grad; returns that loss.

        Gradients are reduced over the ranks once, after the last micro-batch.
        """
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            with self._gradient_sync(i == len(batches) - 1), autocast(self.device, self.dtype):
                _, loss = self.forward(x, y, return_logits=not self.fused_loss)
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

    def update(self, lr: float, loss: torch.Tensor, flags: Flags = Flags()) -> torch.Tensor:
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
        shared = torch.zeros(3, device=self.device)
        shared[0] = loss
        if flags.stop:
            shared[1] = 1.0
        if flags.checkpoint:
            shared[2] = 1.0
        distributed.sum_(shared, self.world)
        return torch.stack([shared[0] / self.world.size, grad_norm.float(), applied.float(), shared[1], shared[2]])

    def discard(self) -> None:
        """Drop gradients that were computed but will not be applied."""
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, first: int, last: int, draw: Callable[[int], tuple[dict | None, Batches]],
            lr: Callable[[int], float], flags: Callable[[int], Flags], lag: int) -> Iterator[PendingStep]:
        """Run steps first..last, yielding each once its update is queued; `.result()` reads it.

        `draw(step)` gives (the data position before the step, its micro-batches). With lag 1 the
        next step's forward and backward are queued before a step is yielded (its `queued_after`):
        a caller that stops there must call `discard()`, and resumes from that step's position.
        """
        in_flight: PendingStep | None = None
        for step in range(first, last + 1):
            position, batches = draw(step)
            launched = PendingStep(step, self.forward_backward(batches), position)
            if in_flight is not None:
                in_flight.queued_after = launched
                yield in_flight
            launched.record(self.update(lr(step), launched.loss, flags(step)))
            in_flight = launched
            if lag == 0:
                yield in_flight
                in_flight = None
        if in_flight is not None:
            yield in_flight

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
