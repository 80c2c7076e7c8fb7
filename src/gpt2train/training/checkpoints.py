"""When the run's checkpoints are written, and how: one due during training, the saves at the end of
a run (the target's final model and checkpoint, the checkpoints of a stopped run and of one out of
steps), and restoring a run from one. checkpoint.py is the file format; state.py what a checkpoint
is made of.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import checkpoint_path, latest_checkpoint, save_checkpoint
from ..config import TrainConfig
from ..errors import UserError, one_line
from ..files import WriteError, write_fix
from ..final_model import final_model_path, save_final_model
from ..model import GPT
from . import distributed
from .distributed import World
from .outcome import Outcome
from .state import RunState


@dataclass
class EndSaves:
    """What the saves at the end of a run left."""

    checkpoint: Path | None = None  # the newest checkpoint
    final_model: Path | None = None  # written at the target
    final_path: Path | None = None  # where the final model was to be written
    final_error: str | None = None  # why it could not be, in one line
    checkpoint_error: str | None = None  # why the last checkpoint could not be written
    writing: Background | None = None  # the target's checkpoint, still being written: wait with `result()`


class Checkpointer:
    """The run's checkpoints: when one is due (`due`), writing one after a step (`save_after`), at the
    end (`save_at_end`) or at any step (`save`), and restoring the run from one (`restore`). Rank 0
    decides and writes; saving is a collective.

    With checkpoint_interval N, one every N steps. With 0 (automatic), by the clock: the first after
    FIRST_CHECKPOINT_SECONDS of training, then one every CHECKPOINT_SECONDS, so that a run killed at
    any moment loses at most that much training, and a short run is not slowed by many writes.
    """

    FIRST_CHECKPOINT_SECONDS = 60.0
    CHECKPOINT_SECONDS = 600.0

    def __init__(self, config: TrainConfig, state: RunState, run_id: str, data: dict, world: World = World(),
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.state, self.run_id, self.data, self.world = config, state, run_id, data, world
        self.directory = Path(config.run_dir) / "checkpoints"
        self.interval = config.checkpoint_interval
        self.clock = clock
        self.last_saved = clock()  # (re)set when training starts
        self.saved = False  # by this process

    def start(self) -> None:
        """Training starts now: the automatic checkpoints are timed from here."""
        self.last_saved = self.clock()

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint falls after `step` (never after the last one: the run's end
        writes one anyway). Rank 0's decision; the step's flags carry it to the others."""
        if not self.world.is_main or step >= self.config.max_steps:
            return False
        if self.interval:
            return step % self.interval == 0
        wait = self.CHECKPOINT_SECONDS if self.saved else self.FIRST_CHECKPOINT_SECONDS
        return self.clock() - self.last_saved >= wait

    def describe(self) -> str:
        """The line that says when checkpoints are written."""
        if self.interval:
            when = f"every {self.interval:,} steps"
        else:
            when = (f"after {_minutes(self.FIRST_CHECKPOINT_SECONDS)} of training, then every "
                    f"{_minutes(self.CHECKPOINT_SECONDS)}")
        return f"checkpoints {when}, at the end and when stopped, in {self.directory}"

    def save_after(self, step: int, due: bool, bad_in_a_row: int, position: dict | None = None) -> str | None:
        """Once `step` is read: the checkpoint `due` asked for (as every rank learnt it with the step's
        numbers), unless the step is one of a run of bad steps, whose last good checkpoint is the one
        to go back to; the line that says how it went. `position` as in `RunState.collect`.

        One that cannot be written (a full disk) costs nothing yet: the weights are in memory. So the
        run goes on, and tries again when the next checkpoint is due (not at every step: a large one
        would fill the disk again each time); until one is written, a stop or a crash loses the
        training since the last one."""
        if not due or bad_in_a_row:
            return None
        try:
            return f"checkpoint saved: {self.save(step, position=position)}"
        except WriteError as e:
            self.last_saved = self.clock()
            return checkpoint_not_written(step, e.reason, write_fix(e.code), latest_checkpoint(self.config.run_dir))

    def save_at_end(self, outcome: Outcome, model: GPT, step: int, best: float, position: dict | None) -> EndSaves:
        """What a run that ends as `outcome` after `step` writes (a collective). `position` is where the
        data stood after `step`, when it has already moved on (a step queued after it was dropped).

        At the target, the final model, then the checkpoint of the target step (which lets --resume
        train further with a lower target): in the background once the final model is safe, else at
        once, so that whatever fails the weights reach the disk in one of them, if they can at all,
        before anything else runs. Stopped or out of steps: a checkpoint. Diverged: none, so that the
        newest is the last good one.
        """
        if outcome == Outcome.DIVERGED:
            return EndSaves(checkpoint=latest_checkpoint(self.config.run_dir))
        if outcome in (Outcome.INTERRUPTED, Outcome.MAX_STEPS):
            try:
                if outcome == Outcome.MAX_STEPS:
                    return EndSaves(checkpoint=self.save(step, Outcome.MAX_STEPS))
                return EndSaves(checkpoint=self.save(step, position=position))
            except WriteError as e:  # the run ends saying what is lost
                return EndSaves(checkpoint=latest_checkpoint(self.config.run_dir), checkpoint_error=e.reason)
        contents = self.state.collect(position)  # a collective; from here on rank 0 alone writes
        saves = EndSaves(final_path=final_model_path(self.config.out_dir, self.config.format))
        if self.world.is_main:
            try:
                save_final_model(model, saves.final_path, step=step, best_loss=best, state=contents["model"],
                                 run={"id": self.run_id, "dir": str(Path(self.config.run_dir).resolve())})
                saves.final_model = saves.final_path
            except Exception as e:  # noqa: BLE001 - whatever failed, the weights go to the checkpoint next
                saves.final_error = _reason(e)
            saves.writing = Background(lambda: self.write(step, contents, Outcome.TARGET_REACHED))
            if saves.final_error is not None:
                saves.checkpoint, saves.checkpoint_error = saves.writing.result()
                saves.writing = None
        distributed.barrier(self.world)
        return saves

    def save(self, step: int, finished: Outcome | None = None, position: dict | None = None) -> Path:
        """Collect the run's state and write the checkpoint of `step`: a collective (every rank calls
        it, rank 0 writes). `position` as in `RunState.collect`."""
        contents = self.state.collect(position)
        try:
            return self.write(step, contents, finished) if self.world.is_main else checkpoint_path(self.config.run_dir, step)
        finally:
            distributed.barrier(self.world)  # also after a failed write: every rank goes on together

    def write(self, step: int, contents: dict, finished: Outcome | None = None) -> Path:
        """Rank 0: write the checkpoint of `step` from what `state.collect()` gave."""
        record = {
            "config": self.config.to_flat_dict(),
            "run_id": self.run_id,
            "best_loss": contents["monitor"]["best_loss"],
            "finished": str(finished or ""),
            "world_size": self.world.size,
            "data": self.data,
        }
        path = save_checkpoint(self.config.run_dir, step, {**record, **contents}, keep=self.config.keep_checkpoints)
        self.last_saved, self.saved = self.clock(), True
        return path

    def restore(self, saved: dict, path: Path) -> int:
        """Load a checkpoint's contents into the run's parts; returns its step."""
        if saved["data"] != self.data:
            raise UserError(
                f"the training data differs from the one {path} was trained on ({saved['data']['source']}, "
                f"{saved['data']['train_tokens']:,} tokens): resume with the same data, or start a new run"
            )
        try:
            self.state.restore(saved)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}): is it from another "
                            "run?") from None
        return saved["step"]


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


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minute{'' if seconds == 60 else 's'}"


def checkpoint_not_written(step: int, error: str, fix: str, last: Path | None) -> str:
    """The line for a periodic checkpoint that failed; the run goes on."""
    return (f"warning: could not write the checkpoint of step {step} ({error}): {fix}; training goes on and tries "
            f"again at the next checkpoint, and until one is written a stop or a crash goes back to "
            f"{last or 'the start'}")
