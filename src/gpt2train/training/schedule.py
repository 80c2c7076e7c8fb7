"""Learning-rate schedules. Steps are numbered as the log prints them: step 1 is the first update.

A schedule gives `lr(step)`, the learning rate of AdamW's groups (Muon's is that times its own
ratio, see optim.py), and is told each step's training loss (`observe`), which the wsd schedule can
start its decay on; that decision is part of its `state_dict`, saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup reaching max_lr at step warmup_steps, then a cosine down to min_lr at max_steps
    (and min_lr after that): the default recipe's schedule."""

    max_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def lr(self, step: int) -> float:
        done = step - 1  # updates completed before this one
        if done < self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if done >= self.max_steps:
            return self.min_lr
        progress = (done - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)

    def observe(self, step: int, loss: float) -> None:
        """The cosine does not look at the loss."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class WarmupStableDecay:
    """Warmup, stable, decay ("wsd"): linear warmup to max_lr at step warmup_steps, max_lr until the
    decay starts, then a straight line down to min_lr over decay_steps steps, and min_lr after that.

    The decay starts at the latest at step max_steps - decay_steps + 1, so that it ends at max_steps.
    With `decay_at` > 0 it starts earlier, tied to the target: two steps after the first step whose
    training loss is below decay_at x target_loss. (Two, not one: on a GPU the next step's learning
    rate is already set when a step's loss is read; the same rule everywhere keeps a resumed run
    exact.) A loss below the target soon after is what the decay is for: at a constant learning rate
    the per-batch loss stays noisy above it.
    """

    max_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    decay_steps: int
    decay_at: float = 0.0
    target_loss: float = 0.0
    decay_start: int | None = None  # the step the decay started, once the loss has started it

    def start(self) -> int:
        """The first step of the decay."""
        latest = self.max_steps - self.decay_steps + 1
        return min(latest, self.decay_start) if self.decay_start is not None else latest

    def lr(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        done_decaying = (step - self.start() + 1) / self.decay_steps
        if done_decaying <= 0:
            return self.max_lr
        return self.max_lr + (self.min_lr - self.max_lr) * min(1.0, done_decaying)

    def observe(self, step: int, loss: float) -> None:
        if self.decay_at and self.decay_start is None and loss < self.decay_at * self.target_loss:
            self.decay_start = step + 2

    def state_dict(self) -> dict:
        return {"decay_start": self.decay_start}

    def load_state_dict(self, state: dict) -> None:
        self.decay_start = state.get("decay_start")  # a run resumed from one with another schedule has none


def build_schedule(config: TrainConfig) -> WarmupCosine | WarmupStableDecay:
    if config.schedule == "wsd":
        return WarmupStableDecay(config.lr, config.min_lr, config.warmup_steps, config.max_steps,
                                 max(1, round(config.decay_fraction * config.max_steps)), config.decay_at,
                                 config.target_loss)
    return WarmupCosine(config.lr, config.min_lr, config.warmup_steps, config.max_steps)
