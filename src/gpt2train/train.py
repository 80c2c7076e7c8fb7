"""The training loop: steps, the target check, the seed's log lines, checkpoints and resume."""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .checkpoint import (
    checkpoint_path, delete_checkpoints, find_checkpoint, latest_checkpoint, read_checkpoint, run_dir_of,
    save_checkpoint,
)
from .config import TrainConfig, resume_changes
from .data import SAMPLERS, Corpus, Sampler, load_corpus
from .distributed import World, world_from_env
from .errors import UserError
from .evaluate import EvalResult, evaluate
from .files import check_writable_dir
from .final_model import final_model_path, save_final_model
from .hf import read_hf_model
from .metrics import RunRecorder
from .model import GPT
from .optim import lr_at
from .plot import plot_run
from .prefetch import Prefetcher
from .runtime import (
    StopRequests, configure_backends, dtype_name, resolve_device, resolve_dtype, restore_rng_state, rng_state,
    seed_everything, use_compile,
)
from .step import PendingStep, Stepper

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


def _data_identity(corpus: Corpus, train_tokens: int) -> dict:
    return {"source": corpus.source, "text_sha256": corpus.text_sha256, "train_tokens": train_tokens}


def _checkpoint_to_resume(config: TrainConfig, world: World) -> tuple[Path, dict, list[str]] | None:
    """(path, contents, changed settings) of the checkpoint to resume, or None for a new run.

    A new run never silently replaces an earlier run's checkpoints. Every rank reads the
    checkpoint itself: the run directory must be where every node sees it.
    """
    if not config.resume:
        existing = latest_checkpoint(config.run_dir)
        if existing is not None:
            if not config.overwrite:
                raise UserError(
                    f"{config.run_dir} holds checkpoints of an earlier run (latest: {existing.name}): continue it "
                    "with --resume, start over with --overwrite (deletes them), or choose another --run-dir"
                )
            distributed.barrier(world)  # every rank has looked before rank 0 deletes
            if world.is_main:
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


def _restore(saved: dict, stepper: Stepper, sampler: Sampler, monitor: LossMonitor, data: dict, path: Path,
             world: World) -> None:
    if saved["data"] != data:
        raise UserError(
            f"the training data differs from the one {path} was trained on ({saved['data']['source']}, "
            f"{saved['data']['train_tokens']:,} tokens): resume with the same data, or start a new run"
        )
    try:
        stepper.load_state_dicts(saved["model"], saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}): is it from another run?") from None
    stepper.load_scaler_state(saved["scaler"])
    # Each rank goes on from its own position; with another world size, all from rank 0's.
    others = saved.get("other_ranks", [])
    position = others[world.rank - 1] if world.rank > 0 and len(others) == world.size - 1 else saved
    sampler.load_state_dict(position["sampler"])
    monitor.load_state_dict(saved["monitor"])
    restore_rng_state(position["rng"])  # last: building the model above drew from the generators


def _header(config: TrainConfig, model: GPT, device, dtype, corpus: Corpus, train_tokens: int, world: World) -> list[str]:
    m = config.model
    batch = f"{config.batch_size} x {config.seq_len}"
    if config.grad_accum > 1:
        batch += f" x {config.grad_accum} micro-steps"
    if world.distributed:
        batch += f" x {world.size} ranks{' (FSDP)' if config.fsdp else ''}"
    return [
        f"device: {device} | dtype: {dtype_name(dtype)} | parameters: {model.num_params():,}",
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab {m.vocab_size:,}",
        f"data: {corpus.source} | train tokens: {train_tokens:,} | val tokens: {len(corpus.val):,}",
        f"tokens per step: {config.tokens_per_step * world.size:,} ({batch}) | "
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

    At the target, the fp16 final model is written to config.out_dir. Checkpoints, config.toml,
    metrics.jsonl and loss.png go to config.run_dir; config.resume continues a run exactly. Under
    torchrun every process calls this; rank 0 alone prints and writes files.
    """
    try:
        trainer = Trainer(config, log)
        result = trainer.run()
        # torchrun ends the other ranks as soon as one exits with a failure status, as a run that
        # stops short of its target does: no rank leaves before rank 0 has written everything.
        distributed.barrier(trainer.world)
        return result
    finally:
        distributed.leave()


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


class Trainer:
    """One training run: set up (new or resumed) on construction, then `run()` to its end."""

    def __init__(self, config: TrainConfig, log: Log = print_flush):
        self.config = config
        self.world = world_from_env()
        self.log = log if self.world.is_main else _quiet  # rank 0 alone speaks
        self.device = distributed.join(self.world, resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.final_path = final_model_path(config.out_dir, config.format)
        check_writable_dir(self.final_path.parent, "final model")
        check_writable_dir(config.run_dir, "checkpoints")
        resume = _checkpoint_to_resume(config, self.world)
        configure_backends(self.device)
        seed_everything(config.seed)  # the same on every rank: the same initial weights and dropout

        self.corpus = load_corpus(config.data)
        if config.target_metric == "val" and len(self.corpus.val) < 2:
            raise UserError(f"--target-metric val needs a validation split, and {self.corpus.source} has none: "
                            "prepare the data with a --val-fraction above 0")
        tokens = self.corpus.train[: config.train_tokens] if config.train_tokens else self.corpus.train
        self.sampler: Sampler = SAMPLERS[config.sampling](tokens, config.batch_size, config.seq_len, seed=config.seed,
                                                          rank=self.world.rank, world_size=self.world.size)
        if self.device.type == "cuda":
            self.sampler = Prefetcher(self.sampler)
        self.model = GPT(config.model)
        if config.init_from and resume is None:  # a resumed run takes its weights from the checkpoint
            self.model.load_state_dict(read_hf_model(config.init_from)[1])
        self.model.to(self.device)
        self.stepper = Stepper(self.model, config.lr, config.weight_decay, self.device, self.dtype, config.grad_clip,
                               compile=use_compile(config.compile, self.device), world=self.world, fsdp=config.fsdp)
        # On a GPU the host reads each step's loss one step late, while the device runs the next one.
        self.lag = 1 if self.device.type == "cuda" else 0
        self.monitor = LossMonitor()
        self.data = _data_identity(self.corpus, len(tokens))
        self.tokens_per_step = config.tokens_per_step * self.world.size
        self.step = 0
        self.losses: list[float] = []
        for line in _header(config, self.model, self.device, self.dtype, self.corpus, len(tokens), self.world):
            self.log(line)
        if resume is not None:
            path, saved, changes = resume
            _restore(saved, self.stepper, self.sampler, self.monitor, self.data, path, self.world)
            self.step = saved["step"]
            self.log(f"resumed from {path} at step {self.step:,} (best loss {self.monitor.best_loss:.6f})")
            if saved.get("world_size", 1) != self.world.size:
                changes.append(f"world size: {saved.get('world_size', 1)} -> {self.world.size} (the data order "
                               "from here on differs from a run that kept its world size)")
            for change in changes:
                self.log(f"changed on resume: {change}")
        elif config.init_from:
            self.log(f"initialized from {config.init_from}")
        self.recorder = RunRecorder(config, resumed_step=self.step) if self.world.is_main else None

    def run(self) -> TrainResult:
        """Step until the target, max_steps, too many bad steps or a stop signal."""
        if self.config.checkpoint_interval:
            self.log(f"checkpoints every {self.config.checkpoint_interval:,} steps, at the end and when stopped, "
                     f"in {self._checkpoint_dir()}")
        self.interval = self.config.checkpoint_interval
        self.step_times: list[float] = []
        self.first_step = self.step + 1
        self.loop_started = self.last_finished = time.perf_counter()
        self.rewind_to: dict | None = None
        in_flight: PendingStep | None = None  # updated on the device, not yet read (lag 1)
        with StopRequests() as self.stop:
            while True:
                next_step = (in_flight.step if in_flight else self.step) + 1
                launched = self._launch(next_step) if next_step <= self.config.max_steps else None
                if in_flight is not None:
                    self.rewind_to = launched.position if launched else None
                    ended = self._finish(in_flight)
                    if ended is not None:
                        self.stepper.discard()  # the launched step's gradients are never applied
                        return ended
                if launched is None:
                    return self._out_of_steps()
                launched.record(self.stepper.update(self._lr(launched.step), launched.loss, self._flags(launched.step)))
                in_flight = launched
                if self.lag == 0:
                    ended = self._finish(launched)
                    if ended is not None:
                        return ended
                    in_flight = None

    def _lr(self, step: int) -> float:
        config = self.config
        return lr_at(step - 1, config.lr, config.min_lr, config.warmup_steps, config.max_steps)

    def _launch(self, step: int) -> PendingStep:
        """Queue a step's forward and backward passes, one per micro-batch."""
        position = self._position() if self.lag else None
        batches = []
        for _ in range(self.config.grad_accum):
            x, y = self.sampler.next_batch()
            batches.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        return PendingStep(step, self.stepper.forward_backward(batches), position)

    def _flags(self, step: int) -> tuple[bool, bool]:
        """(stop, checkpoint) as this rank sees them before the step's update: a signal arrived, or
        (rank 0 decides) a periodic checkpoint falls after this step."""
        stop = self.stop.signal_number is not None
        checkpoint = (self.world.is_main and bool(self.interval) and step % self.interval == 0
                      and step < self.config.max_steps)
        return stop, checkpoint

    def _position(self) -> dict:
        """Where the data and the random generators stand: what a checkpoint must hold to go on from here."""
        return {"sampler": self.sampler.state_dict(), "rng": rng_state()}

    def _finish(self, pending: PendingStep) -> TrainResult | None:
        """Read a step's results; log, evaluate, check the target and signals. A result ends the run."""
        config, log = self.config, self.log
        result = pending.result()
        now = time.perf_counter()
        seconds, self.last_finished = now - self.last_finished, now
        step = self.step = pending.step
        loss = result.loss
        self.losses.append(loss)
        events = self.monitor.observe(step, loss, result.grad_norm, result.applied)
        val = self._evaluate() if config.eval_interval and step % config.eval_interval == 0 else None
        if config.target_metric == "val":
            reached = val is not None and val.loss < config.target_loss
        else:
            reached = loss < config.target_loss  # NaN never is

        logged = step % config.log_interval == 0 or reached
        if logged:
            log(format_step_line(step, loss, self.monitor.best_loss, seconds))
        for event in events:
            log(event)
        if val is not None:
            log(f"step {step} | val_loss: {val.loss:.4f} | val_perplexity: {val.perplexity:.2f} | "
                f"val_bits_per_byte: {val.bits_per_byte:.4f}")
        if logged or val is not None:
            measured = {"val_loss": val.loss, "val_perplexity": val.perplexity,
                        "val_bits_per_byte": val.bits_per_byte} if val is not None else {}
            if self.recorder is not None:
                self.recorder.record(step, loss=loss, best_loss=self.monitor.best_loss, lr=self._lr(step),
                                     grad_norm=result.grad_norm, tokens_per_s=self.tokens_per_step / seconds,
                                     step_time=seconds, **measured)
        self._estimate(step, seconds)

        if reached:
            return self._reached_target()
        if self.monitor.bad_in_a_row >= config.max_bad_steps:
            return self._diverged()
        if result.stop:
            return self._interrupted(self.stop.signal_number or signal.SIGTERM)
        # Never during a run of bad steps: the last good checkpoint is the one to go back to.
        if result.checkpoint and self.monitor.bad_in_a_row == 0:
            log(f"checkpoint saved: {self._checkpoint()}")
        return None

    def _estimate(self, step: int, seconds: float) -> None:
        """Once enough steps are timed: the time to max_steps, and the automatic checkpoint interval."""
        if self.step_times is None:  # estimated already
            return
        if step > self.first_step:
            self.step_times.append(seconds)
        if (
            not self.step_times or step >= self.config.max_steps
            or (len(self.step_times) < ESTIMATE_STEPS and time.perf_counter() - self.loop_started < ESTIMATE_SECONDS)
        ):
            return
        per_step = statistics.median(self.step_times)
        self.log(_estimate_line(self.config, self.device, per_step, step))
        if not self.interval:
            self.interval = auto_checkpoint_interval(per_step)
            self.log(f"checkpoints every {self.interval:,} steps (about {format_duration(self.interval * per_step)}), "
                     f"at the end and when stopped, in {self._checkpoint_dir()}")
        self.step_times = None  # estimated once

    def _evaluate(self) -> EvalResult | None:
        if len(self.corpus.val) < 2:
            return None
        val = evaluate(self.model, self.corpus.val, self.config.seq_len, self.config.batch_size, self.device,
                       self.dtype, max_tokens=self.config.eval_tokens)
        self.monitor.observe_val(val.loss)
        return val

    def _checkpoint_dir(self) -> Path:
        return Path(self.config.run_dir) / "checkpoints"

    def _checkpoint(self, finished: str = "") -> Path:
        """Save a checkpoint of the step just finished. A collective: every rank calls it, rank 0 writes."""
        config = self.config
        model_state, optimizer_state = self.stepper.state_dicts()
        path = checkpoint_path(config.run_dir, self.step)
        # Where each rank's data and generators stand; the next step's batch may already be drawn (lag 1).
        positions = distributed.gather(self.rewind_to or self._position(), self.world)
        if self.world.is_main:
            contents = {
                "config": config.to_flat_dict(),
                "best_loss": self.monitor.best_loss,
                # The learning rate of the next step: where the schedule stands.
                "lr": lr_at(self.step, config.lr, config.min_lr, config.warmup_steps, config.max_steps),
                "finished": finished,
                "world_size": self.world.size,
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": self.stepper.scaler_state(),
                **positions[0],
                "other_ranks": positions[1:],
                "monitor": self.monitor.state_dict(),
                "data": self.data,
            }
            path = save_checkpoint(config.run_dir, self.step, contents, keep=config.keep_checkpoints)
        distributed.barrier(self.world)
        return path

    def _best(self) -> float:
        """The best value of the loss the target applies to."""
        return self.monitor.best_val_loss if self.config.target_metric == "val" else self.monitor.best_loss

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

    def _reached_target(self) -> TrainResult:
        best = self._best()
        model_state, _ = self.stepper.state_dicts()
        if self.world.is_main:
            save_final_model(self.model, self.final_path, step=self.step, best_loss=best, state=model_state)
        checkpoint = self._checkpoint(finished=TARGET_REACHED)
        self.log(f"Target loss achieved! Best loss: {best:.6f}")
        self.log(f"Final model saved at: {self.final_path}")
        self.log(f"Training completed. Best loss: {best:.6f}")
        self.log(f"Final model perplexity: {math.exp(best):.4f} (exp of the best loss)")
        self._close_records()
        return self._result(TARGET_REACHED, final_model_path=self.final_path, checkpoint_path=checkpoint)

    def _diverged(self) -> TrainResult:
        last = latest_checkpoint(self.config.run_dir)
        self.log(
            f"Stopping at step {self.step}: {self.monitor.bad_in_a_row} steps in a row had a non-finite loss or "
            f"gradient, and none of them changed the weights. The last checkpoint ({last or 'none was written'}) "
            "is intact: resume from it with a lower --lr or --dtype float32."
        )
        self._close_records()
        return self._result(DIVERGED, final_model_path=None, checkpoint_path=last)

    def _interrupted(self, signal_number: int) -> TrainResult:
        checkpoint = self._checkpoint()
        command = f"gpt2train train --resume {self.config.run_dir}"
        if self.world.distributed:
            command = f"the same torchrun command, running {command}"
        self.log(f"Stopped at step {self.step}: checkpoint saved at {checkpoint}. Continue with: {command}")
        self._close_records()
        return self._result(INTERRUPTED, final_model_path=None, checkpoint_path=checkpoint,
                            signal_number=signal_number)

    def _out_of_steps(self) -> TrainResult:
        config, best = self.config, self.monitor.best_loss
        checkpoint = self._checkpoint(finished=MAX_STEPS)
        self.log(
            f"Target loss {config.target_loss} not reached in {config.max_steps:,} steps "
            f"(best loss: {best:.6f}, perplexity {math.exp(best):.4f}); no final model was written. "
            f"Raise --max-steps or --target-loss; continue this run with --resume --max-steps N."
        )
        self._close_records()
        return self._result(MAX_STEPS, final_model_path=None, checkpoint_path=checkpoint)
