"""The training loop: `train()` runs a config's run from its first step to its end."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..errors import UserError
from ..evaluate import EvalResult, evaluate
from ..metrics import RunRecorder
from .. import plot
from ..model import GPT
from . import distributed
from .distributed import world_from_env
from .finish import Ending
from .outcome import Outcome
from .report import Log, StepClock, estimate_line, opening_lines, startup_line, step_line, val_line
from .setup import build_run
from .signals import StopRequests
from .step import Batches, Flags, PendingStep, Pipeline, StepResult


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


@dataclass
class Seen:
    """What reading one step told."""

    step: int
    result: StepResult
    seconds: float  # wall time since the previous step was read
    events: list[str]  # non-finite steps and spikes
    val: EvalResult | None  # at evaluation steps
    reached: bool  # the target is reached at this step


class Trainer:
    """One training run: set up (new or resumed) on construction, then `run()` to its end."""

    def __init__(self, config: TrainConfig, log: Log = print_flush, world=None, debug: bool = False):
        self.world = world = world or world_from_env()
        self._out = log
        self.log = self._say if world.is_main else quiet  # rank 0 alone speaks
        self.stop = StopRequests()
        self.debug = debug
        self.setup = s = build_run(config, world)
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
        if self.setup.lock is not None:
            self.setup.lock.release()
        if hasattr(self.setup.sampler, "close"):
            self.setup.sampler.close()

    def run(self) -> TrainResult:
        """Step until the target, max_steps, too many bad steps or a stop signal."""
        s = self.setup
        pipeline = Pipeline(s.stepper, self.lag)
        self.log(s.checkpointer.describe())
        self.clock.start()
        s.checkpointer.start()
        with self.stop, contextlib.closing(self):
            with self.clock.watch(self._say_estimate):  # says early what slow first steps will cost
                for step in range(self.step + 1, self.config.max_steps + 1):
                    position = s.state.position() if self.lag else None  # to go back to, should this step be dropped
                    flags = Flags(stop=self.stop.signal_number is not None, checkpoint=s.checkpointer.should_save(step))
                    done = pipeline.push(step, self._batches(), s.schedule.lr(step), flags, position)
                    if done is not None and (outcome := self._read(done)) is not None:
                        break
                else:
                    done = pipeline.flush()  # lag 1: the last step, read once the loop is over
                    outcome = (self._read(done) if done is not None else None) or Outcome.MAX_STEPS
            return self._end(outcome, done)

    def _batches(self) -> Batches:
        s = self.setup
        return [tuple(t.to(s.device, non_blocking=True) for t in s.sampler.next_batch())
                for _ in range(self.config.grad_accum)]

    def _read(self, done: PendingStep) -> Outcome | None:
        """A step's numbers: logged and recorded; the way the run ends, if it ends at this step."""
        config, monitor = self.config, self.setup.monitor
        result, seconds = done.result(), self.clock.lap()
        self.step = step = done.step
        self.losses.append(result.loss)
        events = monitor.observe(step, result.loss, result.grad_norm, result.applied)
        self.setup.schedule.observe(step, result.loss)
        val = self._evaluate() if config.eval_interval and step % config.eval_interval == 0 else None
        if config.target_metric == "val":
            reached = val is not None and val.loss < config.target_loss
        else:
            reached = result.loss < config.target_loss  # NaN never is
        self._report(Seen(step, result, seconds, events, val, reached))
        if reached:
            return Outcome.TARGET_REACHED
        if monitor.bad_in_a_row >= config.max_bad_steps:
            return Outcome.DIVERGED
        if result.stop:
            return Outcome.INTERRUPTED
        # Never during a run of bad steps: the last good checkpoint is the one to go back to.
        if result.checkpoint and monitor.bad_in_a_row == 0:
            self.log(self.setup.checkpointer.save_periodic(self.step, position=done.rewind_position))
        return None

    def _report(self, seen: Seen) -> None:
        """The step's log lines, its run record, and the time estimate once it is due."""
        step, result, val, best = seen.step, seen.result, seen.val, self.setup.monitor.best_loss
        logged = step % self.config.log_interval == 0 or seen.reached
        if logged:
            self.log(step_line(step, result.loss, best, seen.seconds))
        for event in seen.events:
            self.log(event)
        if val is not None:
            self.log(val_line(step, val))
        if self.recorder is not None and (logged or val is not None):
            measured = {"val_loss": val.loss, "val_perplexity": val.perplexity,
                        "val_bits_per_byte": val.bits_per_byte} if val is not None else {}
            self.recorder.record(step, loss=result.loss, best_loss=best, lr=self.setup.schedule.lr(step),
                                 grad_norm=result.grad_norm, step_time=seen.seconds,
                                 tokens_per_s=self.config.tokens_per_step * self.world.size / seen.seconds, **measured)
        ends_here = step == self.config.max_steps or seen.reached or seen.result.stop
        if step == self.clock.first_step:
            if self.recorder is not None and not ends_here:
                # For the plot at the end, while training goes on; the first step has started everything
                # heavy. A run that ends here imports matplotlib after its final model is written.
                plot.warm_up()
            if self.debug:
                self.log(f"first step: {seen.seconds:.1f} s (compilation included, when on)")
        per_step = self.clock.step_done(step, seen.seconds)
        if per_step is not None and not ends_here:  # no time to max steps for a run that ends now
            self._say_estimate(per_step, step)

    def _say_estimate(self, per_step: float, step: int, kind: str = "measured") -> None:
        self.log(estimate_line(self.config, self.setup.device, per_step, step, kind))

    def _evaluate(self) -> EvalResult | None:
        s = self.setup
        if len(s.corpus.val) < 2:
            return None
        val = evaluate(s.model, s.corpus.val, self.config.seq_len, self.config.batch_size, s.device, s.dtype,
                       max_tokens=self.config.eval_tokens)
        s.monitor.observe_val(val.loss)
        return val

    def _end(self, outcome: Outcome, last: PendingStep | None) -> TrainResult:
        """Finish the run as `outcome` says, after step `last`."""
        self.setup.stepper.discard()  # a step queued after the last one read is never applied
        best = self._best()
        position = last.rewind_position if last is not None else None
        ended = Ending(self.setup, self.log, self.recorder).finish(outcome, self.step, best, position)
        signal_number = (self.stop.signal_number or signal.SIGTERM) if outcome == Outcome.INTERRUPTED else None
        return TrainResult(outcome, self.step, best, ended.final_model, ended.checkpoint, self.setup.model,
                           self.losses, signal_number,  # another rank's signal stops this one as SIGTERM would
                           ended.failure)

    def _best(self) -> float:
        """The best value of the loss the target applies to."""
        monitor = self.setup.monitor
        return monitor.best_val_loss if self.config.target_metric == "val" else monitor.best_loss
