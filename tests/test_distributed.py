"""Two CPU ranks under torchrun (gloo) train exactly as one process with their combined batch."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS, logged_losses, run_cli, start_and_wait_for

from gpt2train import load_model
from gpt2train.checkpoint import list_checkpoints
from gpt2train.training.report import parse_step_lines

# Two blocks, so that FSDP has more than one unit to shard; a target never reached, so runs go on to max steps.
FLAGS = [*TINY_FLAGS, "--n-layer", "2", "--max-steps", "60", "--log-interval", "1", "--checkpoint-interval", "10",
         "--target-loss", "0"]
# Rank processes are found through /proc, to signal one rank of a run.
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds rank processes through /proc")
TIMEOUT = 300  # a rank left waiting on a collective would hang: fail instead


def torchrun_command(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "gpt2train", *map(str, args)]


def torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_command(*args), env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def assert_ran_to_max_steps(result: subprocess.CompletedProcess, steps: int) -> None:
    """The run's ranks exited with status 3, target not reached, which torchrun reports as a failure (1)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Target loss 0.0 not reached in {steps:,} steps" in result.stdout, result.stdout + result.stderr


def run_args(tmp: Path, data, *extra) -> list:
    return ["train", *FLAGS, "--data", data, "--run-dir", tmp / "run", "--out-dir", tmp / "out", *extra]


def recorded_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, at full precision, from the run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_close(actual: dict[int, float], expected: dict[int, float], steps: range, rtol: float) -> None:
    assert [s for s in steps if s in actual] == list(steps)
    for step in steps:
        assert actual[step] == pytest.approx(expected[step], rel=rtol), f"step {step}"


@pytest.fixture(scope="module")
def one_rank_batch_8(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("one_rank")
    result = run_cli(*run_args(tmp, small_corpus, "--batch-size", "8"))
    assert result.returncode == 3, result.stdout + result.stderr  # 3: max steps without reaching the target
    return recorded_losses(tmp / "run")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, small_corpus):
    """An uninterrupted 2-rank DDP run, batch 4 per rank: (stdout, losses)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    result = torchrun(*run_args(tmp, small_corpus))
    assert_ran_to_max_steps(result, 60)
    return result.stdout, recorded_losses(tmp / "run")


def test_two_ranks_of_batch_4_train_as_one_rank_of_batch_8(one_rank_batch_8, two_ranks):
    stdout, losses = two_ranks
    assert "tokens per step: 256 (4 x 32 x 2 ranks)" in stdout
    # Rank 0 alone prints: every step line appears once.
    assert [s.step for s in parse_step_lines(stdout)] == list(range(1, 61))
    assert_close(losses, one_rank_batch_8, range(1, 21), rtol=1e-4)
    assert losses[20] < losses[1] * 0.8  # it is learning, not just agreeing


def test_gradient_accumulation_is_the_same_optimisation(tmp_path, small_corpus, one_rank_batch_8):
    one = run_cli(*run_args(tmp_path / "one", small_corpus, "--grad-accum", "2"))
    assert one.returncode == 3, one.stdout + one.stderr
    assert "tokens per step: 256 (4 x 32 x 2 micro-steps)" in one.stdout
    assert_close(recorded_losses(tmp_path / "one" / "run"), one_rank_batch_8, range(1, 21), rtol=1e-4)

    two = torchrun(*run_args(tmp_path / "two", small_corpus, "--batch-size", "2", "--grad-accum", "2"))
    assert_ran_to_max_steps(two, 60)
    assert_close(recorded_losses(tmp_path / "two" / "run"), one_rank_batch_8, range(1, 21), rtol=1e-4)


def test_all_ranks_stop_at_the_target_together_and_one_final_model_is_written(tmp_path, small_corpus):
    result = torchrun(*run_args(tmp_path, small_corpus, "--target-loss", "2.0", "--max-steps", "300"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Target loss achieved!") == 1
    reached = max(logged_losses(result.stdout))
    assert float(logged_losses(result.stdout)[reached][0]) < 2.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final_model.pt"]
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{reached:08d}.pt"
    model = load_model(tmp_path / "out" / "final_model.pt")  # the same single file a plain run writes
    assert model.config.n_layer == 2
    saved = torch.load(tmp_path / "out" / "final_model.pt", weights_only=True)
    assert {t.dtype for t in saved["model_state_dict"].values()} == {torch.float16}


def start_torchrun(args, pattern: str):
    """Start a 2-rank run; return the launcher and its output once a line matches `pattern`."""
    return start_and_wait_for(torchrun_command(*args), pattern, env={"OMP_NUM_THREADS": "1"})


def test_a_killed_two_rank_run_resumes_as_if_never_interrupted(tmp_path, small_corpus, two_ranks):
    expected = logged_losses(two_ranks[0])
    proc, seen = start_torchrun(run_args(tmp_path, small_corpus), r"checkpoint saved: .*step_00000010\.pt")
    for pid in rank_processes(proc.pid).values():  # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    seen += proc.stdout.readlines()
    proc.wait()
    before = logged_losses("".join(seen))
    assert all(expected[step] == value for step, value in before.items())
    assert max(before) < 60

    resumed = torchrun("train", "--resume", tmp_path / "run")
    assert_ran_to_max_steps(resumed, 60)
    assert "resumed from" in resumed.stdout and "changed on resume" not in resumed.stdout
    after = logged_losses(resumed.stdout)
    assert min(after) <= max(before) + 1
    assert {**before, **after} == expected


def rank_processes(launcher: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers among the launcher's children."""
    pids = {}
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        pids.update({int(v[5:]): int(pid) for v in environ if v.startswith(b"RANK=")})
    assert sorted(pids) == [0, 1], f"ranks {sorted(pids)} among the children of {launcher}"
    return pids


@needs_proc
def test_sigterm_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, small_corpus):
    proc, seen = start_torchrun(run_args(tmp_path, small_corpus, "--max-steps", "3000"), r"^step 12 ")
    os.kill(rank_processes(proc.pid)[1], signal.SIGTERM)  # rank 0 hears nothing itself
    out, err = proc.communicate(timeout=TIMEOUT)
    stopped = re.search(r"Stopped at step (\d+): checkpoint saved at (\S+)\.", out)
    assert stopped, out + err
    assert out.count("Stopped at step") == 1 and "Continue with: the same torchrun command" in out
    step = int(stopped.group(1))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert checkpoint.name == f"step_{step:08d}.pt"
    saved = torch.load(checkpoint, weights_only=True)
    # The checkpoint is of the step both ranks stopped after, with the best loss logged there.
    assert saved["step"] == step
    assert f"{saved['best_loss']:.4f}" == logged_losses("".join(seen) + out)[step][1]


def test_fsdp_trains_as_ddp_does_and_resumes(tmp_path, small_corpus, two_ranks):
    _, ddp = two_ranks
    result = torchrun(*run_args(tmp_path, small_corpus, "--fsdp", "--keep-checkpoints", "6"))
    assert_ran_to_max_steps(result, 60)
    assert "(FSDP)" in result.stdout
    fsdp = recorded_losses(tmp_path / "run")
    assert_close(fsdp, ddp, range(1, 21), rtol=1e-4)

    # Its checkpoints hold whole tensors: resume a copy of the step-10 one in a fresh run directory.
    (tmp_path / "again" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000010.pt", tmp_path / "again" / "checkpoints")
    resumed = torchrun("train", "--resume", tmp_path / "again")
    assert_ran_to_max_steps(resumed, 60)
    assert "resumed from" in resumed.stdout
    assert_close(recorded_losses(tmp_path / "again"), fsdp, range(11, 61), rtol=1e-6)


def test_two_ranks_with_muon_train_as_one_rank_does(tmp_path, small_corpus):
    muon = ["--optimizer", "muon", "--max-steps", "20"]
    one = run_cli(*run_args(tmp_path / "one", small_corpus, "--batch-size", "8", *muon))
    assert one.returncode == 3, one.stdout + one.stderr
    two = torchrun(*run_args(tmp_path / "two", small_corpus, *muon))
    assert_ran_to_max_steps(two, 20)
    # The ranks' gradients are averaged by DDP before Muon's step, as AdamW's are; Muon orthogonalises in
    # bf16, so the last bits of the sum's rounding show a little more than with AdamW.
    assert_close(recorded_losses(tmp_path / "two" / "run"), recorded_losses(tmp_path / "one" / "run"), range(1, 21),
                 rtol=1e-3)
