"""On a CUDA GPU, the paths no CPU run takes: torch.compile by default, bf16 and fp16 autocast (fp16 with
its loss scaler), kill and resume, sampling, evaluation and export of a model trained there, torchrun.

Run with `pytest -m gpu`; every test is skipped where torch sees no CUDA GPU. A few minutes on one GPU.
GPU kernels are not bitwise deterministic, so these tests assert on steps, exit codes and files, and
compare losses only loosely.
"""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import TINY_FLAGS, logged_losses, run_cli, start_and_wait_for

from gpt2train import load_model
from gpt2train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"


def without(flags: list, *names: str) -> list:
    """`flags` less the named flags and their values."""
    kept, pairs = [], iter(flags)
    for flag in pairs:
        if flag in names:
            next(pairs)
        else:
            kept.append(flag)
    return kept


# The tests' tiny model, on the GPU, at the precision each test asks for (the default: auto).
GPU_FLAGS = ["--device", DEVICE, *without(TINY_FLAGS, "--device", "--dtype")]
# A target the tiny model reaches in about 50 steps on the small corpus; many more are allowed.
TARGET = ["--target-loss", "1.0", "--max-steps", "300"]
TIMEOUT = 300  # compiling takes a while; a run left waiting on a GPU or a collective fails instead


def losses_of(stdout: str) -> dict[int, float]:
    """step -> the loss printed, as a number (GPU losses are compared loosely)."""
    return {step: float(loss) for step, (loss, _) in logged_losses(stdout).items()}


def train_args(tmp, data, *extra) -> list:
    return ["train", *GPU_FLAGS, *TARGET, "--data", data, "--run-dir", tmp / "run", "--out-dir", tmp / "out", *extra]


def assert_reached_target(result: subprocess.CompletedProcess, tmp) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Target loss achieved!") == 1, result.stdout
    assert f"Final model saved at: {tmp / 'out' / 'final_model.pt'}" in result.stdout
    assert (tmp / "out" / "final_model.pt").is_file()


def header(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("device: "))


@pytest.fixture(scope="module")
def trained_on_gpu(tmp_path_factory, small_corpus):
    """A tiny run with every default a GPU user gets (auto dtype, torch.compile): (tmp, stdout)."""
    tmp = tmp_path_factory.mktemp("gpu_run")
    result = run_cli(*train_args(tmp, small_corpus), timeout=TIMEOUT)
    assert_reached_target(result, tmp)
    return tmp, result.stdout


def test_a_tiny_run_reaches_its_target_on_the_gpu(trained_on_gpu):
    tmp, stdout = trained_on_gpu
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert re.match(rf"device: {DEVICE}(:\d+)? \| dtype: {expected} \| parameters: ", header(stdout)), header(stdout)
    losses = losses_of(stdout)
    assert losses[max(losses)] < 1.0 < losses[min(losses)]
    saved = torch.load(tmp / "out" / "final_model.pt", weights_only=True)
    assert {t.dtype for t in saved["model_state_dict"].values()} == {torch.float16}
    assert all(t.device.type == "cpu" for t in saved["model_state_dict"].values())  # loadable without a GPU
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in saved["model_state_dict"])  # no compile prefix


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float16 trains through a GradScaler
def test_bf16_and_fp16_autocast_reach_the_target(tmp_path, small_corpus, dtype):
    result = run_cli(*train_args(tmp_path, small_corpus, "--dtype", dtype), timeout=TIMEOUT)
    assert_reached_target(result, tmp_path)
    assert f"| dtype: {dtype} |" in header(result.stdout)
    if dtype == "bfloat16":  # fp16's loss scaler may skip a step that overflowed: that is its job
        assert "non-finite" not in result.stdout


@pytest.mark.parametrize("lever", [["--preset", "gpt2-fast"], ["--compile-mode", "reduce-overhead"],
                                   ["--compile-blocks"], ["--fused-loss"]])
def test_each_lever_reaches_the_target_on_the_gpu(tmp_path, small_corpus, lever):
    # gpt2-fast: Muon and the wsd schedule on the GPU (its shape flags override the preset's 124M);
    # reduce-overhead: the compiled step replayed as CUDA graphs, with the one-step-late loss read.
    result = run_cli(*train_args(tmp_path, small_corpus, *lever, "--warmup-steps", "5"),
                     timeout=TIMEOUT)
    assert_reached_target(result, tmp_path)
    assert "non-finite" not in result.stdout


def test_sigkill_after_a_checkpoint_then_resume_on_the_gpu(tmp_path, small_corpus):
    # Checkpoints every 5 steps slow the run down enough that the kill lands long before the target.
    args = ["train", *GPU_FLAGS, "--target-loss", "0.3", "--max-steps", "300", "--log-interval", "1",
            "--checkpoint-interval", "5", "--data", small_corpus, "--run-dir", tmp_path / "run",
            "--out-dir", tmp_path / "out"]
    # Compiling in-process: inductor's compile workers would otherwise hold the output pipe open after the kill.
    saved_5 = r"checkpoint saved: .*step_00000005\.pt"
    proc, seen = start_and_wait_for([sys.executable, "-m", "gpt2train", *args], saved_5,
                                    env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    proc.send_signal(signal.SIGKILL)
    seen += proc.stdout.readlines()
    assert proc.wait() == -signal.SIGKILL, "".join(seen)
    assert not (tmp_path / "out").exists(), "the run ended before it was killed"
    before = losses_of("".join(seen))
    step = int(list_checkpoints(tmp_path / "run")[-1].stem.removeprefix("step_"))
    assert step >= 5 and step % 5 == 0

    resumed = run_cli("train", "--resume", tmp_path / "run", timeout=TIMEOUT)
    assert_reached_target(resumed, tmp_path)
    assert f"step_{step:08d}.pt at step {step:,} (" in resumed.stdout, resumed.stdout
    assert "changed on resume" not in resumed.stdout
    assert f"device: {DEVICE}" in header(resumed.stdout)
    after = losses_of(resumed.stdout)
    assert min(after) == step + 1  # it went on from the checkpoint, not from step 1
    assert max(after) > step + 1 and after[max(after)] < 0.3
    if step + 1 in before:  # the same weights and batch: the same loss, up to GPU rounding
        assert after[step + 1] == pytest.approx(before[step + 1], rel=0.03)
    assert after[step + 1] < before[1] * 0.9


def test_sample_eval_and_export_a_model_trained_on_the_gpu(trained_on_gpu, tmp_path):
    trained, _ = trained_on_gpu
    model = trained / "out" / "final_model.pt"

    sample = run_cli("sample", "--model", model, "--prompt", "The quick brown", "--max-new-tokens", "8",
                     "--seed", "1", "--device", DEVICE, timeout=TIMEOUT)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The quick brown") and len(sample.stdout.strip()) > len("The quick brown")

    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    losses = {}
    for device, dtype in [(DEVICE, "auto"), ("cpu", "float32")]:
        result = run_cli("eval", "--model", model, tmp_path / "text.txt", "--device", device, "--dtype", dtype,
                         timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        losses[device] = float(re.search(r"^val loss: (\S+) \|", result.stdout, re.MULTILINE).group(1))
    # bf16 or fp16 on the GPU, fp32 on the CPU: the same loss up to the precision's rounding.
    assert losses[DEVICE] == pytest.approx(losses["cpu"], rel=0.05, abs=0.05)

    pytest.importorskip("safetensors")
    result = run_cli("export", "--model", model, "--format", "hf", "--out", tmp_path / "hf", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    exported, original = load_model(tmp_path / "hf"), load_model(model)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


def torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "gpt2train", *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_one_process_under_torchrun_reaches_the_target(tmp_path, small_corpus):
    # With one process gpt2train joins no process group: this is the launcher's environment on a GPU.
    result = torchrun(1, *train_args(tmp_path, small_corpus))
    assert_reached_target(result, tmp_path)
    assert f"device: {DEVICE}" in header(result.stdout)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_ranks_over_nccl_reach_the_target_together(tmp_path, small_corpus):
    # The one test where NCCL carries gradients; one GPU cannot run it (NCCL refuses two ranks on one GPU).
    result = torchrun(2, *train_args(tmp_path, small_corpus))
    assert_reached_target(result, tmp_path)
    assert "tokens per step: 256 (4 x 32 x 2 ranks)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final_model.pt"]
