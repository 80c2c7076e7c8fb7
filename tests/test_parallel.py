"""Parallelism and compilation applied from outside the model, and full state dicts."""

import pytest
import torch

from gpt2train import GPT, GPTConfig
from gpt2train.model import TIED_WEIGHTS
from gpt2train.training.optim import build_optimizer
from gpt2train.training.parallel import FullModelState, FullOptimizerState, parallelize

CPU = torch.device("cpu")
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def test_one_process_is_left_as_it_is_or_compiled():
    model = GPT(CONFIG)
    plain = parallelize(model, CPU, torch.float32)
    assert plain.forward is model and not plain.sharded
    compiled = parallelize(model, CPU, torch.float32, compile=True)
    assert compiled.forward is not model and compiled.forward._orig_mod is model  # shares its weights


def test_compiling_the_blocks_compiles_each_block_in_place():
    model = GPT(CONFIG)
    parallel = parallelize(model, CPU, torch.float32, compile=True, compile_blocks=True)
    assert parallel.forward is model  # the model itself is not wrapped
    assert all(block._compiled_call_impl is not None for block in model.shard_units())


def stepped(optimizer: str = "adamw"):
    """A model and its optimizers after one step, from seed 0."""
    from gpt2train.config import resolve_config
    from gpt2train.training.optim import build_optimizers

    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizers = build_optimizers(model, resolve_config(overrides={"optimizer": optimizer}))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    for o in optimizers:
        o.step()
    return model, optimizers


def test_full_state_dicts_keep_the_tied_weight_as_one_tensor_and_load_back():
    model, optimizers = stepped()
    weights, moments = FullModelState(model).state_dict(), FullOptimizerState(model, optimizers).state_dict()
    (tied, source), = TIED_WEIGHTS.items()
    assert weights[tied] is weights[source]
    other = GPT(CONFIG)
    other_optimizer = build_optimizer(other, 1e-3, 0.1)
    FullModelState(other).load_state_dict(weights)
    FullOptimizerState(other, [other_optimizer]).load_state_dict(moments)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(other_optimizer.state_dict()["state"][0]["exp_avg"],
                       optimizers[0].state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_one_process_saves_the_optimizers_in_the_layout_fsdp_runs_read(optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, optimizers = stepped(optimizer)
    ours = FullOptimizerState(model, optimizers).state_dict()
    theirs = get_optimizer_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    assert all(torch.equal(ours["state"][name][k], theirs["state"][name][k])
               for name in ours["state"] for k in ours["state"][name])
