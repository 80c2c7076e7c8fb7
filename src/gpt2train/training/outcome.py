"""How a training run ends."""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    """The end of a run. A str, so that checkpoints store it as plain text ("finished")."""

    TARGET_REACHED = "target_reached"  # the final model was written
    MAX_STEPS = "max_steps"  # max_steps ran out first
    INTERRUPTED = "interrupted"  # a stop signal, after a checkpoint
    DIVERGED = "diverged"  # too many non-finite steps in a row

    def __str__(self) -> str:
        return self.value
