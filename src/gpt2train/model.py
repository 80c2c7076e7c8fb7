"""GPT-2: the model and its configuration. No I/O, no device or dtype logic."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# The output head is the token embedding (tied weights): one tensor under two names. Files store it
# once, under the embedding's name.
TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position table covers
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2

    def __post_init__(self) -> None:
        # The default recipe's loading snippet (see config.py) calls GPTConfig(checkpoint['config'])
        # with the dict as the first positional argument; accept that spelling as well as GPTConfig(**d).
        if isinstance(self.block_size, Mapping):
            values = dict(self.block_size)
            self.block_size = GPTConfig.block_size
            known = {f.name for f in fields(self)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise TypeError(f"GPTConfig got unknown keys: {', '.join(unknown)}")
            for name, value in values.items():
                setattr(self, name, value)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameters of the GPT this config builds (the tied embedding once), counted without building it."""
        C, b = self.n_embd, int(self.bias)
        norm = C * (1 + b)
        block = 2 * norm + (3 * C * C + 3 * C * b) + (C * C + C * b) + (4 * C * C + 4 * C * b) + (4 * C * C + C * b)
        return (self.vocab_size + self.block_size) * C + self.n_layer * block + norm


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, a chunk of rows at a time.

    The output layer's logits (rows x vocabulary, in fp32 the largest tensors of a training step)
    exist only one chunk at a time: each chunk's loss and its gradients with respect to the hidden
    states and the weight are computed together in the forward pass, and the backward pass only
    scales them. Under autocast the products run in its dtype, as the unchunked layer's do.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, rows, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.t()).float()  # (chunk, vocab)
            log_probs = torch.log_softmax(logits, dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            grad = log_probs.exp_()  # d loss / d logits: softmax - one_hot(target), over all rows
            grad.scatter_add_(1, t[:, None], torch.full_like(grad[:, :1], -1.0))
            grad /= rows
            grad_hidden[start : start + chunk] = grad @ weight
            grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


class KVCache:
    """The keys and values of every position seen so far, so that decoding a new token costs one
    position's work instead of re-running the whole context."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled; the model advances it after each forward pass

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys and values; return all of them so far."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.layer = layer  # which slot of a KVCache is this layer's
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        causal = mask is None  # an explicit mask (True: may attend) replaces the causal one
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer, k, v)  # (B, nh, past + T, hs)
            if past > 0:
                # Query i sits at position past + i and sees the keys up to there: all of them when T is 1.
                causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """The input embedding and the output layer are one matrix."""
        self.transformer.wte.weight = self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation, of every parameter. Also what makes a model built on the meta device
        and then given memory (`to_empty`) a model: each weight is drawn once, where it lives."""
        self.tie_weights()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scaled_init", False):
                # Each block adds two projections to the residual stream; keep its variance flat.
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def shard_units(self) -> list[nn.Module]:
        """The modules worth distributing one at a time (the transformer blocks)."""
        return list(self.transformer.h)

    def num_params(self) -> int:
        """Parameter count with the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final LayerNorm's output at every position, (B, T, C): what the output layer reads.

        `pos` (B, T) and `mask` (B, 1, T, T), True where a query may attend to a key, describe packed
        sequences: several token runs in one row, each with its own positions and what it can see.
        Without them the row is one causal sequence, continuing the `cache` if one is given. The caller
        keeps packed positions below block_size.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache, mask)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    LOSS_CHUNK = 1024  # rows of logits at a time, when they are not returned

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when targets are given.

        With a `cache`, `idx` continues the sequence the cache holds and is appended to it. With
        targets and `return_logits=False`, only the loss is computed, the output layer and the loss
        together a chunk of positions at a time (ChunkedCrossEntropy): the same loss and gradients
        without the memory for the whole batch's logits; the logits returned are None.
        """
        x = self.hidden_states(idx, cache=cache)
        if targets is not None and not return_logits:
            loss = ChunkedCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), self.LOSS_CHUNK)
            return None, loss
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
