"""One training step, the hot path: forward and backward, then the guarded optimizer update.

The two halves are separate so that on a GPU the training loop can queue the next step's forward
and backward before it reads the previous step's loss: nothing in a step makes the host wait for
the device. Non-finite gradients are caught on the device too: the gradient scaler skips such an
update without the host having to look at it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import GPT
from .runtime import autocast


@dataclass
class StepResult:
    """What the host learns about a step once it reads it."""

    loss: float
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite and the update was skipped


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
        loss, grad_norm, applied = self._host.tolist()
        return StepResult(loss, grad_norm, applied > 0)


class Stepper:
    """Runs training steps of `model` with its optimizer, in the given precision."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype,
                 grad_clip: float, compile: bool = False):
        self.model = model
        self.forward = torch.compile(model) if compile else model  # shares the model's parameters
        self.optimizer = optimizer
        self.device, self.dtype = device, dtype
        self.grad_clip = grad_clip
        # fp16 gradients underflow without loss scaling; bf16 and fp32 keep the scale at 1, where
        # scaling changes nothing, and use the scaler only for its on-device skip of non-finite steps.
        self.loss_scaling = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if self.loss_scaling else 1.0)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the batch's loss, accumulated into .grad; returns the loss (detached)."""
        with autocast(self.device, self.dtype):
            _, loss = self.forward(x, y)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def update(self, lr: float, loss: torch.Tensor) -> torch.Tensor:
        """Clip, step and clear the gradients. Returns [loss, gradient norm, applied] on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # also finds non-finite gradients, on the device
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm)
        applied = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.scaler.step(self.optimizer)  # skipped, on the device, when a gradient is not finite
        self.scaler.update(None if self.loss_scaling else 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.float(), grad_norm.float(), applied.float()])

    def discard(self) -> None:
        """Drop gradients that were computed but will not be applied."""
        self.optimizer.zero_grad(set_to_none=True)
