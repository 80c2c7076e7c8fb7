import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

from gpt2train import GPT, GPTConfig, get_tokenizer
from gpt2train.evaluate import evaluate
from gpt2train.final_model import save_final_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))


def test_every_token_after_the_first_is_scored_once(model):
    tokens = np.random.default_rng(0).integers(0, 50257, size=23).astype(np.uint16)
    result = evaluate(model, tokens, seq_len=5)
    assert result.tokens == 22
    # By hand: windows [0:6], [5:11], [10:16], [15:21], then the short [20:23].
    ids = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    for start in range(0, 22, 5):
        window = ids[start : min(start + 6, 23)]
        with torch.no_grad():
            logits, _ = model.eval()(window[None, :-1])
        total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert result.loss == pytest.approx(total / 22, rel=1e-5)


def test_one_window_is_the_models_own_loss(model):
    tokens = np.random.default_rng(1).integers(0, 50257, size=17)
    result = evaluate(model, tokens, seq_len=16, max_tokens=0)
    with torch.no_grad():
        ids = torch.from_numpy(tokens)[None]
        _, loss = model.eval()(ids[:, :-1], ids[:, 1:])
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_bits_per_byte_counts_the_texts_bytes(model):
    text = "Ünïcode and ASCII: bytes per token vary."
    tokens = get_tokenizer().encode(text)
    result = evaluate(model, tokens, seq_len=16)
    scored_text = get_tokenizer().decode_bytes(tokens[1:])
    assert result.bytes == len(scored_text)
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / len(scored_text))


def test_max_tokens_and_the_models_mode(model):
    tokens = np.arange(100, 200)
    model.train()
    assert evaluate(model, tokens, seq_len=8, max_tokens=30).tokens == 30
    assert model.training  # given back as it was


def test_eval_command_scores_files_and_the_builtin_split(tmp_path, model):
    save_final_model(model, tmp_path / "m.pt", step=1, best_loss=1.0)
    text = "Some held-out text to score. " * 20
    (tmp_path / "a.txt").write_text(text)
    result = run_cli("eval", "--model", tmp_path / "m.pt", tmp_path / "a.txt", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    # Every token but the first is predicted, and so is the <|endoftext|> that closes the document.
    assert f"tokens: {len(get_tokenizer().encode(text))} |" in result.stdout
    assert "val loss: " in result.stdout and "bits per byte: " in result.stdout
    builtin = run_cli("eval", "--model", tmp_path / "m.pt", "--max-tokens", "64", "--device", "cpu",
                      "--dtype", "float32")
    assert builtin.returncode == 0 and "builtin:pydoc_data.topics (validation split) | tokens: 64" in builtin.stdout
