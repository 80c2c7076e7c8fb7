"""The training loop: `train()` runs a config's run from its first step to its end."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hellaswag, plot
from ..checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..errors import UserError
from ..evaluate import EvalResult, evaluate
from ..metrics import RunRecorder
from ..model import GPT
from ..runtime import process_age
from . import distributed
from .clock import StepClock, estimate_line
from .distributed import world_from_env
from .outcome import Outcome
from .report import (
    closing_lines, end_checkpoint_lost, final_model_lost, opening_lines, startup_line, step_line, target_checkpoint_lost, task_line, val_line,
)
from .resume import resolve_run
from .rundir import check_outputs
from .setup import Laps, build_run
from .signals import StopRequests
from .step import Batches, Flags, PendingStep, Pipeline

Log = Callable[[str], None]


def print_flush(line: str) -> None:
    print(line, flush=True)


def quiet(line: str) -> None:
    """The log of ranks other than 0."""


@dataclass
class TrainResult:
    status: Outcome
    steps: int  # the last step run
    best_loss: float  # of the loss the target applies to
    final_model_path: Path | None  # set when the target was reached
    checkpoint_path: Path | None  # the newest checkpoint written
    model: GPT
    losses: list[float] = field(default_factory=list)  # the training loss of every step this call ran
    signal_number: int | None = None  # the signal that interrupted the run
    failure: str | None = None  # the target was reached but the final model could not be written: why, what to do

    @property
    def reached_target(self) -> bool:
        return self.status == Outcome.TARGET_REACHED

    @property
    def exit_status(self) -> int:
        return self.status.exit_status(self.signal_number)


def train(config: TrainConfig, log: Log = print_flush, debug: bool = False) -> TrainResult:
    """Train until the training loss first drops below config.target_loss, or max_steps pass.

    At the target, the fp16 final model is written to config.out_dir. Checkpoints, config.toml,
    metrics.jsonl and loss.png go to config.run_dir; config.resume continues a run exactly (the
    checkpoint's config, with the settings given explicitly on top). Under torchrun every process
    calls this; rank 0 alone prints and writes files. A final model that could not be written (a
    full disk) raises UserError once the weights are safe elsewhere, saying where and what to do.
    `debug` also prints where the start-up's seconds went.
    """
    world = world_from_env()
    try:
        result = Trainer(config, log, world, debug).run()
        # torchrun ends the other ranks as soon as one exits with a failure status, as a run that
        # stops short of its target does: no rank leaves before rank 0 has written everything.
        distributed.barrier(world)
        if result.failure is not None:
            raise UserError(result.failure)
        return result
    finally:
        distributed.leave()


class Trainer:
    """One training run: set up (new or resumed) on construction, then `run()` to its end."""

    def __init__(self, config: TrainConfig, log: Log = print_flush, world=None, debug: bool = False):
        self.world = world = world or world_from_env()
        self._out = log
        self.log = self._say if world.is_main else quiet  # rank 0 alone speaks
        self.stop = StopRequests()
        self.debug = debug
        lap = Laps({"process start-up and imports": process_age()})
        plan = resolve_run(config, world)  # first: which run, resumed or new, before anything is built
        check_outputs(plan.config, plan.run_id)  # then: its outputs can be written, and are not another run's
        lap("decided how the run starts")
        self.parts = s = build_run(plan, world, lap)
        self.config = config = s.config
        self.lag = 1 if s.device.type == "cuda" else 0  # a GPU's host reads each step while the next one runs
        self.step = s.step
        self.losses: list[float] = []
        self.clock = StepClock(s.step + 1)
        try:
            for line in opening_lines(s) + ([startup_line(s.timings)] if debug else []):
                self.log(line)
            self.recorder = RunRecorder(config, resumed_step=s.step, log=self.log) if world.is_main else None
        except BaseException:
            self.close()
            raise

    def _say(self, line: str) -> None:
        try:
            self._out(line)
        except BrokenPipeError:
            # The reader of the output went away (`gpt2train train | head`): stop quietly after this
            # step, with a checkpoint, as for a signal; what is still said goes nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.stop.request(signal.SIGPIPE, "the output was closed")

    def close(self) -> None:
        """Let go of the run directory and stop the data thread; run() does it when it ends."""
        if self.parts.lock is not None:
            self.parts.lock.release()
        if hasattr(self.parts.sampler, "close"):
            self.parts.sampler.close()

    def run(self) -> TrainResult:
        """Step until the target, max_steps, too many bad steps or a stop signal."""
        s, config, monitor = self.parts, self.config, self.parts.monitor
        pipeline = Pipeline(s.stepper, self.lag)
        self.log(s.checkpointer.describe())
        self.clock.start()
        s.checkpointer.start()
        outcome, done = Outcome.MAX_STEPS, None
        with self.stop, contextlib.closing(self):
            with self.clock.watch(self._say_estimate):  # says early what slow first steps will cost
                # One step late on a GPU (lag 1): the step read is the one before the step just queued,
                # so the device runs step N+1 while the host reads step N; one more turn reads the last.
                for queued in range(self.step + 1, config.max_steps + 1 + self.lag):
                    if queued <= config.max_steps:
                        position = s.state.position() if self.lag else None  # to go back to, should it be dropped
                        flags = Flags(stop=self.stop.signal_number is not None, checkpoint=s.checkpointer.due(queued))
                        done = pipeline.push(queued, self._batches(), s.schedule.lr(queued), flags, position)
                    else:
                        done = pipeline.flush()
                    if done is None:
                        continue

                    result, seconds = done.result(), self.clock.lap()  # what was read back
                    self.step = step = done.step
                    self.losses.append(result.loss)
                    events = monitor.observe(step, result.loss, result.grad_norm, result.applied)
                    s.schedule.observe(step, result.loss)
                    val = self._evaluate() if config.eval_interval and step % config.eval_interval == 0 else None
                    tasks = self._score_tasks() if config.tasks and step % config.task_eval_interval == 0 else {}

                    if config.target_metric == "val":
                        reached = val is not None and val.loss < config.target_loss
                    else:
                        reached = result.loss < config.target_loss  # NaN never is

                    logged = step % config.log_interval == 0 or reached
                    lines = [step_line(step, result.loss, monitor.best_loss, seconds)] if logged else []
                    lines += events + ([val_line(step, val)] if val is not None else [])
                    lines += [task_line(step, task, accuracies) for task, accuracies in tasks.items()]
                    for line in lines:
                        self.log(line)
                    if self.recorder is not None and (logged or val is not None or tasks):
                        self._record(step, result.loss, result.grad_norm, seconds, val, tasks)
                    self._time(step, seconds, ends_here=step == config.max_steps or reached or result.stop)

                    if reached:
                        outcome = Outcome.TARGET_REACHED
                    elif monitor.bad_in_a_row >= config.max_bad_steps:
                        outcome = Outcome.DIVERGED
                    elif result.stop:
                        outcome = Outcome.INTERRUPTED
                    if outcome != Outcome.MAX_STEPS:
                        break
                    said = s.checkpointer.save_after(step, result.checkpoint, monitor.bad_in_a_row, done.rewind_position)
                    if said is not None:
                        self.log(said)
            return self._end(outcome, done)

    def _batches(self) -> Batches:
        s = self.parts
        return [tuple(t.to(s.device, non_blocking=True) for t in s.sampler.next_batch())
                for _ in range(self.config.grad_accum)]

    def _record(self, step: int, loss: float, grad_norm: float, seconds: float, val: EvalResult | None,
                tasks: dict[str, dict[str, float]]) -> None:
        """The step's line in the run's records (metrics.jsonl, and TensorBoard or W&B if on)."""
        measured = {"val_loss": val.loss, "val_perplexity": val.perplexity,
                    "val_bits_per_byte": val.bits_per_byte} if val is not None else {}
        measured.update({f"{task}_{name}": value for task, accuracies in tasks.items()
                         for name, value in accuracies.items()})
        self.recorder.record(step, loss=loss, best_loss=self.parts.monitor.best_loss, lr=self.parts.schedule.lr(step),
                             grad_norm=grad_norm, step_time=seconds,
                             tokens_per_s=self.config.tokens_per_step * self.world.size / seconds, **measured)

    def _time(self, step: int, seconds: float, ends_here: bool) -> None:
        """The step timed; the time estimate once it is due (none for a run that ends at this step)."""
        if step == self.clock.first_step:
            if self.recorder is not None and not ends_here:
                # For the plot at the end, while training goes on; the first step has started everything
                # heavy. A run that ends here imports matplotlib after its final model is written.
                plot.warm_up()
            if self.debug:
                self.log(f"first step: {seconds:.1f} s (compilation included, when on)")
        per_step = self.clock.step_done(step, seconds)
        if per_step is not None and not ends_here:
            self._say_estimate(per_step, step)

    def _say_estimate(self, per_step: float, step: int, kind: str = "measured") -> None:
        self.log(estimate_line(self.config, self.parts.device, per_step, step, kind))

    def _evaluate(self) -> EvalResult | None:
        s = self.parts
        if len(s.corpus.val) < 2:
            return None
        val = evaluate(s.model, s.corpus.val, self.config.seq_len, self.config.batch_size, s.device, s.dtype,
                       max_tokens=self.config.eval_tokens)
        s.monitor.observe_val(val.loss)
        return val

    def _score_tasks(self) -> dict[str, dict[str, float]]:
        """HellaSwag's accuracies, each rank scoring its share of the items. The model runs as it is,
        uncompiled and in eval mode (compiled blocks too), so the training step's compiled code is
        neither used nor recompiled; scoring draws no random numbers, so training goes on unchanged."""
        s = self.parts
        with torch.compiler.set_stance("force_eager"):
            counts = hellaswag.score(s.model, s.task_items, s.device, s.dtype)
        total = distributed.sum_(torch.tensor(counts.as_tuple(), device=s.device), self.world)
        return {"hellaswag": hellaswag.Counts(*total.tolist()).accuracies()}

    def _end(self, outcome: Outcome, last: PendingStep | None) -> TrainResult:
        """Finish the run as `outcome` says, after step `last`: the saves it calls for, its closing
        lines, and its records closed."""
        s, config, step = self.parts, self.config, self.step
        s.stepper.discard()  # a step queued after the last one read is never applied
        best = self._best()
        if outcome == Outcome.TARGET_REACHED:
            self.log(f"Target loss achieved! Best loss: {best:.6f}")
        saves = s.checkpointer.save_at_end(outcome, s.model, step, best, last.rewind_position if last else None)
        if saves.checkpoint_error is not None and outcome != Outcome.TARGET_REACHED:
            self._close_records()
            raise UserError(end_checkpoint_lost(step, saves.checkpoint_error, saves.checkpoint, config.run_dir))
        for line in closing_lines(outcome, saves, config, self.world, step, best, s.monitor.bad_in_a_row):
            self.log(line)
        failure = None
        if saves.final_error is not None:
            failure = final_model_lost(saves.final_path, saves.final_error, step, saves.checkpoint,
                                       saves.checkpoint_error, config)
        self._close_records()  # while the target's checkpoint is being written
        if saves.writing is not None:
            saves.checkpoint, error = saves.writing.result()  # the run ends once the checkpoint is complete
            if error is not None:
                self.log(target_checkpoint_lost(step, error, latest_checkpoint(config.run_dir)))
        signal_number = (self.stop.signal_number or signal.SIGTERM) if outcome == Outcome.INTERRUPTED else None
        return TrainResult(outcome, step, best, saves.final_model, saves.checkpoint, s.model, self.losses,
                           signal_number,  # another rank's signal stops this one as SIGTERM would
                           failure)

    def _close_records(self) -> None:
        """Finish metrics.jsonl and draw loss.png."""
        if self.recorder is None:
            return
        self.recorder.close()
        try:
            self.log(f"loss plot: {plot.plot_run(self.config.run_dir)}")
        except UserError as e:  # matplotlib is optional; a plot is never worth failing a run for
            self.log(f"loss plot not drawn: {e}")

    def _best(self) -> float:
        """The best value of the loss the target applies to."""
        monitor = self.parts.monitor
        return monitor.best_val_loss if self.config.target_metric == "val" else monitor.best_loss
