"""What a run says: its header, step lines, the time estimate (timed by `StepClock`, and early by a
watch thread while slow steps run), and the lines of each way it ends."""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..evaluate import EvalResult
from ..progress import format_duration
from ..runtime import dtype_name
from .distributed import World
from .setup import Setup

Log = Callable[[str], None]

# The time-to-max-steps estimate is the median step time after the first step (which pays for
# warm-up), printed once ESTIMATE_STEPS steps are timed or, for slow steps, ESTIMATE_SECONDS have
# passed. A first step still running after ESTIMATE_SECONDS gets a lower bound printed at once.
ESTIMATE_STEPS = 8
ESTIMATE_SECONDS = 30.0


def step_line(step: int, loss: float, best_loss: float, seconds: float) -> str:
    return f"step {step} | loss: {loss:.4f} | best_loss: {best_loss:.4f} | time: {seconds:.2f}s"


def val_line(step: int, val: EvalResult) -> str:
    return (f"step {step} | val_loss: {val.loss:.4f} | val_perplexity: {val.perplexity:.2f} | "
            f"val_bits_per_byte: {val.bits_per_byte:.4f}")


def opening_lines(setup: Setup) -> list[str]:
    """The header: the process, the model, the data and the run; then where a resumed run goes on from."""
    s, config, m = setup, setup.config, setup.config.model
    batch = f"{config.batch_size} x {config.seq_len}"
    if config.grad_accum > 1:
        batch += f" x {config.grad_accum} micro-steps"
    if s.world.distributed:
        batch += f" x {s.world.size} ranks{' (FSDP)' if config.fsdp else ''}"
    lines = [
        f"device: {s.device} | dtype: {dtype_name(s.dtype)} | parameters: {s.model.num_params():,}",
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab {m.vocab_size:,}",
        f"data: {s.corpus.source} | train tokens: {s.train_tokens:,} | val tokens: {len(s.corpus.val):,}",
        f"tokens per step: {config.tokens_per_step * s.world.size:,} ({batch}) | "
        f"lr {config.lr:g} -> {config.min_lr:g}, warmup {config.warmup_steps:,}, max steps {config.max_steps:,} | "
        f"target loss {config.target_loss}{' (none: trains to max steps)' if config.target_loss == 0 else ''}",
    ]
    if config.optimizer != "adamw" or config.schedule != "cosine":
        recipe = f"optimizer: {config.optimizer}"
        if config.optimizer == "muon":
            recipe += f" (lr {config.muon_lr:g} on the blocks' matrices, AdamW at lr {config.lr:g} on the rest)"
        recipe += f" | schedule: {config.schedule}"
        if config.schedule == "wsd":
            recipe += f", the decay over the last {config.decay_fraction:g} of max steps"
            if config.decay_at:
                recipe += f" or from the first loss below {config.decay_at:g} x the target"
        lines.append(recipe)
    lines += s.notes
    if s.device.type == "cpu" and s.dtype == torch.float16:
        lines.append("warning: this CPU computes float16 in software, many times slower than float32: "
                     "--dtype float32 (or bfloat16 on CPUs with AMX or AVX-512 BF16) trains faster")
    if s.start.saved is not None:
        lines.append(f"resumed from {s.start.checkpoint} at step {s.step:,} (best loss {s.monitor.best_loss:.6f})")
        lines += [f"changed on resume: {change}" for change in s.start.changes]
    elif config.init_from:
        lines.append(f"initialized from {config.init_from}")
    return lines


def startup_line(timings: dict[str, float | None]) -> str:
    """Where the seconds before the header went (with --debug)."""
    known = [seconds for seconds in timings.values() if seconds is not None]
    parts = " | ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items() if seconds is not None)
    return f"start-up: {sum(known):.2f} s to the header: {parts}"


def estimate_line(config: TrainConfig, device: torch.device, per_step: float, step: int, kind: str = "measured") -> str:
    """The time to max steps as printed; `kind`: measured, early (from the few steps done, a measured
    one follows) or lower bound (the first step is still running)."""
    total = per_step * (config.max_steps - step)
    if kind == "lower bound":
        line = (f"estimated time to max steps ({config.max_steps:,}): more than {format_duration(total)}, at more "
                f"than {per_step:.0f} s/step (the first step is still running)")
    elif kind == "early":
        line = (f"estimated time to max steps ({config.max_steps:,}): about {format_duration(total)} more at "
                f"{per_step:.1f} s/step, from the first {f'{step} steps' if step > 1 else 'step'} (a steadier "
                "estimate follows)")
    else:
        line = (f"estimated time to max steps ({config.max_steps:,}): {format_duration(total)} more at "
                f"{per_step:.2f} s/step (less if the target is reached first)")
    if device.type == "cpu" and config.preset != "tiny" and total > 3600:
        line += "; this model is too large for a CPU run, try `--preset tiny` for one that finishes in minutes"
    return line


class StepClock:
    """Times the steps, and says how long the run will take: the median step time after the first
    (which pays for warm-up), once ESTIMATE_STEPS steps are timed or ESTIMATE_SECONDS have passed.
    Slow steps must not keep a user waiting for it: when ESTIMATE_SECONDS pass before that estimate
    is due, `overdue` (which a watch thread polls while the loop is busy in a step) gives at once a
    first one, from the steps done so far or, if none is, a lower bound: the first step's time so far."""

    def __init__(self, first_step: int, clock: Callable[[], float] = time.perf_counter):
        self.first_step, self.clock = first_step, clock
        self.started = self.last = clock()
        self.times: list[float] = []  # of the steps after the first
        self.first_seconds = 0.0
        self.steps_done = 0
        self.estimated = self.warned = False
        self._lock = threading.Lock()  # the watch thread and the loop both decide what to say

    @property
    def last_step(self) -> int:
        """The last step done (first_step - 1 before any)."""
        return self.first_step - 1 + self.steps_done

    def start(self) -> None:
        self.started = self.last = self.clock()

    def lap(self) -> float:
        """Seconds since the previous step was read (or the loop started)."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        return seconds

    def step_done(self, step: int, seconds: float) -> float | None:
        """Record a finished step; the seconds per step to estimate from, the first time it is due."""
        with self._lock:
            self.steps_done += 1
            if self.estimated:
                return None
            if step > self.first_step:
                self.times.append(seconds)
            else:
                self.first_seconds = seconds
            due = len(self.times) >= ESTIMATE_STEPS or (self.times and self.clock() - self.started >= ESTIMATE_SECONDS)
            if not due:
                return None
            self.estimated = True
            return statistics.median(self.times)

    def overdue(self) -> tuple[float, bool] | None:
        """Once ESTIMATE_SECONDS have passed with no estimate yet (said once): (seconds per step, whether
        that is only a lower bound, the first step being still running)."""
        with self._lock:
            elapsed = self.clock() - self.started
            if self.estimated or self.warned or elapsed < ESTIMATE_SECONDS:
                return None
            self.warned = True
            if not self.steps_done:
                return elapsed, True
            return (statistics.median(self.times) if self.times else self.first_seconds), False

    @contextlib.contextmanager
    def watch(self, say: Callable[[float, int, str], None]) -> Iterator[None]:
        """While the body runs, a thread that calls say(seconds per step, last step done, kind) once an
        estimate is overdue; stopped and joined at the end, so that no thread outlives the run."""
        done = threading.Event()

        def run() -> None:
            while not done.wait(1.0):
                early = self.overdue()
                if early is not None:
                    per_step, lower_bound = early
                    say(per_step, self.last_step, "lower bound" if lower_bound else "early")
                    return

        thread = threading.Thread(target=run, daemon=True, name="gpt2train-estimate")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def metric_name(config: TrainConfig) -> str:
    """The loss the target applies to, as the closing lines name it."""
    return "best validation loss" if config.target_metric == "val" else "best loss"


def target_lines(best: float, final_path: Path) -> list[str]:
    """The seed's closing lines, after `Target loss achieved!`, and the perplexity."""
    return [
        f"Final model saved at: {final_path}",
        f"Training completed. Best loss: {best:.6f}",
        f"Final model perplexity: {math.exp(best):.4f} (exp of the best loss)",
    ]


def diverged_line(step: int, bad_in_a_row: int, last_checkpoint: Path | None) -> str:
    return (f"Stopping at step {step}: {bad_in_a_row} steps in a row had a non-finite loss or gradient, and none of "
            f"them changed the weights. The last checkpoint ({last_checkpoint or 'none was written'}) is intact: "
            "resume from it with a lower --lr or --dtype float32.")


def stopped_line(step: int, checkpoint: Path, run_dir: str, world: World) -> str:
    command = f"gpt2train train --resume {run_dir}"
    if world.distributed:
        command = f"the same torchrun command, running {command}"
    return f"Stopped at step {step}: checkpoint saved at {checkpoint}. Continue with: {command}"


def out_of_steps_line(config: TrainConfig, best: float, checkpoint: Path) -> str:
    return (f"Target loss {config.target_loss} not reached in {config.max_steps:,} steps "
            f"({metric_name(config)}: {best:.6f}, perplexity {math.exp(best):.4f}); no final model was written. "
            f"Raise --max-steps or --target-loss; continue this run with --resume --max-steps N. Its last "
            f"checkpoint ({checkpoint}) is a model too: `gpt2train sample --model {config.run_dir}`, or write it "
            f"as a final model file with `gpt2train export --model {checkpoint} --format pt --out model.pt`.")


def final_model_lost(final_path: Path, error: str, step: int, checkpoint: Path | None, checkpoint_error: str | None,
                     config: TrainConfig) -> str:
    """The one line for a final model that could not be written: where its weights are, and how to
    write it again."""
    if checkpoint is not None:
        return (f"could not write the final model {final_path} ({error}); the weights of step {step} are safe in the "
                f"checkpoint {checkpoint}: once {final_path.parent} can be written, write the final model from it "
                f"with `gpt2train export --model {checkpoint} --format {config.format} --out {final_path}`")
    last = latest_checkpoint(config.run_dir)
    then = (f"resume from its last checkpoint ({last.name}) with `gpt2train train --resume {config.run_dir}`"
            if last is not None else "train again (no earlier checkpoint of this run was written)")
    return (f"could not write the final model {final_path} ({error}) nor the checkpoint of step {step} "
            f"({checkpoint_error}): free some space, then {then}")


def target_checkpoint_lost(step: int, error: str, last: Path | None) -> str:
    """The final model is safe, but the checkpoint of the target step is not."""
    resume = f"from {last}" if last is not None else "from the beginning"
    return (f"warning: could not write the checkpoint of step {step} ({error}); the final model holds the trained "
            f"weights, but --resume with a lower --target-loss would go on {resume}")


def end_checkpoint_lost(step: int, error: str, last: Path | None, run_dir: str) -> str:
    """The checkpoint a run ends with (out of steps, stopped) failed: the run ends with this error."""
    then = (f"resume from the last checkpoint written ({last}) with `gpt2train train --resume {run_dir}`"
            if last is not None else "train again (no checkpoint of this run was written)")
    return (f"could not write the checkpoint of step {step} ({error}), so the training since the last one is lost: "
            f"free some space, then {then}")
