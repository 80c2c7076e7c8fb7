"""A run's saveable state: every stateful part registered once (`RunState`), and the checkpoints
made of it (`Checkpointer`: when one is due, writing it, restoring a run from one).

A part is anything with `state_dict()` and `load_state_dict(state)`. Shared parts are the same on
every rank (the weights, the optimizer, the loss scaler, the loss monitor); per-rank parts are each
rank's own (its data position and its random generators). A checkpoint stores each part under its
name, rank 0's per-rank parts at the top level and the other ranks' in `other_ranks`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..checkpoint import checkpoint_path, save_checkpoint
from ..config import TrainConfig
from ..errors import UserError
from ..progress import format_duration
from . import distributed
from .distributed import World
from .outcome import Outcome

# With checkpoint_interval 0, checkpoints are spaced to about this much training time.
AUTO_CHECKPOINT_SECONDS = 600.0


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

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        (self.per_rank if per_rank else self.shared)[name] = part

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
            part.load_state_dict(saved[name])
        for name, part in self.per_rank.items():  # last: building the model drew from the generators
            part.load_state_dict(position[name])


class Checkpointer:
    """The run's checkpoints: when one is due (`should_save`), writing one (`save`), and restoring
    the run from one (`restore`). Rank 0 decides and writes; saving is a collective."""

    def __init__(self, config: TrainConfig, state: RunState, run_id: str, data: dict, world: World = World()):
        self.config, self.state, self.run_id, self.data, self.world = config, state, run_id, data, world
        self.directory = Path(config.run_dir) / "checkpoints"
        self.interval = config.checkpoint_interval  # 0: chosen from the step time, once it is measured

    def should_save(self, step: int) -> bool:
        """Whether a periodic checkpoint falls after `step`: every `interval` steps, but not at the
        last step (the run's end writes one anyway). Rank 0's decision; the step's flags carry it to
        the others."""
        return (self.world.is_main and bool(self.interval) and step % self.interval == 0
                and step < self.config.max_steps)

    def pace(self, seconds_per_step: float) -> str | None:
        """With an automatic interval, choose it from the measured step time: the line saying so."""
        if self.interval:
            return None
        steps = max(1.0, AUTO_CHECKPOINT_SECONDS / max(seconds_per_step, 1e-9))
        magnitude = 10 ** math.floor(math.log10(steps))  # rounded down to 1, 2 or 5 x 10^k steps
        self.interval = int(max(m * magnitude for m in (1, 2, 5) if m * magnitude <= steps))
        return self.describe(self.interval * seconds_per_step)

    def describe(self, seconds: float | None = None) -> str | None:
        """The line that says when checkpoints are written, once the interval is known."""
        if not self.interval:
            return None
        about = f" (about {format_duration(seconds)})" if seconds is not None else ""
        return f"checkpoints every {self.interval:,} steps{about}, at the end and when stopped, in {self.directory}"

    def save(self, step: int, finished: Outcome | None = None, position: dict | None = None,
             contents: dict | None = None) -> Path:
        """Write the checkpoint of `step` (a collective). `contents` is what `state.collect()` gave,
        when the caller has it already; `position` as in `collect`."""
        contents = contents if contents is not None else self.state.collect(position)
        path = checkpoint_path(self.config.run_dir, step)
        if self.world.is_main:
            record = {
                "config": self.config.to_flat_dict(),
                "run_id": self.run_id,
                "best_loss": contents["monitor"]["best_loss"],
                "finished": str(finished or ""),
                "world_size": self.world.size,
                "data": self.data,
            }
            path = save_checkpoint(self.config.run_dir, step, {**record, **contents},
                                   keep=self.config.keep_checkpoints)
        distributed.barrier(self.world)
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
