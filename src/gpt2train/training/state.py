"""A run's saveable state: every stateful part registered once (`RunState`), and the checkpoints
made of it (`Checkpointer`: when one is due, writing it, restoring a run from one).

A part is anything with `state_dict()` and `load_state_dict(state)`. Shared parts are the same on
every rank (the weights, the optimizer, the loss scaler, the loss monitor); per-rank parts are each
rank's own (its data position and its random generators). A checkpoint stores each part under its
name, rank 0's per-rank parts at the top level and the other ranks' in `other_ranks`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..checkpoint import checkpoint_path, latest_checkpoint, save_checkpoint
from ..config import TrainConfig
from ..errors import UserError
from ..files import WriteError, write_fix
from . import distributed
from .distributed import World
from .outcome import Outcome

class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RandomState:
    """Every global random generator (Python, NumPy, torch CPU and CUDA), as tensors and plain values."""

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
        return {
            "python": random.getstate(),
            "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        numpy_state = dict(state["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
        np.random.set_state(numpy_state)
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunState:
    """The run's stateful parts by name, saved and restored together, in the order registered."""

    def __init__(self, world: World = World()):
        self.world = world
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}
        self.optional: set[str] = set()

    def register(self, name: str, part: Stateful, per_rank: bool = False, optional: bool = False) -> None:
        """Add a part; an `optional` one may be missing from a checkpoint (it keeps its state then)."""
        (self.per_rank if per_rank else self.shared)[name] = part
        if optional:
            self.optional.add(name)

    def position(self) -> dict:
        """This rank's own parts: where its data and random generators stand."""
        return {name: part.state_dict() for name, part in self.per_rank.items()}

    def collect(self, position: dict | None = None) -> dict:
        """Every part's state (a collective: every rank calls it; rank 0's result is the one to save).

        `position` replaces this rank's current position (see Pipeline: with lag 1 the data is
        already one step further than the weights).
        """
        contents = {name: part.state_dict() for name, part in self.shared.items()}
        positions = distributed.gather(position or self.position(), self.world)
        return {**contents, **positions[0], "other_ranks": positions[1:]}

    def restore(self, saved: dict) -> None:
        """Load every part from a checkpoint's contents. Each rank goes on from its own position; with
        another world size, all from rank 0's."""
        others = saved.get("other_ranks", [])
        rank = self.world.rank
        position = others[rank - 1] if rank > 0 and len(others) == self.world.size - 1 else saved
        for name, part in self.shared.items():
            if name in saved or name not in self.optional:
                part.load_state_dict(saved[name])
        for name, part in self.per_rank.items():  # last: building the model drew from the generators
            part.load_state_dict(position[name])


class Checkpointer:
    """The run's checkpoints: when one is due (`should_save`), writing one (`save`), and restoring
    the run from one (`restore`). Rank 0 decides and writes; saving is a collective.

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

    def should_save(self, step: int) -> bool:
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

    def save(self, step: int, finished: Outcome | None = None, position: dict | None = None) -> Path:
        """Collect the run's state and write the checkpoint of `step`: a collective (every rank calls
        it, rank 0 writes). `position` as in `RunState.collect`."""
        contents = self.state.collect(position)
        try:
            return self.write(step, contents, finished) if self.world.is_main else checkpoint_path(self.config.run_dir, step)
        finally:
            distributed.barrier(self.world)  # also after a failed write: every rank goes on together

    def save_periodic(self, step: int, position: dict | None = None) -> str:
        """Write the periodic checkpoint of `step`, as `save` does; the line that says how it went.

        One that cannot be written (a full disk) costs nothing yet: the weights are in memory. So the
        run goes on, and tries again when the next checkpoint is due (not at every step: a large one
        would fill the disk again each time); until one is written, a stop or a crash loses the
        training since the last one."""
        try:
            return f"checkpoint saved: {self.save(step, position=position)}"
        except WriteError as e:
            self.last_saved = self.clock()
            return checkpoint_not_written(step, e.reason, write_fix(e.code), latest_checkpoint(self.config.run_dir))

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


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minute{'' if seconds == 60 else 's'}"


def checkpoint_not_written(step: int, error: str, fix: str, last: Path | None) -> str:
    """The line for a periodic checkpoint that failed; the run goes on."""
    return (f"warning: could not write the checkpoint of step {step} ({error}): {fix}; training goes on and tries "
            f"again at the next checkpoint, and until one is written a stop or a crash goes back to "
            f"{last or 'the start'}")

