"""What a run says: its header, each step's lines, and the closing lines of each way it ends."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..device import dtype_name
from ..evaluate import EvalResult
from .checkpoints import EndSaves
from .distributed import World
from .outcome import Outcome
from .setup import RunParts


def step_line(step: int, loss: float, best_loss: float, seconds: float) -> str:
    return f"step {step} | loss: {loss:.4f} | best_loss: {best_loss:.4f} | time: {seconds:.2f}s"


class LoggedStep(NamedTuple):
    """A step line read back, its figures as printed: runs that trained alike print the same text."""

    step: int
    loss: str
    best_loss: str
    seconds: str


# step_line's reader, kept beside it so that the two cannot drift apart.
_STEP_LINE = re.compile(r"^step (\d+) \| loss: (\S+) \| best_loss: (\S+) \| time: (\S+)s$", re.MULTILINE)


def parse_step_lines(text: str) -> list[LoggedStep]:
    """Every step line in a run's output, in order (other lines are skipped)."""
    return [LoggedStep(int(step), *rest) for step, *rest in _STEP_LINE.findall(text)]


def val_line(step: int, val: EvalResult) -> str:
    return (f"step {step} | val_loss: {val.loss:.4f} | val_perplexity: {val.perplexity:.2f} | "
            f"val_bits_per_byte: {val.bits_per_byte:.4f}")


def task_line(step: int, task: str, accuracies: dict[str, float]) -> str:
    a = accuracies
    return f"step {step} | {task} acc_norm: {a['acc_norm']:.4f} | acc: {a['acc']:.4f} | completion: {a['acc_norm_completion']:.4f}"


def opening_lines(parts: RunParts) -> list[str]:
    """The header: the process, the model, the data and the run; then where a resumed run goes on from."""
    s, config, m = parts, parts.config, parts.config.model
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
    if s.plan.resumed:
        lines.append(f"resumed from {s.plan.checkpoint} at step {s.step:,} (best loss {s.monitor.best_loss:.6f})")
        lines += [f"changed on resume: {change}" for change in s.plan.changes]
    elif config.init_from:
        lines.append(f"initialized from {config.init_from}")
    return lines


def startup_line(timings: dict[str, float | None]) -> str:
    """Where the seconds before the header went (with --debug)."""
    known = [seconds for seconds in timings.values() if seconds is not None]
    parts = " | ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items() if seconds is not None)
    return f"start-up: {sum(known):.2f} s to the header: {parts}"


def closing_lines(outcome: Outcome, saves: EndSaves, config: TrainConfig, world: World, step: int, best: float,
                  bad_in_a_row: int) -> list[str]:
    """What a run that ended as `outcome` says once its end saves are made (the target's after
    `Target loss achieved!`, none when the final model could not be written: that is the run's failure)."""
    if outcome == Outcome.TARGET_REACHED:
        return target_lines(best, saves.final_model) if saves.final_model is not None else []
    if outcome == Outcome.DIVERGED:
        return [diverged_line(step, bad_in_a_row, saves.checkpoint)]
    if outcome == Outcome.INTERRUPTED:
        return [stopped_line(step, saves.checkpoint, config.run_dir, world)]
    return [out_of_steps_line(config, best, saves.checkpoint)]


def metric_name(config: TrainConfig) -> str:
    """The loss the target applies to, as the closing lines name it."""
    return "best validation loss" if config.target_metric == "val" else "best loss"


def target_lines(best: float, final_path: Path) -> list[str]:
    """The closing lines of a run that reached its target, after `Target loss achieved!`, as the default
    run has always printed them, and the perplexity."""
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
