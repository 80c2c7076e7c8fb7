"""Learning-rate schedules. Steps are numbered as the log prints them: step 1 is the first update."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup reaching max_lr at step warmup_steps, then a cosine down to min_lr at max_steps
    (and min_lr after that): the seed's schedule."""

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
