"""`gpt2train eval`: a saved model scored on text (`score_text`) or on a benchmark task (`score_task`),
and the lines that say how it did."""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from . import hellaswag
from .corpus import load_corpus
from .device import resolve_device, resolve_dtype
from .errors import UserError
from .evaluate import evaluate
from .final_model import load_model
from .prepare import tokenize_inputs
from .progress import ProgressLines
from .training import distributed


def score_text(model_path: str, inputs: list[str], data: str | None, seq_len: int, batch_size: int, max_tokens: int,
               device: str, dtype: str) -> list[str]:
    """A saved model's loss, perplexity and bits per byte on text files, or on a prepared directory's
    validation split (with neither, the built-in corpus's), `seq_len` tokens per window (0: the
    model's context); the lines that say so. Progress on stderr."""
    if data and inputs:
        raise UserError("give either --data or input files, not both")
    if seq_len < 0 or batch_size < 1 or max_tokens < 0:
        raise UserError("--seq-len and --max-tokens must not be negative, --batch-size at least 1")
    run_device = resolve_device(device)
    run_dtype = resolve_dtype(dtype, run_device)
    model = load_model(model_path, device=run_device)
    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
    if inputs:
        tokens, source = tokenize_inputs(inputs), ", ".join(inputs)
    else:
        corpus = load_corpus(data or "")
        if corpus.note:
            print(f"gpt2train eval: {corpus.note}", file=sys.stderr)
        tokens, source = corpus.val, f"{corpus.source} (validation split)"
    if len(tokens) < 2:
        raise UserError(f"{source} holds fewer than two tokens: nothing to score")

    progress = ProgressLines("tokens")
    result = evaluate(model, tokens, seq_len, batch_size, run_device, run_dtype, max_tokens=max_tokens,
                      progress=progress)
    progress.close()
    if not math.isfinite(result.loss):
        raise UserError(f"{model_path} computes a non-finite loss ({result.loss}) on {source}: its weights hold "
                        "non-finite values; use another model file")
    return [f"data: {source} | tokens: {result.tokens:,} | bytes: {result.bytes:,}",
            f"val loss: {result.loss:.4f} | perplexity: {result.perplexity:.2f} | bits per byte: {result.bits_per_byte:.4f}"]


def score_task(model_path: str, task: str, data: str | None, limit: int, device: str, dtype: str,
               as_json: bool = False) -> list[str]:
    """A saved model's accuracies on a benchmark task (HellaSwag), its first `limit` items (0: all),
    each process of a torchrun launch scoring its share; the lines that say so (none on ranks other
    than 0), or one JSON object. Progress on stderr."""
    if limit < 0:
        raise UserError("--limit must not be negative (0 scores every item)")
    world = distributed.world_from_env()
    try:
        run_device = distributed.join(world, resolve_device(device))
        run_dtype = resolve_dtype(dtype, run_device)
        if world.is_main:  # fetched once, not by every rank at the same time
            hellaswag.dataset_path(data or "", progress=sys.stderr.isatty())
        distributed.barrier(world)
        items = hellaswag.read_items(hellaswag.dataset_path(data or ""), limit)
        model = load_model(model_path, device=run_device)
        progress = ProgressLines("items") if world.is_main else None

        def report(done: int, total: int) -> None:  # rank 0's share stands for every rank's
            progress(min(done * world.size, len(items)), len(items))

        started = time.perf_counter()
        counts = hellaswag.score(model, items[world.rank :: world.size], run_device, run_dtype,
                                 progress=report if progress is not None else None)
        total = distributed.sum_(torch.tensor(counts.as_tuple(), device=run_device), world).tolist()
        seconds = time.perf_counter() - started
    finally:
        distributed.leave()
    if progress is not None:
        progress.close()
    if not world.is_main:
        return []
    counts = hellaswag.Counts(*total)
    figures = counts.accuracies()
    if as_json:
        return [json.dumps({"task": task, "items": counts.items, **figures, "seconds": round(seconds, 3)})]
    return [
        f"task: hellaswag | items: {counts.items:,} | {seconds:.1f} s ({counts.items / seconds:.1f} items/s)",
        f"acc: {figures['acc']:.4f} (lm-evaluation-harness: the likeliest ending)",
        f"acc_norm: {figures['acc_norm']:.4f} (lm-evaluation-harness: the likeliest per character)",
        f"acc_norm_completion: {figures['acc_norm_completion']:.4f} (build-nanogpt and llm.c: the lowest loss per token)",
    ]
