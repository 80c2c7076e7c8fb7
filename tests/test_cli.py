"""The command line as a user runs it: subprocesses, exit codes, files on disk."""

import os
import re
import signal
import subprocess
import sys

import torch
from helpers import TINY_FLAGS, cli, run_cli, start_and_wait_for

from gpt2train import GPT, GPTConfig
from gpt2train.checkpoint import list_checkpoints, read_checkpoint


def test_help_lists_subcommands_and_shows_defaults():
    out = run_cli("--help").stdout
    # argparse lists each subcommand under COMMAND on a line of its own, indented by four spaces.
    listed = re.findall(r"^ {4}(\S+)", out, re.MULTILINE)
    assert listed == ["prepare", "train", "sample", "eval", "plot", "export", "bench", "presets"], out
    train_help = run_cli("train", "--help").stdout
    for flag in ("--n-layer", "--n-head", "--n-embd", "--block-size", "--vocab-size", "--dropout", "--preset",
                 "--config", "--data", "--out-dir", "--device", "--dtype", "--seed", "--batch-size", "--seq-len",
                 "--max-steps", "--warmup-steps", "--lr", "--min-lr", "--weight-decay", "--grad-clip",
                 "--target-loss", "--log-interval", "--run-dir", "--resume", "--checkpoint-interval",
                 "--keep-checkpoints", "--overwrite", "--max-bad-steps", "--format", "--sampling"):
        assert flag in train_help
    assert "(default: 20000)" in train_help and "(default: 0.099999)" in train_help
    prepare_help = run_cli("prepare", "--help").stdout
    for flag in ("--out", "--val-fraction", "--workers", "--shard-tokens", "--text-field", "--include", "--exclude",
                 "--split", "--cache-dir", "--overwrite", "--quiet"):
        assert flag in prepare_help


def test_prepare_rejects_empty_input_with_one_clear_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run_cli("prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no text" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_missing_input_is_a_user_error(tmp_path):
    result = run_cli("prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "data"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_no_target_exits_with_its_own_status_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "models"
    result = run_cli("train", *TINY_FLAGS, "--train-tokens", "2000", "--max-steps", "6", "--target-loss", "0.0001",
                     "--out-dir", out_dir, "--run-dir", tmp_path / "run")
    assert result.returncode == 3, result.stderr
    assert "not reached" in result.stdout and "no final model was written" in result.stdout
    assert not out_dir.exists()


def test_train_then_sample(tmp_path):
    result = run_cli("prepare", "--out", str(tmp_path / "data"))
    assert result.returncode == 0 and "builtin" in result.stdout
    result = run_cli("train", *TINY_FLAGS, "--data", tmp_path / "data", "--train-tokens", "300",
                     "--max-steps", "300", "--target-loss", "1.0", "--out-dir", tmp_path / "m", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Final model saved at: {tmp_path / 'm' / 'final_model.pt'}" in result.stdout
    result = run_cli("sample", "--model", str(tmp_path / "m/final_model.pt"), "--prompt", "The",
                     "--max-new-tokens", "8", "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The") and len(result.stdout.strip()) > len("The")
    again = run_cli("sample", "--model", str(tmp_path / "m/final_model.pt"), "--prompt", "The",
                    "--max-new-tokens", "8", "--seed", "1", "--device", "cpu")
    assert again.stdout == result.stdout  # a seed makes samples reproducible


def test_sample_from_missing_model_is_a_user_error(tmp_path):
    result = run_cli("sample", "--model", str(tmp_path / "none.pt"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_default_124m_one_step_writes_an_fp16_model_the_default_recipes_snippet_loads(tmp_path):
    # The one test that builds the full 124M model: the README's acceptance command.
    result = run_cli("train", "--max-steps", "1", "--target-loss", "100", "--batch-size", "1",
                     "--seq-len", "64", "--device", "cpu", "--dtype", "float32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parameters: 124,475,904" in result.stdout
    path = tmp_path / "saved_models" / "final_model.pt"
    assert path.stat().st_size < 1e9
    checkpoint = torch.load(path)
    assert all(t.dtype == torch.float16 for t in checkpoint["model_state_dict"].values())
    config = GPTConfig(checkpoint['config'])
    model = GPT(config)
    model.load_state_dict(checkpoint['model_state_dict'])
    model = model.float()
    assert model.num_params() == 124_475_904
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 50304)


def gpt2train_into_a_closed_pipe(*args) -> subprocess.CompletedProcess:
    """`gpt2train ARGS | head -0`: the reader is gone before the first line is written."""
    proc = subprocess.Popen([sys.executable, "-m", "gpt2train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.stdout.close()
    err = proc.stderr.read()
    return subprocess.CompletedProcess(args, proc.wait(timeout=300), "", err)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    for args in (["presets"], ["sample", "--model", save_tiny_model(tmp_path), "--device", "cpu", "--seed", "1"]):
        result = gpt2train_into_a_closed_pipe(*args)
        assert result.returncode == 128 + signal.SIGPIPE and result.stderr == "", result.stderr


def save_tiny_model(tmp_path):
    from gpt2train.final_model import save_final_model

    path = tmp_path / "model.pt"
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), path, 1, 1.0)
    return path


def test_training_into_a_closed_pipe_saves_a_checkpoint_and_stops(tmp_path, small_corpus):
    args = ["train", *TINY_FLAGS, "--data", small_corpus, "--target-loss", "0", "--max-steps", "100000",
            "--log-interval", "1", "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out"]
    proc, _ = start_and_wait_for([sys.executable, "-m", "gpt2train", *args], r"^step 5 ")
    proc.stdout.close()  # `| head` has read what it wanted
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "the output was closed: stopping after this step" in err
    saved = list_checkpoints(tmp_path / "run")
    assert len(saved) == 1 and read_checkpoint(saved[0])["step"] >= 5


def test_eval_and_bench_say_how_far_they_are_off_a_terminal(tmp_path, monkeypatch, capsys):
    import gpt2train.progress

    monkeypatch.setattr(gpt2train.progress, "PROGRESS_AFTER_SECONDS", 0.0)  # as if it had run long already
    code, _, err = cli(capsys, "eval", "--model", save_tiny_model(tmp_path), "--device", "cpu", "--dtype", "float32",
                       "--max-tokens", "320", "--seq-len", "32", "--batch-size", "1")
    assert code == 0
    assert err.splitlines() == [f"eval: {tenth * 10:3d}% ({tenth * 32}/320 tokens)" for tenth in range(1, 11)]
    benched = run_cli("bench", *TINY_FLAGS, "--steps", "1", "--warmup", "0", "--compare-eager")
    assert benched.returncode == 0, benched.stderr
    assert benched.stderr.splitlines() == [f"bench: timing {name} ({i} of 3, 0 warm-up and 1 timed steps)"
                                           for i, name in enumerate(["gpt2train", "eager-fp32", "eager-bf16"], 1)]


def test_train_ends_without_the_interpreter_teardown_and_loses_no_output(tmp_path, small_corpus):
    from gpt2train.final_model import load_model

    # The checkpoint of the target step written slowly, so that an exit that did not wait for it would lose it.
    (tmp_path / "sitecustomize.py").write_text(
        "import time\nfrom gpt2train.training import checkpoints\nwrite = checkpoints.save_checkpoint\n"
        "checkpoints.save_checkpoint = lambda *a, **k: (time.sleep(2), write(*a, **k))[1]\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # stdout block-buffered
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "gpt2train", "train", *TINY_FLAGS, "--data", str(small_corpus),
                             "--max-steps", "1", "--warmup-steps", "1", "--target-loss", "100",
                             "--run-dir", str(tmp_path / "run"),
                             "--out-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("loss plot")  # the last line, flushed before the exit
    assert (tmp_path / "out" / "final_model.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000001.pt").is_file()  # the writer was waited for
    load_model(tmp_path / "run")  # complete: its checksum holds
