"""A run's saved state: what a checkpoint holds, how it is written, found and read, how a run is
saved and restored from it, and what a resumed run may change.

A run directory keeps its checkpoints as `checkpoints/step_00000400.pt`. Each is written to a
temporary file and renamed into place, so a file with a checkpoint's name is always complete, and
the newest such file is the run's latest checkpoint. Contents are tensors and plain Python values
only, with a checksum that is verified when the checkpoint is read.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .checksum import seal_archive
from .config import ONE_OFF_KEYS, RUN_FIELDS, TrainConfig, resolve_config
from .distributed import World
from .errors import UserError
from .files import atomic_write, check_writable_dir, load_weights_only
from .final_model import claim_final_model, final_model_path
from .optim import lr_at
from .parallel import full_state_dicts, load_full_state_dicts
from .runtime import restore_rng_state, rng_state

CHECKPOINT_FORMAT = "gpt2train-checkpoint"
# Version 2 adds the checksum and the run's id; version 1 checkpoints still resume.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKPOINTS = "checkpoints"
REQUIRED_KEYS = ("config", "step", "best_loss", "model", "optimizer", "scaler", "rng", "sampler", "monitor", "data")
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file lives in."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def find_checkpoint(resume: str, run_dir: str | Path) -> Path:
    """The checkpoint `--resume` names: 'latest' in run_dir, a checkpoint file, or a run directory."""
    if resume == "latest":
        where = Path(run_dir)
    else:
        where = Path(resume)
        if where.is_file():
            return where
        if not where.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint file or run directory; check the path")
        if where.name == CHECKPOINTS:
            where = where.parent
    latest = latest_checkpoint(where)
    if latest is None:
        raise UserError(
            f"there is no checkpoint in {where / CHECKPOINTS} to resume from: start the run without --resume, "
            "or name the run with --run-dir or --resume PATH"
        )
    return latest


def save_checkpoint(run_dir: str | Path, step: int, contents: dict, keep: int) -> Path:
    """Write the checkpoint for `step`, then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": step, **contents}
    atomic_write(path, lambda f: (torch.save(payload, f), seal_archive(f)))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def delete_checkpoints(run_dir: str | Path) -> None:
    for path in list_checkpoints(run_dir):
        path.unlink()


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, checked against its checksum and to be a complete gpt2train
    checkpoint of a known version."""
    contents = load_weights_only(path, "checkpoint",
                                 damaged_fix="resume from an earlier checkpoint of the run (--resume PATH)",
                                 sealed_versions=(CHECKPOINT_VERSION,))
    if not isinstance(contents, dict) or contents.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a gpt2train training checkpoint (a final model or another program's file?)")
    version = contents.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UserError(
            f"{path} is a version {version} checkpoint; this gpt2train reads version {CHECKPOINT_VERSION}: "
            "resume it with the gpt2train that wrote it"
        )
    missing = [key for key in REQUIRED_KEYS if key not in contents]
    if missing:
        raise UserError(f"{path} is an incomplete checkpoint (no {', '.join(missing)}): resume from another one")
    return contents


# How a run ended, as its last checkpoint records it ("finished").
TARGET_REACHED = "target_reached"
MAX_STEPS = "max_steps"

# What a resumed run may not change: the model's shape and the data it sees. Everything else
# (max_steps, target_loss, log_interval, lr, ...) may be changed and is reported.
RESUME_LOCKED_KEYS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias",
                      "data", "train_tokens", "sampling", "batch_size", "grad_accum", "seq_len", "seed",
                      "init_from")


def resume_changes(saved: dict, config: TrainConfig) -> list[str]:
    """The safe differences between a checkpoint's config and `config`, one line each.

    A locked difference raises UserError: resuming would silently become another run.
    """
    now = config.to_flat_dict()
    # A key added after the checkpoint was written had its default then.
    saved = {**{name: f.default for name, f in RUN_FIELDS.items()}, **saved}
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in ONE_OFF_KEYS or saved.get(key) == now.get(key):
            continue
        if key in RESUME_LOCKED_KEYS:
            raise UserError(
                f"cannot resume with {key}={now.get(key)!r}: the checkpoint was trained with {key}={saved.get(key)!r}; "
                f"drop that setting to continue the run, or start a new one with another --run-dir"
            )
        changes.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes


@dataclass
class Start:
    """How a run starts: new, or from a checkpoint (read once and verified)."""

    config: TrainConfig  # for a resumed run, the checkpoint's config with this call's settings on top
    run_id: str  # the run's identity, kept across resumes and recorded in its final model
    checkpoint: Path | None = None
    saved: dict | None = None  # the checkpoint's contents
    changes: list[str] = field(default_factory=list)  # settings changed on resume, one line each


def start_run(config: TrainConfig, world: World = World()) -> Start:
    """Decide how `config`'s run starts, refusing before anything on disk changes; no collectives.

    A new run never silently replaces an earlier run's checkpoints or another run's final model.
    Every rank reads the checkpoint itself: the run directory must be where every node sees it.
    Only rank 0 writes files, so its run id is the run's.
    """
    if config.resume:
        start = _resumed(config, world)
    else:
        existing = latest_checkpoint(config.run_dir)
        if existing is not None and not config.overwrite:
            raise UserError(f"{config.run_dir} holds {_describe_run(existing)}, start over with --overwrite "
                            "(deletes its checkpoints), or choose another --run-dir")
        start = Start(config, uuid.uuid4().hex)
    config = start.config
    final_path = final_model_path(config.out_dir, config.format)
    check_writable_dir(final_path.parent, "final model")
    check_writable_dir(config.run_dir, "checkpoints")
    claim_final_model(final_path, start.run_id, config.overwrite)
    return start


def clear_earlier_run(start: Start, world: World = World()) -> None:
    """A new run started with --overwrite: delete the earlier run's checkpoints. A collective."""
    if start.saved is None and latest_checkpoint(start.config.run_dir) is not None:
        distributed.barrier(world)  # every rank has looked before rank 0 deletes
        if world.is_main:
            delete_checkpoints(start.config.run_dir)


def _resumed(config: TrainConfig, world: World) -> Start:
    path = find_checkpoint(config.resume, config.run_dir)
    saved = read_checkpoint(path)
    # Continue from the checkpoint's own config: only what is set now changes it.
    base = {**saved["config"], "run_dir": str(run_dir_of(path))}
    config = resolve_config(overrides={**config.chosen, "resume": str(path)}, base=base)
    changes = resume_changes(saved["config"], config)
    step = saved["step"]
    if step >= config.max_steps:
        raise UserError(f"{path} is at step {step}, and max_steps is {config.max_steps}: raise --max-steps to continue")
    if saved.get("finished") == TARGET_REACHED and saved["config"]["target_loss"] == config.target_loss:
        raise UserError(
            f"the run in {run_dir_of(path)} already reached its target loss at step {step}: lower --target-loss "
            "to train it further"
        )
    if saved.get("world_size", 1) != world.size:
        changes.append(f"world size: {saved.get('world_size', 1)} -> {world.size} (the data order from here on "
                       "differs from a run that kept its world size)")
    # Checkpoints of version 1 carry no run id: the run gets one now.
    run_id = saved.get("run_id") or uuid.uuid4().hex
    return Start(config, run_id, path, saved, changes)


def _describe_run(checkpoint: Path) -> str:
    """The earlier run a new one would replace, and how to go on with it (for a refusal)."""
    try:  # a glance at its facts, without reading the weights
        peek = load_weights_only(checkpoint, "checkpoint", mmap=True)
        finished = peek.get("finished") == TARGET_REACHED
    except UserError:
        finished = False
    if finished:
        return (f"a run that already reached its target loss at step {peek['step']:,} ({checkpoint.name}): train it "
                "further with --resume and a lower --target-loss")
    return f"checkpoints of an earlier run (latest: {checkpoint.name}): continue it with --resume"


class RunState:
    """The objects whose state a checkpoint holds, registered once, saved and restored together.

    The same on every rank: the weights and optimizer state (gathered from the ranks under FSDP),
    the loss scaler and the loss monitor. Each rank's own: its data position (the sampler) and its
    random generators. A checkpoint also records the config, the run's id and the data's identity.
    """

    def __init__(self, config: TrainConfig, world: World, stepper, sampler, monitor, data: dict, run_id: str):
        self.config, self.world = config, world
        self.stepper, self.sampler, self.monitor = stepper, sampler, monitor
        self.data, self.run_id = data, run_id

    def position(self) -> dict:
        """Where this rank's data and random generators stand."""
        return {"sampler": self.sampler.state_dict(), "rng": rng_state()}

    def weights(self) -> tuple[dict, dict]:
        """The full model and optimizer state. A collective."""
        return full_state_dicts(self.stepper.model, self.stepper.optimizer)

    def save(self, step: int, finished: str = "", position: dict | None = None,
             weights: tuple[dict, dict] | None = None) -> Path:
        """Write the checkpoint of `step`. A collective: every rank calls it, rank 0 writes.

        `position` is this rank's place when the next step's batch was already drawn (lag 1);
        `weights` what weights() gave, when the caller has it already.
        """
        config = self.config
        model_state, optimizer_state = weights or self.weights()
        positions = distributed.gather(position or self.position(), self.world)
        path = checkpoint_path(config.run_dir, step)
        if self.world.is_main:
            contents = {
                "config": config.to_flat_dict(),
                "run_id": self.run_id,
                "best_loss": self.monitor.best_loss,
                # The learning rate of the next step: where the schedule stands.
                "lr": lr_at(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps),
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
            path = save_checkpoint(config.run_dir, step, contents, keep=config.keep_checkpoints)
        distributed.barrier(self.world)
        return path

    def restore(self, saved: dict, path: Path) -> int:
        """Load a checkpoint's contents into the registered objects; returns its step."""
        if saved["data"] != self.data:
            raise UserError(
                f"the training data differs from the one {path} was trained on ({saved['data']['source']}, "
                f"{saved['data']['train_tokens']:,} tokens): resume with the same data, or start a new run"
            )
        try:
            load_full_state_dicts(self.stepper.model, self.stepper.optimizer, saved["model"], saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}): is it from another "
                            "run?") from None
        self.stepper.load_scaler_state(saved["scaler"])
        # Each rank goes on from its own position; with another world size, all from rank 0's.
        others = saved.get("other_ranks", [])
        rank = self.world.rank
        position = others[rank - 1] if rank > 0 and len(others) == self.world.size - 1 else saved
        self.sampler.load_state_dict(position["sampler"])
        self.monitor.load_state_dict(saved["monitor"])
        restore_rng_state(position["rng"])  # last: building the model drew from the generators
        return saved["step"]
