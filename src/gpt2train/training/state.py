"""What a checkpoint is made of: every stateful part of a run registered once (`RunState`).

A part is anything with `state_dict()` and `load_state_dict(state)`. Shared parts are the same on
every rank (the weights, the optimizer, the loss scaler, the loss monitor); per-rank parts are each
rank's own (its data position and its random generators). A checkpoint stores each part under its
name, rank 0's per-rank parts at the top level and the other ranks' in `other_ranks`.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np
import torch

from . import distributed
from .distributed import World


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
