"""Kill a run at any moment, resume it, and get exactly the run that was never interrupted."""

import re
import shutil
import signal
import sys

import pytest
import torch
from helpers import (
    TINY_FLAGS, final_model_without_run, logged_losses, prepare_small_corpus, quiet, run_cli, start_and_wait_for,
    tiny_config,
)

from gpt2train import train
from gpt2train.checkpoint import list_checkpoints
from gpt2train.errors import UserError

# Dropout makes the losses depend on the torch random state too, so resume must restore it.
RUN_FLAGS = [*TINY_FLAGS, "--dropout", "0.1", "--target-loss", "0.3", "--max-steps", "400", "--log-interval", "1",
             "--checkpoint-interval", "10"]


def run_args(tmp_path, data):
    return ["train", *RUN_FLAGS, "--data", data, "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*run_args(tmp, small_corpus))
    assert result.returncode == 0, result.stdout + result.stderr
    losses = logged_losses(result.stdout)
    assert max(losses) > 30  # long enough to be interrupted after a few checkpoints
    return losses, final_model_without_run(tmp / "out" / "final_model.pt")


def start_gpt2train(args, pattern: str):
    return start_and_wait_for([sys.executable, "-m", "gpt2train", *args], pattern)


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, small_corpus, uninterrupted):
    expected_losses, expected_model = uninterrupted
    proc, seen = start_gpt2train(run_args(tmp_path, small_corpus), r"checkpoint saved: .*step_00000020\.pt")
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, at whatever step it has reached
    seen += proc.stdout.readlines()
    assert proc.wait() == -signal.SIGKILL
    before_kill = logged_losses("".join(seen))
    assert all(expected_losses[step] == value for step, value in before_kill.items())
    assert not (tmp_path / "out").exists()

    # Resuming needs only the run directory: everything else comes from the checkpoint.
    resumed = run_cli("train", "--resume", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "changed on resume" not in resumed.stdout
    after = logged_losses(resumed.stdout)
    assert min(after) <= max(before_kill) + 1  # it picked up from a checkpoint, not from step 1
    assert {**before_kill, **after} == expected_losses
    assert final_model_without_run(tmp_path / "out" / "final_model.pt") == expected_model


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, small_corpus, uninterrupted):
    expected_losses, expected_model = uninterrupted
    proc, seen = start_gpt2train(run_args(tmp_path, small_corpus), r"^step 15 ")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped = re.search(r"Stopped at step (\d+): checkpoint saved at (\S+)\. Continue with: gpt2train train --resume",
                        out)
    assert stopped, out
    assert "SIGTERM received" in err and "Traceback" not in err
    step = int(stopped.group(1))
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{step:08d}.pt"

    resumed = run_cli(*run_args(tmp_path, small_corpus), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}.pt'} at step {step}" in resumed.stdout
    assert {**logged_losses("".join(seen) + out), **logged_losses(resumed.stdout)} == expected_losses
    assert final_model_without_run(tmp_path / "out" / "final_model.pt") == expected_model


def test_sighup_from_a_closed_terminal_saves_a_checkpoint_as_sigterm_does(tmp_path, small_corpus):
    proc, _ = start_gpt2train(run_args(tmp_path, small_corpus), r"^step 5 ")
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err
    stopped = re.search(r"Stopped at step (\d+): checkpoint saved at", out)
    assert stopped and "SIGHUP received" in err and "Traceback" not in err
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{int(stopped.group(1)):08d}.pt"


def test_resume_refuses_another_model_shape_or_data_and_reports_safe_changes(tmp_path, small_corpus):
    quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0))
    with pytest.raises(UserError, match=r"cannot resume with n_layer=2: the checkpoint was trained with n_layer=1"):
        quiet(tiny_config(tmp_path, small_corpus, n_layer=2, max_steps=12, resume="latest"))
    with pytest.raises(UserError, match="cannot resume with data="):
        quiet(tiny_config(tmp_path, tmp_path / "other", max_steps=12, resume="latest"))
    with pytest.raises(UserError, match="is at step 6, and max_steps is 6"):
        quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, resume="latest"))

    lines = []
    result = train(tiny_config(tmp_path, small_corpus, max_steps=12, target_loss=0.0, log_interval=2,
                               resume="latest"), log=lines.append)
    assert result.steps == 12 and len(result.losses) == 6
    assert "changed on resume: log_interval: 10 -> 2" in lines
    assert "changed on resume: max_steps: 6 -> 12" in lines


def test_resume_refuses_data_that_changed_on_disk(tmp_path):
    data = prepare_small_corpus(tmp_path / "corpus")
    quiet(tiny_config(tmp_path, data, max_steps=6, target_loss=0.0))
    from gpt2train import prepare

    (tmp_path / "corpus" / "corpus.txt").write_text("Completely different words now. " * 40)
    prepare([str(tmp_path / "corpus" / "corpus.txt")], data, overwrite=True)
    with pytest.raises(UserError, match="training data differs"):
        quiet(tiny_config(tmp_path, data, max_steps=12, target_loss=0.0, resume="latest"))


def test_a_new_run_never_replaces_an_earlier_runs_checkpoints(tmp_path, small_corpus):
    first = quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0))
    with pytest.raises(UserError, match="holds checkpoints of an earlier run .*--resume.*--overwrite"):
        quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0))
    assert list_checkpoints(tmp_path / "run") == [first.checkpoint_path]
    again = quiet(tiny_config(tmp_path, small_corpus, max_steps=7, target_loss=0.0, overwrite=True))
    assert list_checkpoints(tmp_path / "run") == [again.checkpoint_path]
    assert again.losses[:6] == first.losses


def test_a_run_that_reached_its_target_continues_only_with_a_lower_target(tmp_path, small_corpus):
    done = quiet(tiny_config(tmp_path, small_corpus, target_loss=2.0))
    assert done.reached_target
    with pytest.raises(UserError, match="already reached its target loss"):
        quiet(tiny_config(tmp_path, small_corpus, target_loss=2.0, resume="latest"))
    further = quiet(tiny_config(tmp_path, small_corpus, target_loss=1.0, resume="latest"))
    assert further.reached_target and further.steps > done.steps and further.best_loss < 1.0


def test_resume_from_a_moved_run_directory(tmp_path, small_corpus):
    quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0, keep_checkpoints=1))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    result = run_cli("train", "--resume", tmp_path / "moved", "--max-steps", "8")
    assert result.returncode == 3, result.stderr  # ran to max steps, target 0 never reached
    assert [p.name for p in list_checkpoints(tmp_path / "moved")] == ["step_00000008.pt"]


def test_a_checkpoint_of_the_format_before_checksums_and_run_ids_resumes(tmp_path, small_corpus):
    first = quiet(tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0))
    contents = torch.load(first.checkpoint_path, weights_only=True)
    del contents["run_id"]
    torch.save({**contents, "format_version": 1}, first.checkpoint_path)  # as gpt2train wrote it before
    resumed = quiet(tiny_config(tmp_path, small_corpus, max_steps=9, target_loss=0.0, resume="latest"))
    assert resumed.steps == 9
    assert torch.load(resumed.checkpoint_path, weights_only=True)["run_id"]  # it has an id from now on


def test_a_muon_run_with_the_wsd_schedule_killed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path, small_corpus):
    fast = ["--optimizer", "muon", "--schedule", "wsd", "--decay-at", "8", "--decay-fraction", "0.1",
            "--warmup-steps", "5", "--target-loss", "1.0", "--checkpoint-interval", "30"]
    args = [*run_args(tmp_path / "whole", small_corpus), *fast]
    whole = run_cli(*args)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    expected = logged_losses(whole.stdout)
    killed_args = [*run_args(tmp_path / "killed", small_corpus), *fast]
    proc, seen = start_gpt2train(killed_args, r"checkpoint saved: .*step_00000030\.pt")
    proc.send_signal(signal.SIGKILL)
    seen += proc.stdout.readlines()
    proc.wait()
    saved = torch.load(tmp_path / "killed" / "run" / "checkpoints" / "step_00000030.pt", weights_only=True)
    assert saved["schedule"]["decay_start"] is not None  # the decay had started: resume must keep it
    assert "momentum_buffer" in next(iter(saved["optimizer"]["state"].values()))  # Muon's state is in it
    resumed = run_cli("train", "--resume", tmp_path / "killed" / "run")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {**logged_losses("".join(seen)), **logged_losses(resumed.stdout)} == expected
    assert (final_model_without_run(tmp_path / "killed" / "out" / "final_model.pt")
            == final_model_without_run(tmp_path / "whole" / "out" / "final_model.pt"))
    with pytest.raises(UserError, match="cannot resume with optimizer='adamw': the checkpoint was trained with "
                                        "optimizer='muon'"):
        quiet(tiny_config(tmp_path / "killed", small_corpus, optimizer="adamw", target_loss=0.5, resume="latest"))
