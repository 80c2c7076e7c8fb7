"""Text generation from a trained model: temperature and top-k sampling."""

from __future__ import annotations

import torch

from .model import GPT
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int | None = None,
    stop_at_eot: bool = True,
):
    """Yield new token ids one at a time. temperature 0 means greedy decoding."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    idx = torch.tensor([prompt_ids or [EOT_ID]], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size :]
        logits, _ = model(context)
        # The padded vocabulary slots beyond GPT-2's 50,257 are never real tokens.
        logits = logits[0, -1, :GPT2_VOCAB_SIZE].float()
        if temperature == 0:
            next_id = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if stop_at_eot and next_id == EOT_ID:
            return
        yield next_id
        idx = torch.cat([idx, torch.tensor([[next_id]], device=device)], dim=1)
