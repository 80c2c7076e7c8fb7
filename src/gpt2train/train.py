"""The training loop: steps, the target check, the seed's log lines, checkpoints and resume."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    delete_checkpoints, find_checkpoint, latest_checkpoint, read_checkpoint, run_dir_of, save_checkpoint,
)
from .config import TrainConfig, resume_changes
from .data import SAMPLERS, Corpus, Sampler, load_corpus
from .errors import UserError
from .files import check_writable_dir
from .final_model import final_model_path, save_final_model
from .model import GPT
from .optim import build_optimizer, lr_at
from .prefetch import Prefetcher
from .runtime import (
    StopRequests, autocast, dtype_name, keep_freed_memory_mapped, needs_grad_scaler, resolve_device, resolve_dtype,
    restore_rng_state, rng_state, seed_everything,
)

# How a run ended (TrainResult.status).
TARGET_REACHED = "target_reached"
MAX_STEPS = "max_steps"
INTERRUPTED = "interrupted"
DIVERGED = "diverged"

# The time-to-max-steps estimate is the median step time after the first step (which pays for
# warm-up), printed once ESTIMATE_STEPS steps are timed or, for slow steps, ESTIMATE_SECONDS have passed.
ESTIMATE_STEPS = 8
ESTIMATE_SECONDS = 30.0
# With checkpoint_interval 0, checkpoints are spaced to about this much training time.
AUTO_CHECKPOINT_SECONDS = 600.0

Log = Callable[[str], None]


def print_flush(line: str) -> None:
    print(line, flush=True)


@dataclass
class TrainResult:
    status: str  # TARGET_REACHED, MAX_STEPS, INTERRUPTED or DIVERGED
    steps: int  # the last step run
    best_loss: float
    final_model_path: Path | None  # set when the target was reached
    checkpoint_path: Path | None  # the newest checkpoint written
    model: GPT
    losses: list[float] = field(default_factory=list)  # the training loss of every step this call ran
    signal_number: int | None = None  # the signal that interrupted the run

    @property
    def reached_target(self) -> bool:
        return self.status == TARGET_REACHED


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


class LossMonitor:
    """Watches each step's loss: the best so far, updates skipped for non-finite values, spikes."""

    WINDOW = 100  # recent losses the spike test compares against
    MIN_HISTORY = 20
    SPIKE_SIGMAS = 6.0

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.bad_in_a_row = 0
        self.skipped = 0
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    def observe(self, step: int, loss: float, grad_norm: float, applied: bool) -> list[str]:
        """Record a step; returns the lines worth logging about it."""
        if not applied:
            self.bad_in_a_row += 1
            self.skipped += 1
            what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient norm ({grad_norm})"
            return [f"step {step}: {what}; update skipped ({self.bad_in_a_row} in a row, {self.skipped} in all)"]
        self.bad_in_a_row = 0
        self.best_loss = min(self.best_loss, loss)
        events = []
        if len(self.recent) >= self.MIN_HISTORY:
            mean, spread = statistics.fmean(self.recent), statistics.pstdev(self.recent)
            if spread > 0 and loss > mean + self.SPIKE_SIGMAS * spread:
                events.append(
                    f"step {step}: loss spike {loss:.4f}, {(loss - mean) / spread:.1f} standard deviations "
                    f"above the recent mean {mean:.4f}"
                )
        self.recent.append(loss)
        return events

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped,
                "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.skipped = state["skipped"]
        self.recent = deque(state["recent"], maxlen=self.WINDOW)


@dataclass
class Trainee:
    """What one training step reads and changes."""

    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype


def train_step(t: Trainee, x: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float) -> tuple[float, float, bool]:
    """One optimizer step on a batch: (loss, gradient norm, whether the update was applied).

    An update whose loss or gradient norm is not finite is not applied; with fp16 the GradScaler
    skips it and lowers its scale.
    """
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    with autocast(t.device, t.dtype):
        _, loss = t.model(x, y)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)
    grads = [p.grad for p in t.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one sync
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite and grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(t.model.parameters(), grad_clip, grad_norm)
    if t.scaler.is_enabled():
        t.scaler.step(t.optimizer)  # skips the update itself when the gradients overflowed
        t.scaler.update()
    elif finite:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, finite


def _data_identity(corpus: Corpus, train_tokens: int) -> dict:
    return {"source": corpus.source, "text_sha256": corpus.text_sha256, "train_tokens": train_tokens}


def _checkpoint_to_resume(config: TrainConfig) -> tuple[Path, dict, list[str]] | None:
    """(path, contents, changed settings) of the checkpoint to resume, or None for a new run.

    A new run never silently replaces an earlier run's checkpoints.
    """
    if not config.resume:
        existing = latest_checkpoint(config.run_dir)
        if existing is not None:
            if not config.overwrite:
                raise UserError(
                    f"{config.run_dir} holds checkpoints of an earlier run (latest: {existing.name}): continue it "
                    "with --resume, start over with --overwrite (deletes them), or choose another --run-dir"
                )
            delete_checkpoints(config.run_dir)
        return None
    path = find_checkpoint(config.resume, config.run_dir)
    saved = read_checkpoint(path)
    changes = resume_changes(saved["config"], config)
    step = saved["step"]
    if step >= config.max_steps:
        raise UserError(f"{path} is at step {step}, and max_steps is {config.max_steps}: raise --max-steps to continue")
    if saved.get("finished") == TARGET_REACHED and saved["config"]["target_loss"] == config.target_loss:
        raise UserError(
            f"the run in {run_dir_of(path)} already reached its target loss at step {step}: lower --target-loss "
            "to train it further"
        )
    return path, saved, changes


def _restore(saved: dict, t: Trainee, sampler: Sampler, monitor: LossMonitor, data: dict, path: Path) -> None:
    if saved["data"] != data:
        raise UserError(
            f"the training data differs from the one {path} was trained on ({saved['data']['source']}, "
            f"{saved['data']['train_tokens']:,} tokens): resume with the same data, or start a new run"
        )
    try:
        t.model.load_state_dict(saved["model"])
        # Moments and step counts from the checkpoint; hyperparameters from this run's config.
        t.optimizer.load_state_dict({"state": saved["optimizer"]["state"],
                                     "param_groups": t.optimizer.state_dict()["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}): is it from another run?") from None
    if t.scaler.is_enabled() and saved["scaler"]:
        t.scaler.load_state_dict(saved["scaler"])
    sampler.load_state_dict(saved["sampler"])
    monitor.load_state_dict(saved["monitor"])
    restore_rng_state(saved["rng"])  # last: building the model above drew from the generators


def _header(config: TrainConfig, model: GPT, device, dtype, corpus: Corpus, train_tokens: int) -> list[str]:
    m = config.model
    return [
        f"device: {device} | dtype: {dtype_name(dtype)} | parameters: {model.num_params():,}",
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab {m.vocab_size:,}",
        f"data: {corpus.source} | train tokens: {train_tokens:,} | val tokens: {len(corpus.val):,}",
        f"tokens per step: {config.tokens_per_step:,} ({config.batch_size} x {config.seq_len}) | "
        f"lr {config.lr:g} -> {config.min_lr:g}, warmup {config.warmup_steps:,}, max steps {config.max_steps:,} | "
        f"target loss {config.target_loss}",
    ]


def _estimate_line(config: TrainConfig, device: torch.device, per_step: float, step: int) -> str:
    total = per_step * (config.max_steps - step)
    line = (
        f"estimated time to max steps ({config.max_steps:,}): {format_duration(total)} more at {per_step:.2f} s/step "
        f"(less if the target is reached first)"
    )
    if device.type == "cpu" and config.preset != "tiny" and total > 3600:
        line += "; this model is too large for a CPU run, try `--preset tiny` for one that finishes in minutes"
    return line


def auto_checkpoint_interval(seconds_per_step: float) -> int:
    """Steps in about AUTO_CHECKPOINT_SECONDS of training, rounded down to 1, 2 or 5 x 10^k."""
    steps = max(1.0, AUTO_CHECKPOINT_SECONDS / max(seconds_per_step, 1e-9))
    magnitude = 10 ** math.floor(math.log10(steps))
    return int(max(m * magnitude for m in (1, 2, 5) if m * magnitude <= steps))


def train(config: TrainConfig, log: Log = print_flush) -> TrainResult:
    """Train until the training loss first drops below config.target_loss, or max_steps pass.

    At the target, the fp16 final model is written to config.out_dir. Checkpoints go to
    config.run_dir/checkpoints; config.resume continues from one exactly.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    final_path = final_model_path(config.out_dir, config.format)
    check_writable_dir(final_path.parent, "final model")
    check_writable_dir(config.run_dir, "checkpoints")
    resume = _checkpoint_to_resume(config)
    if device.type == "cpu":
        keep_freed_memory_mapped()
    seed_everything(config.seed)

    corpus = load_corpus(config.data)
    tokens = corpus.train[: config.train_tokens] if config.train_tokens else corpus.train
    sampler: Sampler = SAMPLERS[config.sampling](tokens, config.batch_size, config.seq_len, seed=config.seed)
    if device.type == "cuda":
        sampler = Prefetcher(sampler)
    model = GPT(config.model).to(device)
    t = Trainee(
        model=model,
        optimizer=build_optimizer(model, config.lr, config.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(dtype)),
        device=device,
        dtype=dtype,
    )
    monitor = LossMonitor()
    data = _data_identity(corpus, len(tokens))
    start_step = 0
    for line in _header(config, model, device, dtype, corpus, len(tokens)):
        log(line)
    if resume is not None:
        path, saved, changes = resume
        _restore(saved, t, sampler, monitor, data, path)
        start_step = saved["step"]
        del saved
        log(f"resumed from {path} at step {start_step:,} (best loss {monitor.best_loss:.6f})")
        for change in changes:
            log(f"changed on resume: {change}")

    def checkpoint(step: int, finished: str = "") -> Path:
        contents = {
            "config": config.to_flat_dict(),
            "best_loss": monitor.best_loss,
            "lr": lr_at(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps),  # the next step's
            "finished": finished,
            "model": model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scaler": t.scaler.state_dict(),
            "rng": rng_state(),
            "sampler": sampler.state_dict(),
            "monitor": monitor.state_dict(),
            "data": data,
        }
        return save_checkpoint(config.run_dir, step, contents, keep=config.keep_checkpoints)

    losses: list[float] = []

    def result(status: str, step: int, **extra) -> TrainResult:
        return TrainResult(status, step, monitor.best_loss, model=model, losses=losses, **extra)

    step_times: list[float] = []
    interval = config.checkpoint_interval
    if interval:
        log(f"checkpoints every {interval:,} steps, at the end and when stopped, in {Path(config.run_dir) / 'checkpoints'}")
    estimated = False
    loop_started = time.perf_counter()
    with StopRequests() as stop:
        for step in range(start_step + 1, config.max_steps + 1):
            started = time.perf_counter()
            lr = lr_at(step - 1, config.lr, config.min_lr, config.warmup_steps, config.max_steps)
            x, y = sampler.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, grad_norm, applied = train_step(t, x, y, lr, config.grad_clip)
            seconds = time.perf_counter() - started
            losses.append(loss)
            events = monitor.observe(step, loss, grad_norm, applied)
            reached = loss < config.target_loss  # NaN never is

            if step % config.log_interval == 0 or reached:
                log(format_step_line(step, loss, monitor.best_loss, seconds))
            for event in events:
                log(event)
            if step > start_step + 1:
                step_times.append(seconds)
            if (
                not estimated and step_times and step < config.max_steps
                and (len(step_times) >= ESTIMATE_STEPS or time.perf_counter() - loop_started > ESTIMATE_SECONDS)
            ):
                per_step = statistics.median(step_times)
                log(_estimate_line(config, device, per_step, step))
                if not interval:
                    interval = auto_checkpoint_interval(per_step)
                    log(f"checkpoints every {interval:,} steps (about {format_duration(interval * per_step)}), "
                        f"at the end and when stopped, in {Path(config.run_dir) / 'checkpoints'}")
                estimated = True

            if reached:
                save_final_model(model, final_path, step=step, best_loss=monitor.best_loss)
                saved_to = checkpoint(step, finished=TARGET_REACHED)
                log(f"Target loss achieved! Best loss: {monitor.best_loss:.6f}")
                log(f"Final model saved at: {final_path}")
                log(f"Training completed. Best loss: {monitor.best_loss:.6f}")
                log(f"Final model perplexity: {math.exp(monitor.best_loss):.4f} (exp of the best loss)")
                return result(TARGET_REACHED, step, final_model_path=final_path, checkpoint_path=saved_to)
            if monitor.bad_in_a_row >= config.max_bad_steps:
                last = latest_checkpoint(config.run_dir)
                log(
                    f"Stopping at step {step}: {monitor.bad_in_a_row} steps in a row had a non-finite loss or gradient, "
                    f"and none of them changed the weights. The last checkpoint ({last or 'none was written'}) is "
                    "intact: resume from it with a lower --lr or --dtype float32."
                )
                return result(DIVERGED, step, final_model_path=None, checkpoint_path=last)
            if stop.signal_number is not None:
                saved_to = checkpoint(step)
                log(f"Stopped at step {step}: checkpoint saved at {saved_to}. "
                    f"Continue with: gpt2train train --resume {config.run_dir}")
                return result(INTERRUPTED, step, final_model_path=None, checkpoint_path=saved_to,
                              signal_number=stop.signal_number)
            # Never during a run of bad steps: the last good checkpoint is the one to go back to.
            if interval and step % interval == 0 and step < config.max_steps and monitor.bad_in_a_row == 0:
                log(f"checkpoint saved: {checkpoint(step)}")

    saved_to = checkpoint(config.max_steps, finished=MAX_STEPS)
    log(
        f"Target loss {config.target_loss} not reached in {config.max_steps:,} steps "
        f"(best loss: {monitor.best_loss:.6f}, perplexity {math.exp(monitor.best_loss):.4f}); no final model was written. "
        f"Raise --max-steps or --target-loss; continue this run with --resume --max-steps N."
    )
    return result(MAX_STEPS, config.max_steps, final_model_path=None, checkpoint_path=saved_to)
