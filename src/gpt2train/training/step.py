"""The training step, the hot path: forward and backward over the micro-batches, then the guarded
optimizer update; and `Pipeline`, which runs steps one after another.

The two halves are separate so that on a GPU the pipeline queues the next step's forward and
backward before the previous step's numbers are read: nothing in a step makes the host wait for the
device. Non-finite gradients are caught on the device too: the gradient scaler skips such an
update without the host having to look at it first. The model arrives already compiled and
wrapped for DDP or FSDP (parallel.py); the step only calls it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..device import autocast, use_compile
from ..model import GPT
from . import distributed
from .distributed import World
from .optim import build_optimizers
from .parallel import parallelize

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # one (inputs, targets) per micro-step


@dataclass(frozen=True)
class Flags:
    """What any rank can raise for a step; summed over the ranks with the step's numbers, so that
    every rank takes the same decision at the same step."""

    stop: bool = False  # a stop signal arrived
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

    @property
    def rewind_position(self) -> dict | None:
        """Where the data stood before the step queued after this one drew its batch, if one was."""
        return self.queued_after.position if self.queued_after is not None else None


class Scaler(torch.amp.GradScaler):
    """The gradient scaler. fp16 gradients underflow without loss scaling; bf16 and fp32 keep the
    scale at 1, where scaling changes nothing, and use the scaler only for its on-device skip of
    non-finite steps: then it has no state worth saving."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.scaling = dtype == torch.float16
        super().__init__(device.type, init_scale=2.0**16 if self.scaling else 1.0)

    def update(self, new_scale=None) -> None:
        super().update(new_scale if self.scaling else 1.0)

    def state_dict(self) -> dict:
        return super().state_dict() if self.scaling else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaling and state:
            super().load_state_dict(state)


class Stepper:
    """Runs training steps of `model` through `forward` (the model, or its compiled or DDP wrapper)."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], device: torch.device,
                 dtype: torch.dtype, grad_clip: float, forward: nn.Module | None = None, world: World = World(), sharded: bool = False,
                 fused_loss: bool = False, graphs: bool = False):
        self.model, self.optimizers = model, optimizers
        self.forward = forward if forward is not None else model
        self.device, self.dtype, self.world, self.sharded = device, dtype, world, sharded
        self.grad_clip = grad_clip
        self.fused_loss = fused_loss  # the loss without the batch's logits (GPT.forward's return_logits=False)
        self.graphs = graphs  # the compiled forward and backward run as CUDA graphs (compile mode reduce-overhead)
        self.scaler = Scaler(device, dtype)

    def forward_backward(self, batches: Batches) -> torch.Tensor:
        """Gradients of the mean loss over the micro-batches, accumulated into .grad; returns that loss.

        Gradients are reduced over the ranks once, after the last micro-batch.
        """
        total = torch.zeros((), device=self.device)
        if self.graphs:  # a new step: the graphs' outputs of the last one are no longer read
            torch.compiler.cudagraph_mark_step_begin()
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
        """Clip, step and clear the gradients, at learning rate `lr` (times a group's `lr_scale`, if any).
        Returns [loss, gradient norm, applied, stop, checkpoint] on the device, the loss averaged and
        the flags summed over all ranks."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if not self.sharded:  # FSDP trains unscaled (bf16 or fp32)
                self.scaler.unscale_(optimizer)  # also finds non-finite gradients, on the device
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm)
        if self.sharded:  # a DTensor: this rank's part of the norm
            grad_norm = grad_norm.full_tensor()
        applied = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.sharded:
            # Each rank sees only its shard's gradients, so the scaler could skip on some ranks and
            # not others; the global norm decides for all of them instead (at the price of a sync).
            if applied:
                for optimizer in self.optimizers:
                    optimizer.step()
        else:
            for optimizer in self.optimizers:
                # Skipped when a gradient is not finite: on the device for fused AdamW; Muon, which
                # cannot, has the scaler read the verdict first (a wait for the device).
                self.scaler.step(optimizer)
            self.scaler.update()
        self._zero_grad()
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
        self._zero_grad()

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)


class Pipeline:
    """Steps one after another, each handed back to be read once its numbers are on their way.

    With lag 0 a step is handed back after its update is queued. With lag 1 (GPUs) it is handed
    back once the next step's forward and backward are queued too, so that the device is busy while
    the host reads; that next step's update is queued only on the following `push`, so a step that
    ends the run is never followed by an applied one: the caller drops its gradients
    (`stepper.discard()`) and rewinds the data to the dropped step's position (`rewind_position`).
    """

    def __init__(self, stepper: Stepper, lag: int):
        self.stepper, self.lag = stepper, lag
        self._launched: PendingStep | None = None  # forward and backward queued, update not yet
        self._update = (0.0, Flags())  # its learning rate and flags

    def push(self, step: int, batches: Batches, lr: float, flags: Flags, position: dict | None = None) -> PendingStep | None:
        """Queue `step` (drawn at data `position`); the step to read now, if any: with lag 0 this
        one, with lag 1 the one before it."""
        before = self._finish()
        launched = PendingStep(step, self.stepper.forward_backward(batches), position)
        if before is not None:
            before.queued_after = launched
        self._launched, self._update = launched, (lr, flags)
        return self._finish() if self.lag == 0 else before

    def flush(self) -> PendingStep | None:
        """After the last push: the last step, its update queued, to read."""
        return self._finish()

    def _finish(self) -> PendingStep | None:
        """Queue the update of the step launched last; that step."""
        launched, self._launched = self._launched, None
        if launched is not None:
            lr, flags = self._update
            launched.record(self.stepper.update(lr, launched.loss, flags))
        return launched


def build_stepper(model: GPT, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                  world: World = World()) -> Stepper:
    """The training step for `model`: parallelized and compiled from outside, then the optimizers over
    what each rank holds."""
    compile = use_compile(config.compile, device)
    parallel = parallelize(model, device, dtype, world, fsdp=config.fsdp, compile=compile,
                           compile_blocks=config.compile_blocks, compile_mode=config.compile_mode)
    return Stepper(model, build_optimizers(model, config), device, dtype, config.grad_clip, parallel.forward, world,
                   parallel.sharded, fused_loss=config.fused_loss,
                   graphs=compile and config.compile_mode == "reduce-overhead")


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
