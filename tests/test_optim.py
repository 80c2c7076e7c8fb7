import pytest

from gpt2train import GPT, GPTConfig
from gpt2train.training.optim import build_optimizer
from gpt2train.training.schedule import WarmupCosine

SEED = WarmupCosine(max_lr=6e-4, min_lr=6e-5, warmup_steps=2000, max_steps=20000)


def seed_lr(done):
    """The learning rate of the update after `done` completed ones (step done + 1)."""
    return SEED.lr(done + 1)


def test_lr_schedule_at_the_seed_milestones():
    assert seed_lr(0) == pytest.approx(6e-4 / 2000)
    assert seed_lr(1999) == pytest.approx(6e-4)  # warmup ends at the peak
    assert seed_lr(2000) == pytest.approx(6e-4)  # cosine starts at the peak
    assert seed_lr(11000) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway down the cosine
    assert seed_lr(20000) == pytest.approx(6e-5)
    assert seed_lr(25000) == pytest.approx(6e-5)


def test_lr_rises_during_warmup_and_falls_after():
    warm = [seed_lr(s) for s in range(0, 2000, 100)]
    decay = [seed_lr(s) for s in range(2000, 20001, 1000)]
    assert warm == sorted(warm)
    assert decay == sorted(decay, reverse=True)


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert any(p is model.transformer.wte.weight for p in decayed["params"])
    assert any(p is model.transformer.ln_f.weight for p in plain["params"])
    assert any(p is model.transformer.h[0].attn.c_attn.bias for p in plain["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == model.num_params()  # every parameter once, tied weight included once
