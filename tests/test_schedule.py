"""The learning-rate schedules, at their corners."""

import pytest

from gpt2train.training.schedule import WarmupStableDecay

# Warmup 10, max_lr 1, min_lr 0.1, 100 steps, the last 20 of them the decay.
def wsd(**options):
    return WarmupStableDecay(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, decay_steps=20, **options)


def test_wsd_warms_up_holds_then_decays_over_its_last_steps():
    schedule = wsd()
    assert schedule.lr(1) == pytest.approx(0.1) and schedule.lr(10) == 1.0  # the warmup ends at the peak
    assert schedule.lr(11) == schedule.lr(80) == 1.0  # stable until the decay's first step, 81
    assert schedule.lr(81) == pytest.approx(1.0 - 0.9 / 20)
    assert schedule.lr(90) == pytest.approx(0.55)  # half way down a straight line
    assert schedule.lr(100) == pytest.approx(0.1) and schedule.lr(150) == pytest.approx(0.1)  # min_lr at max_steps


def test_wsd_tied_to_the_target_starts_its_decay_two_steps_after_the_loss_comes_close():
    schedule = wsd(decay_at=8.0, target_loss=0.1)
    schedule.observe(30, 0.81)
    assert schedule.decay_start is None and schedule.lr(32) == 1.0
    schedule.observe(31, 0.79)  # below 8 x the target
    assert schedule.decay_start == 33
    assert schedule.lr(32) == 1.0 and schedule.lr(33) == pytest.approx(1.0 - 0.9 / 20)
    assert schedule.lr(52) == pytest.approx(0.1) and schedule.lr(80) == pytest.approx(0.1)  # 20 steps, then held
    schedule.observe(40, 0.01)
    assert schedule.decay_start == 33  # once
    resumed = wsd(decay_at=8.0, target_loss=0.1)
    resumed.load_state_dict(schedule.state_dict())
    assert [resumed.lr(s) for s in range(1, 101)] == [schedule.lr(s) for s in range(1, 101)]


def test_without_decay_at_the_loss_does_not_move_the_decay():
    schedule = wsd()
    schedule.observe(5, 0.0)
    assert schedule.decay_start is None and schedule.lr(50) == 1.0
