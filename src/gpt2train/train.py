"""The training loop: set-up, the steps, and what each step's numbers decide: the log lines, the
target, checkpoints, and the end of the run."""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .checkpoint import MAX_STEPS, TARGET_REACHED, RunState, clear_earlier_run, latest_checkpoint, start_run
from .config import TrainConfig
from .corpus import load_corpus
from .data import SAMPLERS
from .distributed import World, world_from_env
from .errors import UserError
from .evaluate import EvalResult, evaluate
from .final_model import final_model_path, save_final_model
from .hf import read_hf_model
from .metrics import RunRecorder
from .model import GPT
from .optim import build_optimizer, lr_at
from .parallel import parallelize
from .plot import plot_run
from .prefetch import Prefetcher
from .progress import format_duration
from .runtime import (
    StopRequests, configure_backends, dtype_name, resolve_device, resolve_dtype, seed_everything, use_compile,
)
from .step import Batches, Flags, PendingStep, Stepper, StepResult

# How a run ended (TrainResult.status); the checkpoint records the first two.
INTERRUPTED = "interrupted"
DIVERGED = "diverged"

# The time-to-max-steps estimate is the median step time after the first step (which pays for
# warm-up), printed once ESTIMATE_STEPS steps are timed or, for slow steps, ESTIMATE_SECONDS have
# passed. A first step still running after ESTIMATE_SECONDS gets a lower bound printed at once.
ESTIMATE_STEPS = 8
ESTIMATE_SECONDS = 30.0
# With checkpoint_interval 0, checkpoints are spaced to about this much training time.
AUTO_CHECKPOINT_SECONDS = 600.0

Log = Callable[[str], None]


def print_flush(line: str) -> None:
    print(line, flush=True)


def quiet(line: str) -> None:
    """The log of ranks other than 0."""


@dataclass
class TrainResult:
    status: str  # TARGET_REACHED, MAX_STEPS, INTERRUPTED or DIVERGED
    steps: int  # the last step run
    best_loss: float  # of the loss the target applies to
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


class LossMonitor:
    """Watches each step's loss: the best so far, updates skipped for non-finite values, spikes."""

    WINDOW = 100  # recent losses the spike test compares against
    MIN_HISTORY = 20
    SPIKE_SIGMAS = 6.0

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_val_loss = math.inf
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

    def observe_val(self, loss: float) -> None:
        self.best_val_loss = min(self.best_val_loss, loss)

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_val_loss": self.best_val_loss, "bad_in_a_row": self.bad_in_a_row,
                "skipped": self.skipped, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.best_val_loss = state["best_val_loss"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.skipped = state["skipped"]
        self.recent = deque(state["recent"], maxlen=self.WINDOW)


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


def auto_checkpoint_interval(seconds_per_step: float) -> int:
    """Steps in about AUTO_CHECKPOINT_SECONDS of training, rounded down to 1, 2 or 5 x 10^k."""
    steps = max(1.0, AUTO_CHECKPOINT_SECONDS / max(seconds_per_step, 1e-9))
    magnitude = 10 ** math.floor(math.log10(steps))
    return int(max(m * magnitude for m in (1, 2, 5) if m * magnitude <= steps))


def build_stepper(model: GPT, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                  world: World = World()) -> Stepper:
    """The training step for `model`: parallelized and compiled from outside, then the optimizer over
    what each rank holds."""
    parallel = parallelize(model, device, dtype, world, fsdp=config.fsdp, compile=use_compile(config.compile, device),
                           compile_blocks=config.compile_blocks)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    return Stepper(model, optimizer, device, dtype, config.grad_clip, parallel.forward, world, parallel.sharded,
                   fused_loss=config.fused_loss)


def train(config: TrainConfig, log: Log = print_flush) -> TrainResult:
    """Train until the training loss first drops below config.target_loss, or max_steps pass.

    At the target, the fp16 final model is written to config.out_dir. Checkpoints, config.toml,
    metrics.jsonl and loss.png go to config.run_dir; config.resume continues a run exactly (the
    checkpoint's config, with the settings given explicitly on top). Under torchrun every process
    calls this; rank 0 alone prints and writes files.
    """
    world = world_from_env()
    try:
        result = Trainer(config, log, world).run()
        # torchrun ends the other ranks as soon as one exits with a failure status, as a run that
        # stops short of its target does: no rank leaves before rank 0 has written everything.
        distributed.barrier(world)
        return result
    finally:
        distributed.leave()


@dataclass
class Observed:
    """What the loop learned about one step."""

    step: int
    result: StepResult
    seconds: float  # wall time since the previous step was read
    events: list[str]  # non-finite steps and spikes
    val: EvalResult | None  # at evaluation steps
    reached: bool  # the target is reached at this step


class Trainer:
    """One training run: set up (new or resumed) on construction, then `run()` to its end."""

    def __init__(self, config: TrainConfig, log: Log = print_flush, world: World | None = None):
        self.world = world = world or world_from_env()
        self.log = log if world.is_main else quiet  # rank 0 alone speaks
        # New or resumed (then with the checkpoint's config): decided, and refused if it must be,
        # before anything on disk changes.
        start = start_run(config, world)
        self.config = config = start.config
        # The process: its place among the ranks, device and precision.
        self.device = distributed.join(world, resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device)
        clear_earlier_run(start, world)
        configure_backends(self.device, deterministic=config.deterministic)
        seed_everything(config.seed)  # the same on every rank: the same initial weights and dropout

        # The data.
        self.corpus = load_corpus(config.data)
        if config.target_metric == "val" and len(self.corpus.val) < 2:
            raise UserError(f"--target-metric val needs a validation split, and {self.corpus.source} has none: "
                            "prepare the data with a --val-fraction above 0")
        tokens = self.corpus.train[: config.train_tokens] if config.train_tokens else self.corpus.train
        self.sampler = SAMPLERS[config.sampling](tokens, config.batch_size, config.seq_len, seed=config.seed,
                                                 rank=world.rank, world_size=world.size)
        if self.device.type == "cuda":
            self.sampler = Prefetcher(self.sampler)

        # The model and its training step.
        with torch.device(self.device):  # initialised where it trains: no host-side init and copy
            self.model = GPT(config.model)
        if config.init_from and start.saved is None:  # a resumed run takes its weights from the checkpoint
            self.model.load_state_dict(read_hf_model(config.init_from)[1])
        self.stepper = build_stepper(self.model, config, self.device, self.dtype, world)
        # On a GPU the host reads each step's loss one step late, while the device runs the next one.
        self.lag = 1 if self.device.type == "cuda" else 0
        self.tokens_per_step = config.tokens_per_step * world.size

        # What a checkpoint holds, and where the run stands.
        self.monitor = LossMonitor()
        data = {"source": self.corpus.source, "text_sha256": self.corpus.text_sha256, "train_tokens": len(tokens)}
        self.state = RunState(config, world, self.stepper, self.sampler, self.monitor, data, start.run_id)
        for line in self._header(len(tokens)):
            self.log(line)
        self.step = 0
        if start.saved is not None:
            self.step = self.state.restore(start.saved, start.checkpoint)
            self.log(f"resumed from {start.checkpoint} at step {self.step:,} (best loss {self.monitor.best_loss:.6f})")
            for change in start.changes:
                self.log(f"changed on resume: {change}")
        elif config.init_from:
            self.log(f"initialized from {config.init_from}")
        self.recorder = RunRecorder(config, resumed_step=self.step) if world.is_main else None
        self.final_path = final_model_path(config.out_dir, config.format)
        self.interval = config.checkpoint_interval  # 0: chosen from the step time, once estimated
        self.losses: list[float] = []
        self.clock = StepClock(self.step + 1)
        self.stop = StopRequests()

    def _header(self, train_tokens: int) -> list[str]:
        config, m, world = self.config, self.config.model, self.world
        batch = f"{config.batch_size} x {config.seq_len}"
        if config.grad_accum > 1:
            batch += f" x {config.grad_accum} micro-steps"
        if world.distributed:
            batch += f" x {world.size} ranks{' (FSDP)' if config.fsdp else ''}"
        return [
            f"device: {self.device} | dtype: {dtype_name(self.dtype)} | parameters: {self.model.num_params():,}",
            f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab {m.vocab_size:,}",
            f"data: {self.corpus.source} | train tokens: {train_tokens:,} | val tokens: {len(self.corpus.val):,}",
            f"tokens per step: {self.tokens_per_step:,} ({batch}) | "
            f"lr {config.lr:g} -> {config.min_lr:g}, warmup {config.warmup_steps:,}, max steps {config.max_steps:,} | "
            f"target loss {config.target_loss}",
        ]

    # The loop.

    def run(self) -> TrainResult:
        """Step until the target, max_steps, too many bad steps or a stop signal."""
        if self.interval:
            self.log(f"checkpoints every {self.interval:,} steps, at the end and when stopped, in "
                     f"{Path(self.config.run_dir) / 'checkpoints'}")
        self.clock.start()
        stop_watching = self._watch_first_step()
        try:
            with self.stop:
                steps = self.stepper.run(self.step + 1, self.config.max_steps, self._draw, self._lr, self._flags,
                                         self.lag)
                for pending in steps:
                    ended = self._finish(pending)
                    if ended is not None:
                        self.stepper.discard()  # a step queued after this one is never applied
                        return ended
                return self._out_of_steps()
        finally:
            stop_watching()

    def _draw(self, step: int) -> tuple[dict | None, Batches]:
        """A step's micro-batches, and (with lag 1) the position to go back to if it is dropped."""
        position = self.state.position() if self.lag else None
        batches = []
        for _ in range(self.config.grad_accum):
            x, y = self.sampler.next_batch()
            batches.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        return position, batches

    def _lr(self, step: int) -> float:
        config = self.config
        return lr_at(step - 1, config.lr, config.min_lr, config.warmup_steps, config.max_steps)

    def _flags(self, step: int) -> Flags:
        """As this rank sees them before the step's update: a signal arrived, or (rank 0 decides) a
        periodic checkpoint falls after this step."""
        checkpoint = (self.world.is_main and bool(self.interval) and step % self.interval == 0
                      and step < self.config.max_steps)
        return Flags(stop=self.stop.signal_number is not None, checkpoint=checkpoint)

    def _watch_first_step(self) -> Callable[[], None]:
        """Start a thread that prints a lower bound on the run's time if the first step runs long;
        returns the function that stops it (and waits for it, so that no thread outlives the run)."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                early = self.clock.overdue()
                if early is not None:
                    per_step, lower_bound = early
                    self.log(self._estimate_line(per_step, self.step, "lower bound" if lower_bound else "early"))
                    return

        thread = threading.Thread(target=watch, daemon=True, name="gpt2train-estimate")
        thread.start()

        def stop() -> None:
            done.set()
            thread.join()

        return stop

    # Each step, once read: observe, report, decide.

    def _finish(self, pending: PendingStep) -> TrainResult | None:
        seen = self._observe(pending)
        self._report(seen)
        return self._decide(seen, pending)

    def _observe(self, pending: PendingStep) -> Observed:
        config = self.config
        result = pending.result()
        seconds = self.clock.lap()
        step = self.step = pending.step
        self.losses.append(result.loss)
        events = self.monitor.observe(step, result.loss, result.grad_norm, result.applied)
        val = self._evaluate() if config.eval_interval and step % config.eval_interval == 0 else None
        if config.target_metric == "val":
            reached = val is not None and val.loss < config.target_loss
        else:
            reached = result.loss < config.target_loss  # NaN never is
        return Observed(step, result, seconds, events, val, reached)

    def _report(self, seen: Observed) -> None:
        """The step's log lines, its run record, and the time estimate once it is due."""
        step, result, val = seen.step, seen.result, seen.val
        logged = step % self.config.log_interval == 0 or seen.reached
        if logged:
            self.log(format_step_line(step, result.loss, self.monitor.best_loss, seen.seconds))
        for event in seen.events:
            self.log(event)
        if val is not None:
            self.log(f"step {step} | val_loss: {val.loss:.4f} | val_perplexity: {val.perplexity:.2f} | "
                     f"val_bits_per_byte: {val.bits_per_byte:.4f}")
        if self.recorder is not None and (logged or val is not None):
            measured = {"val_loss": val.loss, "val_perplexity": val.perplexity,
                        "val_bits_per_byte": val.bits_per_byte} if val is not None else {}
            self.recorder.record(step, loss=result.loss, best_loss=self.monitor.best_loss, lr=self._lr(step),
                                 grad_norm=result.grad_norm, tokens_per_s=self.tokens_per_step / seen.seconds,
                                 step_time=seen.seconds, **measured)
        per_step = self.clock.step_done(step, seen.seconds)
        if per_step is not None and step < self.config.max_steps:
            self.log(self._estimate_line(per_step, step))
            if not self.interval:
                self.interval = auto_checkpoint_interval(per_step)
                self.log(f"checkpoints every {self.interval:,} steps (about {format_duration(self.interval * per_step)}), "
                         f"at the end and when stopped, in {Path(self.config.run_dir) / 'checkpoints'}")

    def _decide(self, seen: Observed, pending: PendingStep) -> TrainResult | None:
        """End the run, or save a checkpoint, as the step's numbers say."""
        if seen.reached:
            return self._reached_target(pending)
        if self.monitor.bad_in_a_row >= self.config.max_bad_steps:
            return self._diverged()
        if seen.result.stop:
            return self._interrupted(self.stop.signal_number or signal.SIGTERM, pending)
        # Never during a run of bad steps: the last good checkpoint is the one to go back to.
        if seen.result.checkpoint and self.monitor.bad_in_a_row == 0:
            self.log(f"checkpoint saved: {self.state.save(self.step, position=_rewind_position(pending))}")
        return None

    def _estimate_line(self, per_step: float, step: int, kind: str = "measured") -> str:
        """The estimate as printed; `kind`: measured, early (from the few steps done, a measured one
        follows) or lower bound (the first step is still running)."""
        config = self.config
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
        if self.device.type == "cpu" and config.preset != "tiny" and total > 3600:
            line += "; this model is too large for a CPU run, try `--preset tiny` for one that finishes in minutes"
        return line

    def _evaluate(self) -> EvalResult | None:
        if len(self.corpus.val) < 2:
            return None
        val = evaluate(self.model, self.corpus.val, self.config.seq_len, self.config.batch_size, self.device,
                       self.dtype, max_tokens=self.config.eval_tokens)
        self.monitor.observe_val(val.loss)
        return val

    # The ends of a run.

    def _best(self) -> float:
        """The best value of the loss the target applies to."""
        return self.monitor.best_val_loss if self.config.target_metric == "val" else self.monitor.best_loss

    def _metric(self) -> str:
        return "best validation loss" if self.config.target_metric == "val" else "best loss"

    def _close_records(self) -> None:
        """Finish metrics.jsonl and draw loss.png."""
        if self.recorder is None:
            return
        self.recorder.close()
        try:
            self.log(f"loss plot: {plot_run(self.config.run_dir)}")
        except UserError as e:  # matplotlib is optional; a plot is never worth failing a run for
            self.log(f"loss plot not drawn: {e}")

    def _result(self, status: str, **extra) -> TrainResult:
        return TrainResult(status, self.step, self._best(), model=self.model, losses=self.losses, **extra)

    def _reached_target(self, pending: PendingStep) -> TrainResult:
        best, final_path = self._best(), self.final_path
        # The seed's lines, each as soon as what it says is true.
        self.log(f"Target loss achieved! Best loss: {best:.6f}")
        weights = self.state.weights()
        if self.world.is_main:
            save_final_model(self.model, final_path, step=self.step, best_loss=best, state=weights[0],
                             run={"id": self.state.run_id, "dir": str(Path(self.config.run_dir).resolve())})
        distributed.barrier(self.world)
        self.log(f"Final model saved at: {final_path}")
        self.log(f"Training completed. Best loss: {best:.6f}")
        self.log(f"Final model perplexity: {math.exp(best):.4f} (exp of the best loss)")
        checkpoint = self.state.save(self.step, finished=TARGET_REACHED, position=_rewind_position(pending),
                                     weights=weights)
        self._close_records()
        return self._result(TARGET_REACHED, final_model_path=final_path, checkpoint_path=checkpoint)

    def _diverged(self) -> TrainResult:
        last = latest_checkpoint(self.config.run_dir)
        self.log(
            f"Stopping at step {self.step}: {self.monitor.bad_in_a_row} steps in a row had a non-finite loss or "
            f"gradient, and none of them changed the weights. The last checkpoint ({last or 'none was written'}) "
            "is intact: resume from it with a lower --lr or --dtype float32."
        )
        self._close_records()
        return self._result(DIVERGED, final_model_path=None, checkpoint_path=last)

    def _interrupted(self, signal_number: int, pending: PendingStep) -> TrainResult:
        checkpoint = self.state.save(self.step, position=_rewind_position(pending))
        command = f"gpt2train train --resume {self.config.run_dir}"
        if self.world.distributed:
            command = f"the same torchrun command, running {command}"
        self.log(f"Stopped at step {self.step}: checkpoint saved at {checkpoint}. Continue with: {command}")
        self._close_records()
        return self._result(INTERRUPTED, final_model_path=None, checkpoint_path=checkpoint,
                            signal_number=signal_number)

    def _out_of_steps(self) -> TrainResult:
        config, best = self.config, self._best()
        checkpoint = self.state.save(self.step, finished=MAX_STEPS)
        self.log(
            f"Target loss {config.target_loss} not reached in {config.max_steps:,} steps "
            f"({self._metric()}: {best:.6f}, perplexity {math.exp(best):.4f}); no final model was written. "
            f"Raise --max-steps or --target-loss; continue this run with --resume --max-steps N."
        )
        self._close_records()
        return self._result(MAX_STEPS, final_model_path=None, checkpoint_path=checkpoint)


def _rewind_position(pending: PendingStep) -> dict | None:
    """Where the data stood before the step queued after `pending` drew its batch (lag 1), if any."""
    return pending.queued_after.position if pending.queued_after is not None else None
