import json

import pytest
import torch

from conftest import run_cli, tiny_config
from gpt2train import GPT, GPTConfig
from gpt2train.bench import eager_step, flops_per_step
from gpt2train.step import Stepper
from gpt2train.train import Trainer

SMALL = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
         "--seq-len", "16", "--batch-size", "2"]


def test_bench_json_has_every_figure_for_each_variant():
    result = run_cli("bench", *SMALL, "--steps", "2", "--warmup", "1", "--compare-eager", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 32 and report["torch"] == torch.__version__
    assert report["flops_per_step"] == flops_per_step(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), 2, 16)
    assert [v["variant"] for v in report["variants"]] == ["gpt2train", "eager-fp32", "eager-bf16"]
    for variant in report["variants"]:
        assert {"dtype", "ms_per_step", "tokens_per_s", "tflops", "mfu", "peak_memory_mb", "loss"} <= variant.keys()
        assert variant["ms_per_step"] > 0 and variant["tokens_per_s"] == pytest.approx(32 / variant["ms_per_step"] * 1000)
        assert 0 < variant["mfu"] and variant["peak_memory_mb"] > 0


def test_flops_per_step_is_six_per_weight_per_token_plus_attention():
    gpt2 = GPTConfig()
    weights = 50304 * 768 + 12 * 12 * 768 * 768  # embedding/output matrix, and the blocks' matrices
    assert flops_per_step(gpt2, 8, 1024) == (6 * weights + 12 * 12 * 768 * 1024) * 8 * 1024


def first_losses(dtype):
    """The first-step loss of gpt2train's step and of the hand-written eager step, same weights and batch."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(1)
    a = GPT(config)
    b = GPT(config)
    b.load_state_dict(a.state_dict())
    stepper = Stepper(a, 1e-3, 0.1, torch.device("cpu"), dtype, grad_clip=1.0)
    ours = stepper.update(1e-3, stepper.forward_backward([(x, y)]))[0].item()
    eager = eager_step(b, dtype, torch.device("cpu"), 1e-3, 0.1, 1.0, x, y)()
    return ours, eager


def test_the_fast_path_computes_the_eager_paths_loss():
    ours, eager = first_losses(torch.float32)
    assert ours == pytest.approx(eager, rel=1e-6)
    ours, eager = first_losses(torch.bfloat16)
    assert ours == pytest.approx(eager, rel=1e-2)


def test_compile_on_and_off_give_the_same_loss():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    losses = []
    for compile in (False, True):
        torch.manual_seed(1)
        model = GPT(config)
        stepper = Stepper(model, 1e-3, 0.1, torch.device("cpu"), torch.float32, 1.0, compile=compile)
        losses.append([stepper.update(1e-3, stepper.forward_backward([(x, y)]))[0].item() for _ in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


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
    assert (tmp_path / "0/out/final_model.pt").read_bytes() == (tmp_path / "1/out/final_model.pt").read_bytes()
    # The target step's checkpoint holds the data and random state after that step, not after the
    # step the late reader had already started.
    assert ckpt_a["sampler"] == ckpt_b["sampler"]
    assert torch.equal(ckpt_a["rng"]["torch"], ckpt_b["rng"]["torch"])
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
