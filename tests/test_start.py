"""How a run starts: one run per run directory, another run's files never touched, and what writers that
died left behind cleaned up."""

import os
import re
import signal
import socket
import sys

import pytest
import torch
from helpers import TINY_FLAGS, cli, quiet, start_and_wait_for, tiny_config

from gpt2train.checkpoint import list_checkpoints, save_checkpoint
from gpt2train.errors import UserError
from gpt2train.training.rundir import RunLock


def test_a_second_run_in_the_same_run_directory_is_refused_until_the_first_ends(tmp_path, small_corpus, capsys):
    args = ["train", *TINY_FLAGS, "--data", small_corpus, "--target-loss", "0", "--max-steps", "100000",
            "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out"]
    first, _ = start_and_wait_for([sys.executable, "-m", "gpt2train", *args], r"^step 10 ")
    try:
        code, _, err = cli(capsys, *args[:-2], "--out-dir", tmp_path / "other")
        assert code == 2 and err.count("\n") == 1
        assert f"another gpt2train run (process {first.pid}) is training in {tmp_path / 'run'}" in err
        assert not (tmp_path / "other").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    RunLock(tmp_path / "run").release()  # the OS let go of the lock with the process


def test_resuming_into_a_directory_that_holds_another_run_is_refused(tmp_path, small_corpus):
    quiet(tiny_config(tmp_path / "a", small_corpus, max_steps=6, target_loss=0.0))
    quiet(tiny_config(tmp_path / "b", small_corpus, max_steps=8, target_loss=0.0))
    before = list_checkpoints(tmp_path / "b" / "run")
    with pytest.raises(UserError, match="holds checkpoints of another run .*step_00000008.pt.*own run directory"):
        quiet(tiny_config(tmp_path / "a", small_corpus, max_steps=12, target_loss=0.0,
                          resume=str(tmp_path / "a" / "run"), run_dir=str(tmp_path / "b" / "run")))
    assert list_checkpoints(tmp_path / "b" / "run") == before


def test_pruning_keeps_the_newest_of_this_runs_checkpoints_and_every_other_runs(tmp_path):
    def body(run_id):
        return {"config": {}, "best_loss": 1.0, "model": {"w": torch.zeros(2)}, "optimizer": {}, "scaler": {},
                "rng": {}, "sampler": {}, "monitor": {}, "data": {}, "run_id": run_id}

    save_checkpoint(tmp_path, 50, body("other"), keep=1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, body("mine"), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt", "step_00000050.pt"]


def test_a_start_removes_what_dead_writers_left_and_nothing_a_live_one_writes(tmp_path, small_corpus):
    config = tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0)
    checkpoints, out = tmp_path / "run" / "checkpoints", tmp_path / "out"
    checkpoints.mkdir(parents=True)
    out.mkdir()
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
    dead = out / f".final_model.pt.{host}-{2**22 + 12345}.k3x9q2ab.tmp"  # no such process
    live = out / f".final_model.pt.{host}-{os.getpid()}.p0d8w1zz.tmp"  # this process: still writing
    killed = checkpoints / ".step_00000020.pt.abc123.tmp"  # a checkpoint writer killed mid-write
    for leftover in (dead, live, killed):
        leftover.write_bytes(b"PK partial")
    quiet(config)
    assert not dead.exists() and not killed.exists()
    assert live.exists()
