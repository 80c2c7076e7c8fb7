"""The run's state: every part registered once, and checkpoints due by the step count or by the clock."""

import re

import torch
from helpers import tiny_config

from gpt2train import train
from gpt2train.checkpoint import read_checkpoint
from gpt2train.training.checkpoints import Checkpointer
from gpt2train.training.state import RandomState, RunState


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_the_registry_saves_and_restores_every_part_under_its_name():
    state = RunState()
    shared, mine = Counter(3), Counter(7)
    state.register("shared", shared)
    state.register("mine", mine, per_rank=True)
    state.register("rng", RandomState(), per_rank=True)
    saved = state.collect()
    assert saved["shared"] == {"value": 3} and saved["mine"] == {"value": 7} and saved["other_ranks"] == []
    expected = torch.rand(3)  # what the generator gives next from where it was saved
    shared.value = mine.value = 0
    state.restore(saved)
    assert (shared.value, mine.value) == (3, 7)
    assert torch.equal(torch.rand(3), expected)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_automatic_checkpoints_come_after_a_minute_of_training_then_every_ten(tmp_path, small_corpus):
    clock = Clock()
    config = tiny_config(tmp_path, small_corpus, checkpoint_interval=0, max_steps=10_000)
    checkpointer = Checkpointer(config, RunState(), "run", {}, clock=clock)
    checkpointer.start()
    clock.now = 59.0
    assert not checkpointer.due(100)
    clock.now = 60.0
    assert checkpointer.due(101)  # the first within about a minute, whatever the step time
    checkpointer.last_saved, checkpointer.saved = clock.now, True  # as write() records it
    clock.now = 60.0 + 599.0
    assert not checkpointer.due(5000)
    clock.now = 60.0 + 600.0
    assert checkpointer.due(5001)
    assert not checkpointer.due(10_000)  # never at the last step: the end writes one anyway
    assert "checkpoints after 1 minute of training, then every 10 minutes" in checkpointer.describe()


def test_a_run_with_the_automatic_interval_writes_its_first_checkpoint_early(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setattr(Checkpointer, "FIRST_CHECKPOINT_SECONDS", 0.0)  # "a minute" made instant
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, checkpoint_interval=0, max_steps=12, target_loss=0.0),
                   log=lines.append)
    saved = [line for line in lines if line.startswith("checkpoint saved: ")]
    assert len(saved) == 1  # the first one, at step 1; the next would be 10 minutes later
    assert re.search(r"step_00000001\.pt$", saved[0])
    assert read_checkpoint(result.checkpoint_path)["step"] == 12
