import pytest
import torch

from gpt2train import GPT, GPTConfig
from gpt2train.training.optim import build_optimizer
from gpt2train.training.schedule import WarmupCosine

SEED = WarmupCosine(max_lr=6e-4, min_lr=6e-5, warmup_steps=2000, max_steps=20000)


def seed_lr(done):
    """The learning rate of the update after `done` completed ones (step done + 1)."""
    return SEED.lr(done + 1)


def test_lr_schedule_at_the_default_recipes_milestones():
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


def fast_config(**overrides):
    from gpt2train.config import resolve_config

    return resolve_config(overrides=dict(preset="gpt2-fast", n_layer=2, n_head=2, n_embd=16, block_size=16,
                                         seq_len=16, **overrides))


def test_muon_takes_exactly_the_blocks_matrices_and_adamw_everything_else_once():
    from gpt2train.training.optim import build_optimizers

    config = fast_config()
    model = GPT(config.model)
    muon, adamw = build_optimizers(model, config)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    matrices = {id(p) for block in model.transformer.h for p in (block.attn.c_attn.weight, block.attn.c_proj.weight,
                                                                  block.mlp.c_fc.weight, block.mlp.c_proj.weight)}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices
    adam_params = [p for g in adamw.param_groups for p in g["params"]]
    assert any(p is model.transformer.wte.weight for p in adam_params)  # the tied embedding and output layer
    assert not matrices & {id(p) for p in adam_params}
    every = [id(p) for o in (muon, adamw) for g in o.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(config.muon_lr / config.lr)
    assert muon.defaults["momentum"] == 0.95 and muon.defaults["nesterov"]
    decayed, plain = adamw.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


def test_the_default_recipe_is_still_the_default():
    from gpt2train.config import resolve_config
    from gpt2train.training.optim import build_optimizers
    from gpt2train.training.schedule import build_schedule

    config = resolve_config(overrides=dict(n_layer=1, n_head=2, n_embd=16, block_size=16, seq_len=16))
    [adamw] = build_optimizers(GPT(config.model), config)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 6e-4
    assert build_schedule(config) == SEED  # warmup 2,000, cosine from 6e-4 to 6e-5 at 20,000


def test_muon_and_adamw_together_lower_the_loss():
    from gpt2train.training.optim import build_optimizers

    torch.manual_seed(0)
    config = fast_config()
    model = GPT(config.model)
    optimizers = build_optimizers(model, config)
    x = torch.randint(0, 50257, (2, 16))
    losses = []
    for _ in range(5):
        loss = model(x, x)[1]
        loss.backward()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group.get("lr_scale", 1.0)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
