import pytest
import torch
from helpers import run_cli

from gpt2train import GPT, GPTConfig, generate
from gpt2train.final_model import save_final_model
from gpt2train.model import KVCache
from gpt2train.sample import pick_token
from gpt2train.tokenizer import EOT_ID


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


def test_cached_logits_equal_a_full_forward_pass(model):
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
        first, _ = model(idx[:, :12], cache=cache)  # a prompt
        chunk, _ = model(idx[:, 12:16], cache=cache)  # several positions at once, after the cache
        one, _ = model(idx[:, 16:17], cache=cache)  # one token at a time
    assert cache.length == 17
    torch.testing.assert_close(torch.cat([first, chunk, one], dim=1), full[:, :17], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_is_the_same_with_and_without_the_cache(model):
    prompt = [464, 3290, 318]
    cached = list(generate(model, prompt, max_new_tokens=25, temperature=0, stop_at_eot=False))
    uncached = list(generate(model, prompt, max_new_tokens=25, temperature=0, stop_at_eot=False, use_cache=False))
    assert len(cached) == 25 and cached == uncached


def test_generation_runs_past_the_context_length(model):
    tokens = list(generate(model, [464] * 30, max_new_tokens=70, temperature=1.0, seed=0, stop_at_eot=False))
    assert len(tokens) == 70 and all(0 <= t < 50257 for t in tokens)


def test_a_seed_makes_sampling_reproducible(model):
    a = list(generate(model, [464], max_new_tokens=20, seed=3, stop_at_eot=False))
    b = list(generate(model, [464], max_new_tokens=20, seed=3, stop_at_eot=False))
    c = list(generate(model, [464], max_new_tokens=20, seed=4, stop_at_eot=False))
    assert a == b and a != c


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    logits = torch.randn(50304)
    greedy = pick_token(logits, temperature=0)
    assert greedy == int(logits[:50257].argmax())
    assert all(pick_token(logits, temperature=1.5, top_k=1) == greedy for _ in range(5))
    assert all(pick_token(logits, temperature=1.5, top_p=1e-6) == greedy for _ in range(5))


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.zeros(50257)
    probs[[10, 20, 30]] = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()
    seen = {pick_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(i)) for i in range(200)}
    assert seen == {10, 20}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it; 30 is never drawn


def test_padded_vocabulary_slots_are_never_chosen():
    logits = torch.full((50304,), -10.0)
    logits[50300] = 100.0  # a padding slot beyond GPT-2's 50,257 tokens
    assert pick_token(logits, temperature=0) < 50257
    assert pick_token(logits, temperature=1.0) < 50257


def always_end_of_text(model):
    """Make every position predict <|endoftext|>: a constant final hidden state and one matching row."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[EOT_ID] = 1.0
    return model


def test_generation_stops_at_end_of_text_unless_asked_not_to(model):
    always_end_of_text(model)
    assert list(generate(model, [464], max_new_tokens=5, temperature=0)) == []
    assert list(generate(model, [464], max_new_tokens=5, temperature=0, stop_at_eot=False)) == [EOT_ID] * 5


def test_sample_command_prompts_from_a_file_several_samples(tmp_path, model):
    save_final_model(model, tmp_path / "m.pt", step=1, best_loss=1.0)
    (tmp_path / "prompts.txt").write_text("The cat\n\nA dog\n")
    args = ["sample", "--model", tmp_path / "m.pt", "--prompt-file", tmp_path / "prompts.txt", "--num-samples", "2",
            "--max-new-tokens", "5", "--seed", "7", "--device", "cpu", "--ignore-eot"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("-" * 40 + "\n")
    assert len(samples) == 4
    assert [s[:5] for s in samples] == ["The c", "The c", "A dog", "A dog"]
    assert samples[0] != samples[1]  # sample i uses seed + i
    assert run_cli(*args).stdout == result.stdout
