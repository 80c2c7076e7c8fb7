"""The command line as a user runs it: subprocesses, exit codes, files on disk."""

import re

import torch
from helpers import TINY_FLAGS, run_cli

from gpt2train import GPT, GPTConfig


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


def test_default_124m_one_step_writes_an_fp16_model_the_seed_snippet_loads(tmp_path):
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
