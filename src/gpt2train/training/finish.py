"""The end of a run: what each way of ending writes and says, and the run records closed."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import latest_checkpoint
from ..errors import UserError, one_line
from ..files import WriteError
from ..final_model import final_model_path, save_final_model
from ..metrics import RunRecorder
from ..plot import plot_run
from . import distributed
from .outcome import Outcome
from .report import (
    Log, diverged_line, end_checkpoint_lost, final_model_lost, out_of_steps_line, stopped_line, target_checkpoint_lost,
    target_lines,
)
from .setup import Setup


@dataclass
class Ended:
    """What the end of a run left."""

    final_model: Path | None = None  # written at the target
    checkpoint: Path | None = None  # the newest checkpoint
    failure: str | None = None  # the final model could not be written: what happened, and how to get it


class Background:
    """A write run on a thread of its own; `result()` waits for it: (its return value, or None and why
    it failed).

    While it runs, Python's threads take turns with the GIL every 0.2 ms instead of every 5: torch's
    zip writer hands the GIL back and forth thousands of times per checkpoint, and each time, with the
    plot being drawn on the main thread, it would wait out the rest of the plot's turn (2 s more for
    GPT-2 124M's checkpoint on two cores).
    """

    SWITCH_INTERVAL = 0.0002

    def __init__(self, write: Callable[[], Path]):
        self._value: Path | None = None
        self._error: str | None = None
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self.SWITCH_INTERVAL, self._switch_interval))
        self._thread = threading.Thread(target=self._run, args=(write,), name="gpt2train-writer")
        self._thread.start()

    def _run(self, write: Callable[[], Path]) -> None:
        try:
            self._value = write()
        except Exception as e:  # noqa: BLE001 - reported by the caller, in one line
            self._error = _reason(e)

    def result(self) -> tuple[Path | None, str | None]:
        self._thread.join()
        sys.setswitchinterval(self._switch_interval)
        return self._value, self._error


def _reason(error: Exception) -> str:
    """Why a write failed, in one line. Any exception counts: a writer may fail in any way (torch's
    zip writer reports some failed writes as RuntimeErrors)."""
    return error.reason if isinstance(error, WriteError) else one_line(error)


class Ending:
    """Ends a run after its last step: `finish` writes what the outcome calls for and says so."""

    def __init__(self, setup: Setup, log: Log, recorder: RunRecorder | None):
        self.setup, self.log, self.recorder = setup, log, recorder

    def finish(self, outcome: Outcome, step: int, best: float, position: dict | None) -> Ended:
        """Write what `outcome` calls for after `step` and say so. `position` is where the data stood
        after `step`, when it has already moved on (a step queued after it was dropped)."""
        s, config = self.setup, self.setup.config
        writing = None
        if outcome == Outcome.TARGET_REACHED:
            ended, writing = self._reached_target(step, best, position)
        elif outcome == Outcome.DIVERGED:
            ended = Ended(checkpoint=latest_checkpoint(config.run_dir))
            self.log(diverged_line(step, s.monitor.bad_in_a_row, ended.checkpoint))
        elif outcome == Outcome.INTERRUPTED:
            ended = Ended(checkpoint=self._last_checkpoint(step, None, position))
            self.log(stopped_line(step, ended.checkpoint, config.run_dir, s.world))
        else:
            ended = Ended(checkpoint=self._last_checkpoint(step, Outcome.MAX_STEPS, None))
            self.log(out_of_steps_line(config, best, ended.checkpoint))
        self._close_records()  # while the target's checkpoint is being written
        if writing is not None:
            ended.checkpoint, error = writing.result()  # the run ends once the checkpoint is complete
            if error is not None:
                self.log(target_checkpoint_lost(step, error, latest_checkpoint(config.run_dir)))
        return ended

    def _last_checkpoint(self, step: int, finished: Outcome | None, position: dict | None) -> Path:
        """The checkpoint a run that stops short of its target ends with; one that cannot be written
        ends the run with the line that says what is lost."""
        try:
            return self.setup.checkpointer.save(step, finished, position)
        except WriteError as e:
            self._close_records()
            raise UserError(end_checkpoint_lost(step, e.reason, latest_checkpoint(self.setup.config.run_dir),
                                                self.setup.config.run_dir)) from None

    def _reached_target(self, step: int, best: float, position: dict | None) -> tuple[Ended, Background | None]:
        """The final model, then the checkpoint of the target step (which lets --resume train further
        with a lower target): in the background once the final model is safe, else at once, so that
        whatever fails the weights reach the disk in one of them, if they can at all, before anything
        else runs. A failed final model is `Ended.failure`; the checkpoint still being written is the
        Background returned."""
        s, config = self.setup, self.setup.config
        self.log(f"Target loss achieved! Best loss: {best:.6f}")
        contents = s.state.collect(position)  # a collective; from here on rank 0 alone writes
        final_path = final_model_path(config.out_dir, config.format)
        ended, writing = Ended(), None
        if s.world.is_main:
            final_error = None
            try:
                save_final_model(s.model, final_path, step=step, best_loss=best, state=contents["model"],
                                 run={"id": s.start.run_id, "dir": str(Path(config.run_dir).resolve())})
            except Exception as e:  # noqa: BLE001 - whatever failed, the weights go to the checkpoint next
                final_error = _reason(e)
            writing = Background(lambda: s.checkpointer.write(step, contents, Outcome.TARGET_REACHED))
            if final_error is None:
                ended.final_model = final_path
                for line in target_lines(best, final_path):
                    self.log(line)
            else:
                ended.checkpoint, checkpoint_error = writing.result()
                ended.failure = final_model_lost(final_path, final_error, step, ended.checkpoint, checkpoint_error,
                                                 config)
                writing = None
        distributed.barrier(s.world)
        return ended, writing

    def _close_records(self) -> None:
        """Finish metrics.jsonl and draw loss.png."""
        if self.recorder is None:
            return
        self.recorder.close()
        try:
            self.log(f"loss plot: {plot_run(self.setup.config.run_dir)}")
        except UserError as e:  # matplotlib is optional; a plot is never worth failing a run for
            self.log(f"loss plot not drawn: {e}")
