"""Held-out evaluation: loss, perplexity and bits per byte of a model on a token sequence."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .device import autocast
from .model import GPT
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE, get_tokenizer


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, in nats
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of text those tokens spell

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Compression of the text itself, comparable across tokenizers."""
        return self.loss * self.tokens / math.log(2) / max(self.bytes, 1)


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """Bytes of text each GPT-2 token stands for; <|endoftext|> separates documents and spells none."""
    enc = get_tokenizer()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(GPT2_VOCAB_SIZE)], dtype=np.int64)
    lengths[EOT_ID] = 0
    return lengths


@torch.no_grad()
def evaluate(
    model: GPT,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_tokens: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score every token after the first exactly once, in consecutive windows of seq_len.

    `max_tokens` > 0 scores only the first that many; `progress(done, total)` is called per batch.
    The model is put in eval mode for the pass and given back in the mode it was in.
    """
    device = torch.device(device)
    total = len(tokens) - 1 if not max_tokens else min(len(tokens) - 1, max_tokens)
    if total < 1:
        raise ValueError("evaluation needs at least two tokens")
    full_windows = list(range(0, total - seq_len + 1, seq_len))
    batches = [(full_windows[i : i + batch_size], seq_len) for i in range(0, len(full_windows), batch_size)]
    if total % seq_len:  # the shorter last window
        batches.append(([total - total % seq_len], total % seq_len))
    byte_lengths = token_byte_lengths()
    was_training = model.training
    model.eval()
    nats, text_bytes, done = 0.0, 0, 0
    try:
        for starts, length in batches:
            windows = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
            batch = torch.from_numpy(windows).to(device)
            with autocast(device, dtype):
                logits, _ = model(batch[:, :-1])
            nats += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            text_bytes += int(byte_lengths[windows[:, 1:]].sum())
            done += length * len(starts)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    return EvalResult(loss=nats / total, tokens=total, bytes=text_bytes)
