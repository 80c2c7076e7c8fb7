"""The end of a run: what each way of ending writes and says, and the run records closed."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import latest_checkpoint
from ..errors import UserError
from ..final_model import final_model_path, save_final_model
from ..metrics import RunRecorder
from ..plot import plot_run
from . import distributed
from .outcome import Outcome
from .report import Log, diverged_line, out_of_steps_line, stopped_line, target_lines
from .setup import Setup


class Ending:
    """Ends a run after its last step: `finish` writes what the outcome calls for and says so."""

    def __init__(self, setup: Setup, log: Log, recorder: RunRecorder | None):
        self.setup, self.log, self.recorder = setup, log, recorder

    def finish(self, outcome: Outcome, step: int, best: float, position: dict | None) -> tuple[Path | None, Path | None]:
        """The final model (at the target) and the newest checkpoint. `position` is where the data stood
        after `step`, when it has already moved on (a step queued after it was dropped)."""
        s, config = self.setup, self.setup.config
        final_path = None
        if outcome == Outcome.TARGET_REACHED:
            final_path, checkpoint = self._reached_target(step, best, position)
        elif outcome == Outcome.DIVERGED:
            checkpoint = latest_checkpoint(config.run_dir)
            self.log(diverged_line(step, s.monitor.bad_in_a_row, checkpoint))
        elif outcome == Outcome.INTERRUPTED:
            checkpoint = s.checkpointer.save(step, position=position)
            self.log(stopped_line(step, checkpoint, config.run_dir, s.world))
        else:
            checkpoint = s.checkpointer.save(step, Outcome.MAX_STEPS)
            self.log(out_of_steps_line(config, best))
        self._close_records()
        return final_path, checkpoint

    def _reached_target(self, step: int, best: float, position: dict | None) -> tuple[Path, Path]:
        """The final model, the seed's lines as each comes true, then the checkpoint."""
        s, config = self.setup, self.setup.config
        self.log(f"Target loss achieved! Best loss: {best:.6f}")
        contents = s.state.collect(position)
        final_path = final_model_path(config.out_dir, config.format)
        if s.world.is_main:
            save_final_model(s.model, final_path, step=step, best_loss=best, state=contents["model"],
                             run={"id": s.start.run_id, "dir": str(Path(config.run_dir).resolve())})
        distributed.barrier(s.world)
        for line in target_lines(best, final_path):
            self.log(line)
        return final_path, s.checkpointer.save(step, Outcome.TARGET_REACHED, contents=contents)

    def _close_records(self) -> None:
        """Finish metrics.jsonl and draw loss.png."""
        if self.recorder is None:
            return
        self.recorder.close()
        try:
            self.log(f"loss plot: {plot_run(self.setup.config.run_dir)}")
        except UserError as e:  # matplotlib is optional; a plot is never worth failing a run for
            self.log(f"loss plot not drawn: {e}")
