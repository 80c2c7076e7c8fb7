"""Watching each step's loss: the best so far, updates skipped for non-finite values, and spikes."""

from __future__ import annotations

import math
import statistics
from collections import deque


class LossMonitor:
    """The best losses, the run of non-finite steps, and spikes against the recent losses."""

    WINDOW = 100  # recent losses the spike test compares against
    MIN_HISTORY = 20
    SPIKE_SIGMAS = 6.0

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_val_loss = math.inf
        self.bad_in_a_row = 0
        self.skipped = 0
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    def observe(self, step: int, loss: float, grad_norm: float, applied: bool) -> list[str]:
        """Record a step; returns the lines worth logging about it."""
        if not applied:
            self.bad_in_a_row += 1
            self.skipped += 1
            what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient norm ({grad_norm})"
            return [f"step {step}: {what}; update skipped ({self.bad_in_a_row} in a row, {self.skipped} in all)"]
        self.bad_in_a_row = 0
        self.best_loss = min(self.best_loss, loss)
        events = []
        if len(self.recent) >= self.MIN_HISTORY:
            mean, spread = statistics.fmean(self.recent), statistics.pstdev(self.recent)
            if spread > 0 and loss > mean + self.SPIKE_SIGMAS * spread:
                events.append(
                    f"step {step}: loss spike {loss:.4f}, {(loss - mean) / spread:.1f} standard deviations "
                    f"above the recent mean {mean:.4f}"
                )
        self.recent.append(loss)
        return events

    def observe_val(self, loss: float) -> None:
        self.best_val_loss = min(self.best_val_loss, loss)

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_val_loss": self.best_val_loss, "bad_in_a_row": self.bad_in_a_row,
                "skipped": self.skipped, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.best_val_loss = state["best_val_loss"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.skipped = state["skipped"]
        self.recent = deque(state["recent"], maxlen=self.WINDOW)
