"""The end of a run at its target: whatever fails, the trained weights end up on disk, and the run says
where and how to write the final model from them. Tested with real faults: a full file system and a
file-size limit."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_FLAGS, final_model_without_run, run_cli, small_file_system

from gpt2train.checkpoint import read_checkpoint

# The tests' tiny model reaches a target of 100 at its first step. Its final model is 3.2 MB (fp16);
# its checkpoint, with the AdamW moments in fp32, 19.5 MB.
RUN = ["train", *TINY_FLAGS, "--target-loss", "100"]


def run_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """`python -m gpt2train ARGS` where no file may grow beyond `limit` bytes (writes past it fail with
    EFBIG, as on a file system that is full for large files)."""

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "gpt2train", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limit_files, timeout=600)


@pytest.fixture(scope="module")
def normal_end(tmp_path_factory, small_corpus):
    """The same run with room to write: its final model."""
    tmp = tmp_path_factory.mktemp("normal")
    result = run_cli(*RUN, "--data", small_corpus, "--out-dir", tmp / "out", "--run-dir", tmp / "run")
    assert result.returncode == 0, result.stderr
    return final_model_without_run(tmp / "out" / "final_model.pt")


@pytest.mark.parametrize("format", ["pt", "safetensors"])
def test_a_final_model_that_finds_the_disk_full_is_kept_in_the_checkpoint(tmp_path, small_corpus, normal_end, format):
    if format == "safetensors":
        pytest.importorskip("safetensors")
    with small_file_system(tmp_path / "full", "1m") as full:
        result = run_cli(*RUN, "--data", small_corpus, "--out-dir", full, "--run-dir", tmp_path / "run",
                         "--format", format)
        assert sorted(full.iterdir()) == []  # no partial file, no temporary file
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Target loss achieved!" in result.stdout and "Final model saved at" not in result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    final = full / f"final_model.{format}"
    assert f"could not write the final model {final} (No space left on device)" in result.stderr
    assert f"`gpt2train export --model {checkpoint} --format {format} --out {final}`" in result.stderr
    assert read_checkpoint(checkpoint)["finished"] == "target_reached"

    # The command the message gives writes the final model the run would have written.
    exported = run_cli("export", "--model", checkpoint, "--format", "pt", "--out", tmp_path / "again" / "final_model.pt")
    assert exported.returncode == 0, exported.stderr
    assert final_model_without_run(tmp_path / "again" / "final_model.pt") == normal_end


def test_a_checkpoint_too_large_to_write_leaves_the_final_model_and_says_so(tmp_path, small_corpus):
    result = run_with_file_size_limit(8 * 2**20, *RUN, "--data", small_corpus, "--out-dir", tmp_path / "out",
                                      "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not write the checkpoint of step 1 (File too large)" in result.stdout
    assert "Final model saved at" in result.stdout and "Traceback" not in result.stderr
    assert torch.load(tmp_path / "out" / "final_model.pt", weights_only=True)["step"] == 1
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no half-written checkpoint


def test_when_nothing_can_be_written_the_run_says_what_is_left(tmp_path, small_corpus):
    result = run_with_file_size_limit(2**20, *RUN, "--data", small_corpus, "--out-dir", tmp_path / "out",
                                      "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "could not write the final model" in result.stderr and "nor the checkpoint of step 1" in result.stderr
    assert "train again (no earlier checkpoint of this run was written)" in result.stderr


def test_the_target_checkpoint_is_written_while_the_records_close_and_the_run_waits_for_it(tmp_path, small_corpus,
                                                                                           monkeypatch):
    from helpers import quiet, tiny_config

    from gpt2train import train
    from gpt2train.training.checkpoints import Checkpointer

    written, real_write = [], Checkpointer.write

    def slow_write(self, *args, **kwargs):
        time.sleep(1.0)  # a large checkpoint on a slow disk
        path = real_write(self, *args, **kwargs)
        written.append(time.monotonic())
        return path

    monkeypatch.setattr(Checkpointer, "write", slow_write)
    lines, switch_interval = [], sys.getswitchinterval()
    result = train(tiny_config(tmp_path, small_corpus, target_loss=5.0), log=lambda line: lines.append((line, time.monotonic())))
    returned = time.monotonic()
    plotted = next(at for line, at in lines if line.startswith("loss plot"))
    assert plotted < written[0] <= returned  # the plot did not wait for the checkpoint; the run did
    assert sys.getswitchinterval() == switch_interval  # the writer's shorter GIL turns end with it
    assert read_checkpoint(result.checkpoint_path)["finished"] == "target_reached"
    monkeypatch.undo()
    further = quiet(tiny_config(tmp_path, small_corpus, target_loss=3.0, resume="latest"))
    assert further.reached_target and further.steps > result.steps  # the checkpoint is complete: it resumes
