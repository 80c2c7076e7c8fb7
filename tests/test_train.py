import math
import re
import time

import pytest
import torch
from helpers import final_model_without_run, tiny_config

from gpt2train import GPT, GPTConfig, load_model, train
from gpt2train.training.loop import Trainer
from gpt2train.training.report import parse_step_lines

STEP_LINE = re.compile(r"^step \d+ \| loss: \d+\.\d{4} \| best_loss: \d+\.\d{4} \| time: \d+\.\d{2}s$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("run")
    # The default recipe's loading snippet reads saved_models/final_model.pt relative to the working directory.
    config = tiny_config(tmp, small_corpus, out_dir=str(tmp / "saved_models"))
    lines = []
    result = train(config, log=lines.append)
    return config, result, lines


def test_tiny_model_trains_below_the_target(trained):
    config, result, _ = trained
    assert result.reached_target
    assert result.losses[-1] < config.target_loss <= min(result.losses[:-1])
    assert result.best_loss == result.losses[-1]
    assert result.losses[0] > 5.0  # it started from scratch


def test_log_lines_follow_the_default_recipes_format(trained):
    config, result, lines = trained
    step_lines = [line for line in lines if line.startswith("step ")]
    assert step_lines and all(STEP_LINE.match(line) for line in step_lines)
    logged_steps = [int(line.split()[1]) for line in step_lines]
    assert logged_steps[:-1] == list(range(config.log_interval, result.steps, config.log_interval))
    assert logged_steps[-1] == result.steps  # the step that reached the target is always shown
    read_back = parse_step_lines("\n".join(lines))  # what the tests and benchmarks read runs' output with
    assert [s.step for s in read_back] == logged_steps
    assert (read_back[-1].loss, read_back[-1].best_loss) == (f"{result.losses[-1]:.4f}", f"{result.best_loss:.4f}")
    tail = lines[lines.index(step_lines[-1]) + 1 :]
    assert tail[:3] == [
        f"Target loss achieved! Best loss: {result.best_loss:.6f}",
        f"Final model saved at: {result.final_model_path}",
        f"Training completed. Best loss: {result.best_loss:.6f}",
    ]
    assert f"{math.exp(result.best_loss):.4f}" in tail[3]  # perplexity is exp(loss)
    assert any(line.startswith("estimated time to max steps") for line in lines)
    assert lines[0].startswith("device: cpu | dtype: float32 | parameters: ")


def test_final_model_is_fp16_with_the_tied_weight_stored_once(trained):
    config, result, _ = trained
    contents = torch.load(result.final_model_path, weights_only=True)
    assert contents["config"] == config.model.to_dict()
    state = contents["model_state_dict"]
    assert all(t.dtype == torch.float16 for t in state.values())
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    assert contents["step"] == result.steps and contents["best_loss"] == result.best_loss
    assert contents["tokenizer"] == "gpt2"
    fp16_bytes = 2 * result.model.num_params()
    assert result.final_model_path.stat().st_size < fp16_bytes + 100_000


def test_seed_loading_snippet_gives_the_trained_models_logits(trained, monkeypatch):
    config, result, _ = trained
    monkeypatch.chdir(result.final_model_path.parent.parent)
    device = "cpu"

    # The default recipe's loading snippet, unchanged.
    def load_model():
        checkpoint = torch.load('saved_models/final_model.pt')
        config = GPTConfig(checkpoint['config'])
        model = GPT(config)
        model.load_state_dict(checkpoint['model_state_dict'])
        model = model.float()
        model.to(device)
        return model

    loaded = load_model().eval()
    x = torch.randint(0, 50257, (2, config.seq_len))
    with torch.no_grad():
        expected, _ = result.model.eval()(x)
        got, _ = loaded(x)
    # fp16 keeps ~3 significant digits of each weight.
    assert torch.allclose(got, expected, atol=0.05, rtol=0.01)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.98


def test_load_model_returns_fp32_eval_model(trained):
    _, result, _ = trained
    model = load_model(result.final_model_path, device="cpu")
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_no_target_no_final_model(tmp_path, small_corpus):
    config = tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.001)
    lines = []
    result = train(config, log=lines.append)
    assert not result.reached_target and result.final_model_path is None
    assert not (tmp_path / "out").exists()
    assert any("not reached" in line and "no final model was written" in line for line in lines)


def test_training_is_reproducible_for_a_seed(tmp_path, small_corpus):
    runs = [train(tiny_config(tmp_path / name, small_corpus, max_steps=6, target_loss=0.0), log=lambda _: None)
            for name in ("a", "b")]
    assert runs[0].losses == runs[1].losses
    other = train(tiny_config(tmp_path / "c", small_corpus, max_steps=6, target_loss=0.0, seed=1),
                  log=lambda _: None)
    assert other.losses != runs[0].losses


def poison_losses(monkeypatch, bad_calls, snapshots=None):
    """Make the model's loss NaN on the given forward calls (1-based); optionally copy the weights
    seen at each call into `snapshots`."""
    original = GPT.forward
    calls = []

    def forward(self, idx, targets=None, **options):
        calls.append(None)
        if snapshots is not None:
            snapshots[len(calls)] = {k: v.clone() for k, v in self.state_dict().items()}
        logits, loss = original(self, idx, targets, **options)
        return logits, (loss * float("nan") if len(calls) in bad_calls else loss)

    monkeypatch.setattr(GPT, "forward", forward)


def test_a_nan_loss_skips_the_update_and_is_counted(tmp_path, small_corpus, monkeypatch):
    weights = {}
    poison_losses(monkeypatch, bad_calls={3, 4}, snapshots=weights)
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, log_interval=1),
                   log=lines.append)
    assert [math.isnan(x) for x in result.losses] == [False, False, True, True, False, False]
    assert "step 3: non-finite loss (nan); update skipped (1 in a row, 1 in all)" in lines
    assert "step 4: non-finite loss (nan); update skipped (2 in a row, 2 in all)" in lines
    # Steps 3 and 4 changed nothing: step 5 starts from the weights step 3 started from.
    assert all(torch.equal(weights[3][k], weights[5][k]) for k in weights[3])
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert result.status == "max_steps" and math.isfinite(result.best_loss)


def test_fp16_overflow_is_skipped_by_the_grad_scaler(tmp_path, small_corpus, monkeypatch):
    poison_losses(monkeypatch, bad_calls={2})
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, max_steps=5, warmup_steps=2, target_loss=0.0,
                               dtype="float16", log_interval=1), log=lines.append)
    assert "dtype: float16" in lines[0]
    assert any(line.startswith("step 2: non-finite") and "update skipped" in line for line in lines)
    assert math.isfinite(result.losses[-1])


def test_too_many_bad_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path, small_corpus, monkeypatch):
    poison_losses(monkeypatch, bad_calls=set(range(5, 100)))
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, max_steps=50, checkpoint_interval=2, max_bad_steps=3,
                               target_loss=0.0), log=lines.append)
    assert result.status == "diverged" and result.steps == 7  # steps 5, 6 and 7 were bad
    assert result.checkpoint_path.name == "step_00000004.pt"  # the last good one, still there
    assert "3 steps in a row had a non-finite loss" in lines[-2] and "step_00000004.pt" in lines[-2]
    assert lines[-1].startswith("loss plot")


def test_the_cli_exit_status_for_a_diverged_run_is_its_own(tmp_path, small_corpus, monkeypatch, capsys):
    from gpt2train.cli import main
    from gpt2train.training.outcome import EXIT_DIVERGED

    poison_losses(monkeypatch, bad_calls=set(range(1, 100)))
    with pytest.raises(SystemExit) as exited:
        main(["train", "--device", "cpu", "--dtype", "float32", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
              "--block-size", "32", "--seq-len", "32", "--data", str(small_corpus), "--max-bad-steps", "2",
              "--run-dir", str(tmp_path / "r"), "--out-dir", str(tmp_path / "o")])
    assert exited.value.code == EXIT_DIVERGED == 4


def test_loss_spikes_are_reported():
    from gpt2train.training.monitor import LossMonitor

    monitor = LossMonitor()
    for step in range(1, 41):
        assert monitor.observe(step, 2.0 + 0.01 * (step % 3), grad_norm=1.0, applied=True) == []
    events = monitor.observe(41, 5.0, grad_norm=1.0, applied=True)
    assert len(events) == 1 and "loss spike 5.0000" in events[0]
    assert monitor.observe(42, 2.01, grad_norm=1.0, applied=True) == []


def test_reading_each_loss_one_step_late_changes_nothing(tmp_path, small_corpus):
    """The GPU loop reads step k's loss after queuing step k+1; on the CPU, force it and compare."""
    runs = {}
    for lag in (0, 1):
        config = tiny_config(tmp_path / str(lag), small_corpus, target_loss=3.0, dropout=0.1, log_interval=1,
                             eval_interval=4, checkpoint_interval=10)
        lines = []
        trainer = Trainer(config, log=lines.append)
        trainer.lag = lag
        result = trainer.run()
        checkpoint = torch.load(result.checkpoint_path, weights_only=True)
        runs[lag] = result, [line for line in lines if line.startswith("step ")], checkpoint
    (a, lines_a, ckpt_a), (b, lines_b, ckpt_b) = runs[0], runs[1]
    assert a.reached_target and b.reached_target and a.steps == b.steps
    assert a.losses == b.losses
    strip_time = [line.rsplit(" | time", 1)[0] for line in lines_a]
    assert strip_time == [line.rsplit(" | time", 1)[0] for line in lines_b]
    assert final_model_without_run(tmp_path / "0/out/final_model.pt") == final_model_without_run(tmp_path / "1/out/final_model.pt")
    # The target step's checkpoint holds the data and random state after that step, not after the
    # step the late reader had already started.
    assert ckpt_a["sampler"] == ckpt_b["sampler"]
    assert torch.equal(ckpt_a["rng"]["torch"], ckpt_b["rng"]["torch"])
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_slow_first_step_gets_an_estimate_within_30_seconds():
    from gpt2train.training.clock import ESTIMATE_SECONDS, StepClock

    clock = FakeClock()
    steps = StepClock(first_step=1, clock=clock)
    clock.now += ESTIMATE_SECONDS - 1
    assert steps.overdue() is None  # not yet
    clock.now += 1
    assert steps.overdue() == (ESTIMATE_SECONDS, True)  # the first step has run 30 s: a lower bound, now
    assert steps.overdue() is None  # said once
    assert steps.step_done(1, 240.0) is None  # the first step pays for warm-up: not estimated from
    clock.now += 240
    assert steps.step_done(2, 200.0) == 200.0  # past 30 s: the measured estimate


def test_fast_steps_are_estimated_after_eight_and_never_warned_about():
    from gpt2train.training.clock import ESTIMATE_STEPS, StepClock

    clock = FakeClock()
    steps = StepClock(first_step=1, clock=clock)
    per_step = [steps.step_done(step, 0.1) for step in range(1, ESTIMATE_STEPS + 2)]
    assert per_step == [None] * ESTIMATE_STEPS + [0.1]
    clock.now += 60
    assert steps.overdue() is None  # estimated already: nothing more to say early


def test_a_first_step_done_but_no_estimate_due_at_30_seconds_gives_an_early_one():
    from gpt2train.training.clock import ESTIMATE_SECONDS, StepClock

    clock = FakeClock()
    steps = StepClock(first_step=1, clock=clock)
    clock.now += 25
    assert steps.step_done(1, 25.0) is None  # the first step, warm-up and all
    clock.now += ESTIMATE_SECONDS - 25
    assert steps.overdue() == (25.0, False)  # 30 s in, the second step running: an estimate now
    clock.now += 15
    assert steps.step_done(2, 15.0) == 15.0  # then the measured one


def test_while_a_slow_first_step_runs_a_watch_prints_a_lower_bound(tmp_path, small_corpus):
    from gpt2train.training.clock import ESTIMATE_SECONDS, StepClock

    lines = []
    trainer = Trainer(tiny_config(tmp_path, small_corpus, preset="gpt2", max_steps=20000, warmup_steps=5),
                      log=lines.append)
    clock = FakeClock()
    trainer.clock = StepClock(first_step=1, clock=clock)
    clock.now += ESTIMATE_SECONDS + 10  # the first step has been running 40 s
    with trainer.clock.watch(trainer._say_estimate):
        for _ in range(50):  # the watch looks once a second
            if any(line.startswith("estimated") for line in lines):
                break
            time.sleep(0.1)
    estimate = next(line for line in lines if line.startswith("estimated"))
    assert estimate.startswith("estimated time to max steps (20,000): more than 9.3 days, at more than 40 s/step")
    assert "try `--preset tiny`" in estimate


def test_the_closing_lines_are_printed_as_things_happen(tmp_path, small_corpus):
    final = tmp_path / "out" / "final_model.pt"
    seen = []

    def log(line):
        seen.append((line, final.exists(), len(list((tmp_path / "run").glob("checkpoints/*.pt")))))

    result = train(tiny_config(tmp_path, small_corpus, target_loss=5.0), log=log)
    assert result.reached_target
    closing = [(line.split("!")[0].split(":")[0], exists, checkpoints) for line, exists, checkpoints in seen
               if line.startswith(("Target loss achieved", "Final model saved at", "Training completed"))]
    assert closing == [
        ("Target loss achieved", False, 0),  # when the step is read, before anything is written
        ("Final model saved at", True, 0),  # once the final model is written
        ("Training completed. Best loss", True, 0),  # the checkpoint comes after the closing lines
    ]
    assert result.checkpoint_path.exists()


def test_a_run_that_ends_at_a_step_prints_no_estimate_for_it(tmp_path, small_corpus):
    import signal

    def run(name, stop=False):
        lines = []
        trainer = Trainer(tiny_config(tmp_path / name, small_corpus, max_steps=3, warmup_steps=1, target_loss=0.0),
                          log=lines.append)
        trainer.clock.step_done = lambda step, seconds: 0.1  # an estimate due after every step
        if stop:
            trainer.stop.request(signal.SIGTERM, "a test")  # as if SIGTERM came during step 1
        result = trainer.run()
        return result, [line for line in lines if line.startswith("estimated")]

    result, estimates = run("to-max-steps")
    assert result.steps == 3 and len(estimates) == 2  # after steps 1 and 2, not after the last one
    result, estimates = run("stopped", stop=True)
    assert result.steps == 1 and estimates == []
