"""How a training run ends, and the exit status each way of ending gives the process."""

from __future__ import annotations

from enum import Enum

# Exit statuses besides 0 (the target reached), 1 (a crash: a bug) and 2 (a user error, errors.py);
# an interrupted run exits with 128 + the signal number, as shells report.
EXIT_TARGET_NOT_REACHED = 3
EXIT_DIVERGED = 4


class Outcome(str, Enum):
    """The end of a run. A str, so that checkpoints store it as plain text ("finished")."""

    TARGET_REACHED = "target_reached"  # the final model was written
    MAX_STEPS = "max_steps"  # max_steps ran out first
    INTERRUPTED = "interrupted"  # a stop signal, after a checkpoint
    DIVERGED = "diverged"  # too many non-finite steps in a row

    def __str__(self) -> str:
        return self.value

    def exit_status(self, signal_number: int | None = None) -> int:
        """The process's exit status after a run that ended so (`signal_number`: the one that stopped it)."""
        if self == Outcome.INTERRUPTED:
            return 128 + signal_number
        return {Outcome.MAX_STEPS: EXIT_TARGET_NOT_REACHED, Outcome.DIVERGED: EXIT_DIVERGED}.get(self, 0)
