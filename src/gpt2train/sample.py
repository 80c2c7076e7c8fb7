"""Text generation: greedy, temperature, top-k and top-p sampling, decoded with a KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import UserError
from .model import GPT, KVCache
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE


def pick_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """The next token from one position's logits. temperature 0 means the likeliest token."""
    # The padded vocabulary slots beyond GPT-2's 50,257 are never real tokens.
    logits = logits[:GPT2_VOCAB_SIZE].float()
    # -inf is a token ruled out; NaN, +inf or nothing left to pick means the weights are not finite.
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all():
        raise UserError("the model computed non-finite logits (NaN or infinity): its weights are damaged or "
                        "diverged; use another model file")
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of likeliest tokens whose probabilities add up to top_p.
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs > top_p  # the mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time, as they are chosen.

    With the KV cache each new token costs one position's work. Learned positions end at
    block_size, so once the context outgrows it the cache is refilled from the newest half of the
    context; without the cache every step re-reads the newest block_size tokens.
    """
    param = next(model.parameters())
    generator = torch.Generator(device=param.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    block_size = model.config.block_size
    context = list(prompt_ids) or [EOT_ID]
    cache = KVCache(model.config, 1, param.device, param.dtype) if use_cache else None

    def run(ids: list[int]) -> torch.Tensor:
        logits, _ = model(torch.tensor([ids], dtype=torch.long, device=param.device), cache=cache)
        return logits[0, -1]

    for step in range(max_new_tokens):
        if cache is None:
            logits = run(context[-block_size:])
        elif step == 0 or cache.length == block_size:
            cache.length = 0
            logits = run(context[-block_size:] if step == 0 else context[-(block_size // 2):])
        else:
            logits = run(context[-1:])
        next_id = pick_token(logits, temperature, top_k, top_p, generator)
        if stop_at_eot and next_id == EOT_ID:
            return
        yield next_id
        context.append(next_id)
