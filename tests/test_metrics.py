import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from helpers import quiet, run_cli, tiny_config

from gpt2train import plot, train
from gpt2train.config import resolve_config
from gpt2train.errors import UserError
from gpt2train.metrics import read_metrics
from gpt2train.plot import plot_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("records")
    config = tiny_config(tmp, small_corpus, max_steps=12, target_loss=0.0, log_interval=2, eval_interval=4)
    return config, quiet(config)


def test_the_run_directory_holds_the_config_it_ran_with(run):
    config, _ = run
    written = resolve_config(config_file=f"{config.run_dir}/config.toml")
    assert written == config


def test_metrics_has_a_line_per_logged_step_and_val_loss_at_evaluations(run):
    config, result = run
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for record in records:
        assert record["loss"] == result.losses[record["step"] - 1]
        assert {"best_loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= record.keys()
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    assert all(r["val_perplexity"] > 1 and r["val_bits_per_byte"] > 0 for r in records if "val_loss" in r)


def test_a_resumed_run_keeps_one_history(tmp_path, small_corpus):
    quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, log_interval=1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a run killed after its last checkpoint leaves behind
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    quiet(tiny_config(tmp_path, small_corpus, max_steps=9, target_loss=0.0, log_interval=1, resume="latest"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 10))


def test_validation_loss_can_be_the_target(tmp_path, small_corpus):
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, target_metric="val", eval_interval=5, target_loss=9.0),
                   log=lines.append)
    assert result.reached_target and result.steps % 5 == 0
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert vals[-1] < 9.0 <= min(vals[:-1], default=9.0)
    assert f"Target loss achieved! Best loss: {vals[-1]:.6f}" in lines


def test_a_val_target_not_reached_quotes_the_validation_loss(tmp_path, small_corpus):
    lines = []
    result = train(tiny_config(tmp_path, small_corpus, target_metric="val", eval_interval=3, max_steps=6,
                               target_loss=0.001), log=lines.append)
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    closing = next(line for line in lines if line.startswith("Target loss 0.001 not reached"))
    assert f"(best validation loss: {min(vals):.6f}," in closing and result.best_loss == min(vals)


def test_val_target_without_evaluations_is_refused():
    with pytest.raises(UserError, match="target_metric val needs evaluations"):
        resolve_config(overrides={"target_metric": "val", "eval_interval": 0})


def test_loss_png_is_drawn_at_the_end_and_on_demand(run):
    pytest.importorskip("matplotlib")
    config, _ = run
    assert (Path(config.run_dir) / "loss.png").is_file()  # drawn when the run ended
    png = plot_run(config.run_dir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("plot", config.run_dir)
    assert again.returncode == 0 and f"loss plot: {png}" in again.stdout


def test_the_plot_is_warmed_up_by_a_drawing_of_its_own_which_the_real_one_waits_for(run, monkeypatch):
    pytest.importorskip("matplotlib")
    config, _ = run
    saved, save = [], plot._save

    def slow_warm_up(fig, f):
        if threading.current_thread().name == "gpt2train-plot-warm-up":
            time.sleep(0.5)
        save(fig, f)
        saved.append(threading.current_thread() is threading.main_thread())

    monkeypatch.setattr(plot, "_save", slow_warm_up)
    plot.warm_up()
    plot_run(config.run_dir)
    assert saved == [False, True]  # a whole figure drawn on the warm-up's thread, then the run's


def test_plot_without_matplotlib_says_how_to_get_it(run, monkeypatch):
    config, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"-m pip install 'matplotlib>=3.7'"):
        plot_run(config.run_dir)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path, small_corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, log_interval=3, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [3, 6]


def test_wandb_gets_the_config_and_every_record(tmp_path, small_corpus, monkeypatch):
    calls = []
    fake_run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                                     finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or fake_run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, log_interval=3, wandb=True,
                         wandb_project="demo")
    quiet(config)
    init = calls[0][1]
    assert init["project"] == "demo" and init["config"] == config.to_flat_dict() and init["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log"] == [3, 6]
    assert calls[-1] == ("finish",)
