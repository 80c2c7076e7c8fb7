import math

import pytest
import torch

from gpt2train import GPT, GPTConfig


def test_default_config_is_the_default_recipes_model():
    config = GPTConfig()
    assert (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)
    assert (config.block_size, config.vocab_size) == (1024, 50304)
    assert config.dropout == 0.0 and config.bias is True


def test_124m_parameter_count_and_output_shapes():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert model.num_params() == 124_475_904
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, counted once
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 50304)
    # Fresh GPT-2 init predicts close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(50304)) < 0.5


def test_gpt2_parameter_names():
    names = set(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8)).state_dict())
    for name in [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight",
        "transformer.h.1.ln_1.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
        "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
    ]:
        assert name in names


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=16))
    block = model.transformer.h[0]
    expected = 0.02 / math.sqrt(2 * 8)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_changing_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12)).eval()
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 50257
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_config_accepts_a_mapping_positionally_as_the_default_recipes_snippet_does():
    d = GPTConfig(n_layer=3, n_embd=48, n_head=4).to_dict()
    assert GPTConfig(d) == GPTConfig(**d)
    assert GPTConfig(d).n_layer == 3
    with pytest.raises(TypeError, match="unknown"):
        GPTConfig({"n_layers": 3})


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_is_the_loss_with_the_same_gradients(dtype):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    full, chunked = GPT(config), GPT(config)
    chunked.load_state_dict(full.state_dict())
    chunked.LOSS_CHUNK = 5  # chunks that do not divide the 48 positions
    x, y = torch.randint(0, 50257, (3, 16)), torch.randint(0, 50257, (3, 16))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        expected = full(x, y)[1]
        logits, loss = chunked(x, y, return_logits=False)
    assert logits is None and loss.item() == expected.item()
    expected.backward()
    loss.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=tolerance, atol=tolerance * a.grad.abs().max().item()), name
