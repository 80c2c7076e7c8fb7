"""The training loop: steps, the target check, the seed's log lines, the final model."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import save_final_model
from .config import TrainConfig
from .data import RandomWindowSampler, load_corpus
from .model import GPT
from .optim import build_optimizer, lr_at
from .runtime import (
    autocast, dtype_name, keep_freed_memory_mapped, needs_grad_scaler, resolve_device, resolve_dtype, seed_everything,
)

FINAL_MODEL_NAME = "final_model.pt"
# Exit status of a run that used all its steps without reaching the target: distinct from a
# crash (1) and from a usage error (2).
EXIT_TARGET_NOT_REACHED = 3
# The time-to-max-steps estimate is the median step time after the first step (which pays for
# warm-up), printed once ESTIMATE_STEPS steps are timed or, for slow steps, ESTIMATE_SECONDS have passed.
ESTIMATE_STEPS = 8
ESTIMATE_SECONDS = 30.0

Log = Callable[[str], None]


def print_flush(line: str) -> None:
    print(line, flush=True)


@dataclass
class TrainResult:
    reached_target: bool
    steps: int
    best_loss: float
    final_model_path: Path | None
    model: GPT
    losses: list[float] = field(default_factory=list)  # the training loss of every step


def format_step_line(step: int, loss: float, best_loss: float, seconds: float) -> str:
    return f"step {step} | loss: {loss:.4f} | best_loss: {best_loss:.4f} | time: {seconds:.2f}s"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _header(config: TrainConfig, model: GPT, device, dtype, corpus, train_tokens: int) -> list[str]:
    m = config.model
    return [
        f"device: {device} | dtype: {dtype_name(dtype)} | parameters: {model.num_params():,}",
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab {m.vocab_size:,}",
        f"data: {corpus.source} | train tokens: {train_tokens:,} | val tokens: {len(corpus.val):,}",
        f"tokens per step: {config.tokens_per_step:,} ({config.batch_size} x {config.seq_len}) | "
        f"lr {config.lr:g} -> {config.min_lr:g}, warmup {config.warmup_steps:,}, max steps {config.max_steps:,} | "
        f"target loss {config.target_loss}",
    ]


def _estimate_line(config: TrainConfig, device: torch.device, step_times: list[float]) -> str:
    per_step = statistics.median(step_times)
    total = per_step * config.max_steps
    line = (
        f"estimated time to max steps ({config.max_steps:,}): {format_duration(total)} at {per_step:.2f} s/step "
        f"(less if the target is reached first)"
    )
    if device.type == "cpu" and config.preset != "tiny" and total > 3600:
        line += "; this model is too large for a CPU run, try `--preset tiny` for one that finishes in minutes"
    return line


def train(config: TrainConfig, log: Log = print_flush) -> TrainResult:
    """Train until the training loss first drops below config.target_loss, or max_steps pass.

    At the target, the fp16 final model is written to config.out_dir/final_model.pt.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        keep_freed_memory_mapped()
    seed_everything(config.seed)

    corpus = load_corpus(config.data)
    tokens = corpus.train[: config.train_tokens] if config.train_tokens else corpus.train
    sampler = RandomWindowSampler(tokens, config.batch_size, config.seq_len, seed=config.seed)
    model = GPT(config.model).to(device)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(dtype))
    final_path = Path(config.out_dir) / FINAL_MODEL_NAME

    for line in _header(config, model, device, dtype, corpus, len(tokens)):
        log(line)

    best_loss = math.inf
    losses: list[float] = []
    step_times: list[float] = []
    estimated = False
    loop_started = time.perf_counter()
    for step in range(1, config.max_steps + 1):
        started = time.perf_counter()
        lr = lr_at(step - 1, config.lr, config.min_lr, config.warmup_steps, config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x, y = sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        loss_value = loss.item()
        seconds = time.perf_counter() - started
        losses.append(loss_value)
        best_loss = min(best_loss, loss_value)
        reached = loss_value < config.target_loss

        if step % config.log_interval == 0 or reached:
            log(format_step_line(step, loss_value, best_loss, seconds))
        if step > 1:
            step_times.append(seconds)
        if (
            not estimated and step_times and step < config.max_steps
            and (len(step_times) >= ESTIMATE_STEPS or time.perf_counter() - loop_started > ESTIMATE_SECONDS)
        ):
            log(_estimate_line(config, device, step_times))
            estimated = True
        if reached:
            save_final_model(model, final_path, step=step, best_loss=best_loss)
            log(f"Target loss achieved! Best loss: {best_loss:.6f}")
            log(f"Final model saved at: {final_path}")
            log(f"Training completed. Best loss: {best_loss:.6f}")
            log(f"Final model perplexity: {math.exp(best_loss):.4f} (exp of the best loss)")
            return TrainResult(True, step, best_loss, final_path, model, losses)

    log(
        f"Target loss {config.target_loss} not reached in {config.max_steps:,} steps "
        f"(best loss: {best_loss:.6f}, perplexity {math.exp(best_loss):.4f}); no final model was written. "
        f"Raise --max-steps or --target-loss."
    )
    return TrainResult(False, config.max_steps, best_loss, None, model, losses)
