import math
import re

import pytest
import torch

from conftest import tiny_config
from gpt2train import GPT, GPTConfig, load_model, train

STEP_LINE = re.compile(r"^step \d+ \| loss: \d+\.\d{4} \| best_loss: \d+\.\d{4} \| time: \d+\.\d{2}s$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus_module):
    tmp = tmp_path_factory.mktemp("run")
    # The seed's snippet reads saved_models/final_model.pt relative to the working directory.
    config = tiny_config(tmp, small_corpus_module, out_dir=str(tmp / "saved_models"))
    lines = []
    result = train(config, log=lines.append)
    return config, result, lines


@pytest.fixture(scope="module")
def small_corpus_module(tmp_path_factory):
    from conftest import SMALL_TEXT
    from gpt2train.data import prepare

    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "corpus.txt").write_text(SMALL_TEXT * 3)
    prepare([str(tmp / "corpus.txt")], tmp / "data")
    return tmp / "data"


def test_tiny_model_trains_below_the_target(trained):
    config, result, _ = trained
    assert result.reached_target
    assert result.losses[-1] < config.target_loss <= min(result.losses[:-1])
    assert result.best_loss == result.losses[-1]
    assert result.losses[0] > 5.0  # it started from scratch


def test_log_lines_follow_the_seed_format(trained):
    config, result, lines = trained
    step_lines = [line for line in lines if line.startswith("step ")]
    assert step_lines and all(STEP_LINE.match(line) for line in step_lines)
    logged_steps = [int(line.split()[1]) for line in step_lines]
    assert logged_steps[:-1] == list(range(config.log_interval, result.steps, config.log_interval))
    assert logged_steps[-1] == result.steps  # the step that reached the target is always shown
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

    # The seed's snippet, unchanged.
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


def test_no_target_no_final_model(tmp_path, small_corpus_module):
    config = tiny_config(tmp_path, small_corpus_module, max_steps=3, target_loss=0.001)
    lines = []
    result = train(config, log=lines.append)
    assert not result.reached_target and result.final_model_path is None
    assert not (tmp_path / "out").exists()
    assert "not reached" in lines[-1] and "no final model was written" in lines[-1]


def test_training_is_reproducible_for_a_seed(tmp_path, small_corpus_module):
    runs = [train(tiny_config(tmp_path, small_corpus_module, max_steps=4, target_loss=0.0), log=lambda _: None)
            for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    other = train(tiny_config(tmp_path, small_corpus_module, max_steps=4, target_loss=0.0, seed=1),
                  log=lambda _: None)
    assert other.losses != runs[0].losses
