"""Text generation: greedy, temperature, top-k and top-p sampling, decoded with a KV cache, and
`gpt2train sample`'s samples of a saved model printed as they are generated (`print_samples`)."""

from __future__ import annotations

import codecs
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .device import resolve_device
from .errors import UserError
from .final_model import load_model
from .model import GPT, KVCache
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE, get_tokenizer


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


def print_samples(model_path: str, prompt: str = "", prompt_file: str | None = None, num_samples: int = 1,
                  max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 200, top_p: float = 1.0,
                  seed: int | None = None, ignore_eot: bool = False, device: str = "auto") -> None:
    """Continue `prompt`, or each non-empty line of `prompt_file` in turn, `num_samples` times each,
    printing tokens to stdout as they are generated; sample i of a prompt draws from `seed` + i."""
    if not math.isfinite(temperature):
        raise UserError(f"--temperature must be a number (0 for greedy), not {temperature}")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or num_samples < 1:
        raise UserError("--max-new-tokens, --temperature and --top-k must not be negative, --num-samples at least 1")
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), not {seed}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], not {top_p}")
    if prompt and prompt_file:
        raise UserError("give either --prompt or --prompt-file, not both")
    prompts = [prompt]
    if prompt_file:
        try:
            prompts = [line for line in Path(prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts from {prompt_file}: {e}") from None
        if not prompts:
            raise UserError(f"{prompt_file} holds no prompts: write one prompt per line")
    model = load_model(model_path, device=resolve_device(device))
    enc = get_tokenizer()
    for index, (text, sample) in enumerate((p, i) for p in prompts for i in range(num_samples)):
        if index:
            print("-" * 40)
        # Tokens can end inside a multi-byte character: decode the byte stream incrementally.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text)
        for token in generate(model, enc.encode_ordinary(text), max_new_tokens, temperature=temperature,
                              top_k=top_k or None, top_p=top_p, seed=None if seed is None else seed + sample,
                              stop_at_eot=not ignore_eot):
            sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
