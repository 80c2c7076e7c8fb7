"""One training step (`Stepper`): the loss of the fast path against plain eager PyTorch, compiled or not."""

import pytest
import torch

from gpt2train import GPT, GPTConfig
from gpt2train.bench import eager_step
from gpt2train.training.optim import build_optimizer
from gpt2train.training.parallel import parallelize
from gpt2train.training.step import Flags, Pipeline, Stepper

CPU = torch.device("cpu")


def make_stepper(model, dtype=torch.float32, compile=False, compile_blocks=False, compile_mode="default"):
    parallel = parallelize(model, CPU, dtype, compile=compile, compile_blocks=compile_blocks, compile_mode=compile_mode)
    return Stepper(model, [build_optimizer(model, 1e-3, 0.1)], CPU, dtype, 1.0, parallel.forward)


def first_losses(dtype):
    """The first-step loss of gpt2train's step and of the hand-written eager step, same weights and batch."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(1)
    a = GPT(config)
    b = GPT(config)
    b.load_state_dict(a.state_dict())
    stepper = make_stepper(a, dtype)
    ours = stepper.update(1e-3, stepper.forward_backward([(x, y)]))[0].item()
    eager = eager_step(b, dtype, torch.device("cpu"), 1e-3, 0.1, 1.0, x, y)()
    return ours, eager


def test_the_fast_path_computes_the_eager_paths_loss():
    ours, eager = first_losses(torch.float32)
    assert ours == pytest.approx(eager, rel=1e-6)
    ours, eager = first_losses(torch.bfloat16)
    assert ours == pytest.approx(eager, rel=1e-2)


def losses_of_steps(steps: int, compile: bool = False, fused_loss: bool = False, compile_blocks: bool = False,
                    compile_mode: str = "default") -> list[float]:
    """The first losses of a small model trained on one batch, from the same weights every time."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    torch.manual_seed(1)
    stepper = make_stepper(GPT(config), compile=compile, compile_blocks=compile_blocks, compile_mode=compile_mode)
    stepper.fused_loss = fused_loss
    return [stepper.update(1e-3, stepper.forward_backward([(x, y)]))[0].item() for _ in range(steps)]


def test_compile_on_and_off_give_the_same_loss():
    assert losses_of_steps(3, compile=True) == pytest.approx(losses_of_steps(3), rel=1e-5)


def test_the_pipeline_reads_the_same_steps_one_step_late():
    """With lag 1 the next step is queued before a step is handed over; the losses are the same."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    batches = [[(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16)))] for _ in range(5)]
    runs = {}
    for lag in (0, 1):
        torch.manual_seed(1)
        pipeline = Pipeline(make_stepper(GPT(config)), lag)
        pushed = [pipeline.push(step, batches[step - 1], 1e-3, Flags(), {"before": step}) for step in range(1, 6)]
        steps = [p for p in [*pushed, pipeline.flush()] if p is not None]
        handed = [(p.step, p.result().loss, p.queued_after.step if p.queued_after else None) for p in steps]
        runs[lag] = handed
        assert [p.position for p in steps] == [{"before": step} for step in range(1, 6)]
    assert [step for step, _, _ in runs[0]] == [1, 2, 3, 4, 5]
    assert [loss for _, loss, _ in runs[1]] == [loss for _, loss, _ in runs[0]]
    assert [queued for _, _, queued in runs[0]] == [None] * 5
    assert [queued for _, _, queued in runs[1]] == [2, 3, 4, 5, None]


@pytest.mark.parametrize("compile", [False, True])
def test_the_fused_loss_trains_as_the_plain_one(compile):
    assert losses_of_steps(4, compile, fused_loss=True) == pytest.approx(losses_of_steps(4, compile), rel=1e-5)


def test_compiling_the_blocks_alone_gives_the_same_loss():
    assert losses_of_steps(3, compile=True, compile_blocks=True) == pytest.approx(losses_of_steps(3), rel=1e-5)


def test_a_compile_mode_is_handed_to_torch_compile_and_trains_the_same(monkeypatch):
    modes = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: modes.append(options.get("mode")) or real(model, **options))
    # On a CPU reduce-overhead compiles as the default mode does (CUDA graphs are for GPUs).
    assert losses_of_steps(3, compile=True, compile_mode="reduce-overhead") == pytest.approx(losses_of_steps(3), rel=1e-5)
    assert modes == ["reduce-overhead"]
