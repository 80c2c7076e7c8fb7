"""Timing the steps, and how long the run will take: the time to max steps, estimated once a few steps
are timed, and early by a watch thread while slow steps run."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch

from ..config import TrainConfig
from ..progress import format_duration

# The time-to-max-steps estimate is the median step time after the first step (which pays for
# warm-up), printed once ESTIMATE_STEPS steps are timed or, for slow steps, ESTIMATE_SECONDS have
# passed. A first step still running after ESTIMATE_SECONDS gets a lower bound printed at once.
ESTIMATE_STEPS = 8
ESTIMATE_SECONDS = 30.0


def estimate_line(config: TrainConfig, device: torch.device, per_step: float, step: int, kind: str = "measured") -> str:
    """The time to max steps as printed; `kind`: measured, early (from the few steps done, a measured
    one follows) or lower bound (the first step is still running)."""
    total = per_step * (config.max_steps - step)
    if kind == "lower bound":
        line = (f"estimated time to max steps ({config.max_steps:,}): more than {format_duration(total)}, at more "
                f"than {per_step:.0f} s/step (the first step is still running)")
    elif kind == "early":
        line = (f"estimated time to max steps ({config.max_steps:,}): about {format_duration(total)} more at "
                f"{per_step:.1f} s/step, from the first {f'{step} steps' if step > 1 else 'step'} (a steadier "
                "estimate follows)")
    else:
        line = (f"estimated time to max steps ({config.max_steps:,}): {format_duration(total)} more at "
                f"{per_step:.2f} s/step (less if the target is reached first)")
    if device.type == "cpu" and config.preset != "tiny" and total > 3600:
        line += "; this model is too large for a CPU run, try `--preset tiny` for one that finishes in minutes"
    return line


class StepClock:
    """Times the steps, and says how long the run will take: the median step time after the first
    (which pays for warm-up), once ESTIMATE_STEPS steps are timed or ESTIMATE_SECONDS have passed.
    Slow steps must not keep a user waiting for it: when ESTIMATE_SECONDS pass before that estimate
    is due, `overdue` (which a watch thread polls while the loop is busy in a step) gives at once a
    first one, from the steps done so far or, if none is, a lower bound: the first step's time so far."""

    def __init__(self, first_step: int, clock: Callable[[], float] = time.perf_counter):
        self.first_step, self.clock = first_step, clock
        self.started = self.last = clock()
        self.times: list[float] = []  # of the steps after the first
        self.first_seconds = 0.0
        self.steps_done = 0
        self.estimated = self.warned = False
        self._lock = threading.Lock()  # the watch thread and the loop both decide what to say

    @property
    def last_step(self) -> int:
        """The last step done (first_step - 1 before any)."""
        return self.first_step - 1 + self.steps_done

    def start(self) -> None:
        self.started = self.last = self.clock()

    def lap(self) -> float:
        """Seconds since the previous step was read (or the loop started)."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        return seconds

    def step_done(self, step: int, seconds: float) -> float | None:
        """Record a finished step; the seconds per step to estimate from, the first time it is due."""
        with self._lock:
            self.steps_done += 1
            if self.estimated:
                return None
            if step > self.first_step:
                self.times.append(seconds)
            else:
                self.first_seconds = seconds
            due = len(self.times) >= ESTIMATE_STEPS or (self.times and self.clock() - self.started >= ESTIMATE_SECONDS)
            if not due:
                return None
            self.estimated = True
            return statistics.median(self.times)

    def overdue(self) -> tuple[float, bool] | None:
        """Once ESTIMATE_SECONDS have passed with no estimate yet (said once): (seconds per step, whether
        that is only a lower bound, the first step being still running)."""
        with self._lock:
            elapsed = self.clock() - self.started
            if self.estimated or self.warned or elapsed < ESTIMATE_SECONDS:
                return None
            self.warned = True
            if not self.steps_done:
                return elapsed, True
            return (statistics.median(self.times) if self.times else self.first_seconds), False

    @contextlib.contextmanager
    def watch(self, say: Callable[[float, int, str], None]) -> Iterator[None]:
        """While the body runs, a thread that calls say(seconds per step, last step done, kind) once an
        estimate is overdue; stopped and joined at the end, so that no thread outlives the run."""
        done = threading.Event()

        def run() -> None:
            while not done.wait(1.0):
                early = self.overdue()
                if early is not None:
                    per_step, lower_bound = early
                    say(per_step, self.last_step, "lower bound" if lower_bound else "early")
                    return

        thread = threading.Thread(target=run, daemon=True, name="gpt2train-estimate")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
