"""Log-likelihoods of continuations given contexts: batched, each context run once for all its continuations.

The requests that share a context (the four endings of a multiple-choice item) are packed into one
row: the context, then each continuation after it, every continuation at the positions that follow
the context and attending only to the context and to itself. The context is computed once instead of
once per continuation, and the output layer runs only where a continuation's token is predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .device import autocast
from .model import GPT

LOGIT_ROWS = 1024  # positions through the output layer at a time: bounds the (rows x vocabulary) logits


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # not empty: GPT-2 predicts a text's first token from <|endoftext|>
    continuation: tuple[int, ...]  # not empty


@dataclass(frozen=True)
class Score:
    logprob: float  # log-probability of the continuation's tokens, summed
    greedy: bool  # each of its tokens was the likeliest one at its position


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward pass (rows x padded length): large enough to keep the device busy."""
    return 65536 if device.type == "cuda" else 4096


@dataclass
class _Group:
    """One packed row: a context and the requests that continue it."""

    context: tuple[int, ...]
    requests: list[int]  # indices into the request list

    def length(self, requests: Sequence[Request]) -> int:
        # A continuation's last token predicts nothing: it is never fed.
        return len(self.context) + sum(len(requests[i].continuation) - 1 for i in self.requests)


def _groups(requests: Sequence[Request], block_size: int) -> list[_Group]:
    """The requests grouped by context, a context cut from the left where it and its continuation would
    not fit the model's positions (as lm-evaluation-harness cuts it)."""
    groups: dict[tuple[int, ...], _Group] = {}
    for index, request in enumerate(requests):
        if not request.context or not request.continuation:
            raise ValueError("a request needs a context and a continuation of at least one token each")
        keep = block_size + 1 - len(request.continuation)
        if keep < 1:
            raise ValueError(f"a continuation of {len(request.continuation)} tokens does not fit the model's "
                             f"context of {block_size} tokens")
        context = request.context[-keep:]
        groups.setdefault(context, _Group(context, [])).requests.append(index)
    return list(groups.values())


@torch.inference_mode()
def loglikelihoods(
    model: GPT, requests: Sequence[Request], device: torch.device, dtype: torch.dtype = torch.float32,
    batch_tokens: int = 0, progress: Callable[[int, int], None] | None = None,
) -> list[Score]:
    """The log-probability of each request's continuation after its context, in the order given.

    The model is run in eval mode and given back in the mode it was in. `progress(done, total)` is
    called after each batch with the requests scored so far. The results are read from the device
    once, at the end.
    """
    batch_tokens = batch_tokens or default_batch_tokens(device)
    groups = sorted(_groups(requests, model.config.block_size), key=lambda g: -g.length(requests))
    order: list[int] = []
    logprobs: list[torch.Tensor] = []
    greedy: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        start, done = 0, 0
        while start < len(groups):
            width = groups[start].length(requests)  # the longest row of the batch: sorted, the first
            end = start + max(1, batch_tokens // width)
            batch = groups[start:end]
            indices, lp, gr = _score_batch(model, requests, batch, width, device, dtype)
            order += indices
            logprobs.append(lp)
            greedy.append(gr)
            done += len(indices)
            start = end
            if progress is not None:
                progress(done, len(requests))
    finally:
        model.train(was_training)
    if not order:
        return []
    values = torch.cat(logprobs).tolist()
    flags = torch.cat(greedy).tolist()
    scores: list[Score | None] = [None] * len(requests)
    for index, value, flag in zip(order, values, flags):
        scores[index] = Score(value, flag)
    return scores  # type: ignore[return-value]


def _score_batch(
    model: GPT, requests: Sequence[Request], batch: list[_Group], width: int, device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One forward pass over packed rows: (request indices, summed log-probabilities, greedy flags)."""
    rows = len(batch)
    tokens = np.zeros((rows, width), dtype=np.int64)
    positions = np.zeros((rows, width), dtype=np.int64)
    segments = np.full((rows, width), -1, dtype=np.int64)  # 0: the context, k: the k-th continuation, -1: padding
    predict_at, targets, owner, indices = [], [], [], []
    for row, group in enumerate(batch):
        n = len(group.context)
        tokens[row, :n] = group.context
        positions[row, :n] = np.arange(n)
        segments[row, :n] = 0
        at = n
        for k, index in enumerate(group.requests, 1):
            continuation = requests[index].continuation
            fed = len(continuation) - 1
            tokens[row, at : at + fed] = continuation[:-1]
            positions[row, at : at + fed] = np.arange(n, n + fed)
            segments[row, at : at + fed] = k
            # The first token is predicted at the context's last position, each next one at its predecessor's.
            predict_at += [row * width + n - 1, *range(row * width + at, row * width + at + fed)]
            targets += continuation
            owner += [len(indices)] * len(continuation)
            indices.append(index)
            at += fed
    tokens_t, positions_t, segments_t = (torch.from_numpy(a).to(device) for a in (tokens, positions, segments))
    # Query q may see key k: k not after q, and k in the context or in q's own continuation. Padding
    # (segment -1) sees the context before it, so that no row of the mask is empty.
    ahead = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = segments_t[:, :, None] == segments_t[:, None, :]
    mask = (ahead & (same | (segments_t[:, None, :] == 0)))[:, None]  # (B, 1, T, T)
    predict_at_t = torch.tensor(predict_at, device=device)
    targets_t = torch.tensor(targets, device=device)
    owner_t = torch.tensor(owner, device=device)
    with autocast(device, dtype):
        hidden = model.hidden_states(tokens_t, pos=positions_t, mask=mask).flatten(0, 1)[predict_at_t]
        token_logprobs, token_greedy = [], []
        for start in range(0, len(predict_at), LOGIT_ROWS):
            logits = model.lm_head(hidden[start : start + LOGIT_ROWS]).float()
            wanted = targets_t[start : start + LOGIT_ROWS]
            token_logprobs.append(F.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).squeeze(1))
            token_greedy.append(logits.argmax(dim=-1) == wanted)
    logprob = torch.zeros(len(indices), dtype=torch.float32, device=device).index_add_(0, owner_t, torch.cat(token_logprobs))
    misses = torch.zeros(len(indices), dtype=torch.int64, device=device).index_add_(0, owner_t, (~torch.cat(token_greedy)).long())
    return indices, logprob, misses == 0
