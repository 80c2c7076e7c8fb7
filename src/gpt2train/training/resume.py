"""Which run a call trains, decided first, before anything is built or changed on disk: a new run, or
a resumed one (its checkpoint found and read, the config rebased on the checkpoint's, the changes
listed); refused if it must be."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import checkpoint_run_id, find_checkpoint, latest_checkpoint, read_checkpoint, run_dir_of
from ..config import ONE_OFF_KEYS, RUN_FIELDS, TrainConfig, resolve_config
from ..errors import UserError
from .distributed import World
from .outcome import Outcome
from .rundir import refuse_to_replace

# What a resumed run may not change: the model's shape and the data it sees. Everything else
# (max_steps, target_loss, log_interval, lr, ...) may be changed and is reported.
RESUME_LOCKED_KEYS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias",
                      "data", "train_tokens", "sampling", "batch_size", "grad_accum", "seq_len", "seed",
                      "init_from", "optimizer")


@dataclass
class RunPlan:
    """The run a call trains: new, or from a checkpoint (read once and verified)."""

    config: TrainConfig  # for a resumed run, the checkpoint's config with this call's settings on top
    run_id: str  # the run's identity, kept across resumes and recorded in its final model
    checkpoint: Path | None = None
    saved: dict | None = None  # the checkpoint's contents
    changes: list[str] = field(default_factory=list)  # settings changed on resume, one line each

    @property
    def resumed(self) -> bool:
        return self.saved is not None


def resolve_run(config: TrainConfig, world: World = World()) -> RunPlan:
    """Decide which run `config` asks for, refusing before anything on disk changes; no collectives.

    A new run never silently replaces an earlier run's checkpoints (nor another run's final model:
    `rundir.check_outputs`, called next, refuses that for every run).
    Every rank reads the checkpoint itself: the run directory must be where every node sees it.
    Only rank 0 writes files, so its run id is the run's.
    """
    if config.fsdp and config.optimizer == "muon":
        raise UserError("--optimizer muon does not run under --fsdp: Muon orthogonalises each whole matrix, and FSDP "
                        "keeps only a shard of it on each rank; leave out --fsdp (DDP), or use --optimizer adamw")
    if config.fsdp and not world.distributed:
        raise UserError("--fsdp shards a model over the processes of a torchrun launch, and this is one process: "
                        "launch it with torchrun --nproc_per_node=N, or leave out --fsdp")
    if config.resume:
        return _resumed(config, world)
    refuse_to_replace(config)
    return RunPlan(config, uuid.uuid4().hex)


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


def _resumed(config: TrainConfig, world: World) -> RunPlan:
    path = find_checkpoint(config.resume, config.run_dir)
    saved = read_checkpoint(path)
    # Continue from the checkpoint's own config: only what is set now changes it.
    base = {**saved["config"], "run_dir": str(run_dir_of(path))}
    config = resolve_config(overrides={**config.chosen, "resume": str(path)}, base=base)
    changes = resume_changes(saved["config"], config)
    step = saved["step"]
    if step >= config.max_steps:
        raise UserError(f"{path} is at step {step}, and max_steps is {config.max_steps}: raise --max-steps to continue")
    if saved.get("finished") == Outcome.TARGET_REACHED and saved["config"]["target_loss"] == config.target_loss:
        raise UserError(
            f"the run in {run_dir_of(path)} already reached its target loss at step {step}: lower --target-loss "
            "to train it further"
        )
    latest = latest_checkpoint(config.run_dir)
    if latest is not None and checkpoint_run_id(latest) not in (saved.get("run_id"), None):
        raise UserError(f"{config.run_dir} holds checkpoints of another run ({latest.name}): resume {path} in its own "
                        "run directory (leave out --run-dir), or give it an empty one")
    if saved.get("world_size", 1) != world.size:
        changes.append(f"world size: {saved.get('world_size', 1)} -> {world.size} (the data order from here on "
                       "differs from a run that kept its world size)")
    # Checkpoints of version 1 carry no run id: the run gets one now.
    run_id = saved.get("run_id") or uuid.uuid4().hex
    return RunPlan(config, run_id, path, saved, changes)
