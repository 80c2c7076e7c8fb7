"""Log-likelihoods of continuations: packed rows give what one plain forward pass per request gives."""

import random

import pytest
import torch

from gpt2train.model import GPT, GPTConfig
from gpt2train.scoring import Request, loglikelihoods

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def random_tokens(rng, low, high):
    return tuple(rng.randrange(50257) for _ in range(rng.randint(low, high)))


def shared_context_requests(seed=0):
    """Groups of 1 to 4 continuations of one context, shuffled, and one context too long for the model."""
    rng = random.Random(seed)
    requests = []
    for _ in range(6):
        context = random_tokens(rng, 1, 30)
        requests += [Request(context, random_tokens(rng, 1, 20)) for _ in range(rng.randint(1, 4))]
    requests.append(Request(tuple(range(100, 170)), (5, 6, 7, 8, 9)))
    rng.shuffle(requests)
    return requests


def one_pass_each(model, request):
    """The request scored alone, as lm-evaluation-harness does: the last block_size + 1 tokens of context
    and continuation, every position's logits."""
    tokens = (request.context + request.continuation)[-(model.config.block_size + 1):]
    logits, _ = model(torch.tensor([tokens[:-1]]))
    log_probs = torch.log_softmax(logits[0, -len(request.continuation):].float(), dim=-1)
    wanted = torch.tensor(request.continuation)
    return log_probs.gather(1, wanted[:, None]).sum().item(), bool((log_probs.argmax(-1) == wanted).all())


@pytest.mark.parametrize("batch_tokens", [40, 4096])
def test_packed_scores_equal_one_forward_pass_per_request(batch_tokens):
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    requests = shared_context_requests()
    scores = loglikelihoods(model, requests, torch.device("cpu"), batch_tokens=batch_tokens)
    with torch.no_grad():
        expected = [one_pass_each(model, r) for r in requests]
    assert [s.logprob for s in scores] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [s.greedy for s in scores] == [e[1] for e in expected]


def test_a_continuation_the_model_would_write_is_greedy():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    context = (11, 22, 33)
    with torch.no_grad():
        likeliest = int(model(torch.tensor([context]))[0][0, -1].argmax())
    scores = loglikelihoods(model, [Request(context, (likeliest,)), Request(context, ((likeliest + 1) % 50257,))],
                            torch.device("cpu"))
    assert [s.greedy for s in scores] == [True, False]
    assert scores[0].logprob > scores[1].logprob


def test_scoring_leaves_the_model_in_the_mode_it_was_in():
    model = GPT(CONFIG).train()
    loglikelihoods(model, [Request((1,), (2,))], torch.device("cpu"))
    assert model.training


def test_a_continuation_longer_than_the_context_window_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(GPT(CONFIG), [Request((1,), tuple(range(65)))], torch.device("cpu"))


def test_under_bf16_autocast_the_scores_stay_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    requests = shared_context_requests(seed=1)
    exact = loglikelihoods(model, requests, torch.device("cpu"))
    low = loglikelihoods(model, requests, torch.device("cpu"), torch.bfloat16)
    assert [s.logprob for s in low] == pytest.approx([s.logprob for s in exact], rel=0.02)
