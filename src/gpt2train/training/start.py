"""How a run starts: new or resumed, what a resume may change, and which earlier files a new run
must not replace; decided, and refused if it must be, before anything on disk changes."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from ..checkpoint import (
    CHECKPOINTS, checkpoint_run_id, delete_checkpoints, find_checkpoint, latest_checkpoint, read_checkpoint, run_dir_of,
)
from ..config import ONE_OFF_KEYS, RUN_FIELDS, TrainConfig, resolve_config
from ..errors import UserError
from ..files import check_writable_dir, load_weights_only, remove_stale_temporaries
from ..final_model import claim_final_model, final_model_path
from . import distributed
from .distributed import World
from .outcome import Outcome

# What a resumed run may not change: the model's shape and the data it sees. Everything else
# (max_steps, target_loss, log_interval, lr, ...) may be changed and is reported.
RESUME_LOCKED_KEYS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias",
                      "data", "train_tokens", "sampling", "batch_size", "grad_accum", "seq_len", "seed",
                      "init_from", "optimizer")


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
    if config.fsdp and config.optimizer == "muon":
        raise UserError("--optimizer muon does not run under --fsdp: Muon orthogonalises each whole matrix, and FSDP "
                        "keeps only a shard of it on each rank; leave out --fsdp (DDP), or use --optimizer adamw")
    if config.fsdp and not world.distributed:
        raise UserError("--fsdp shards a model over the processes of a torchrun launch, and this is one process: "
                        "launch it with torchrun --nproc_per_node=N, or leave out --fsdp")
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


def claim_run_dir(start: Start, world: World = World()) -> RunLock | None:
    """Take the run directory for this run (a collective; the first thing the run changes on disk):
    rank 0 locks it, removes what writers that died left half-written, and for a new run started
    with --overwrite deletes the earlier run's checkpoints. Rank 0 gets the lock to release at the end."""
    config, lock = start.config, None
    if world.is_main:
        lock = RunLock(config.run_dir)
        existing = latest_checkpoint(config.run_dir)
        if start.saved is None and existing is not None and not config.overwrite:
            lock.release()  # another run started here since this one looked
            raise UserError(f"{config.run_dir} holds {_describe_run(existing)}, start over with --overwrite "
                            "(deletes its checkpoints), or choose another --run-dir")
        remove_stale_temporaries(config.run_dir, every=True)  # no other writer can be there: the lock says so
        remove_stale_temporaries(Path(config.run_dir) / CHECKPOINTS, every=True)
        remove_stale_temporaries(config.out_dir)
    distributed.barrier(world)  # every rank has read the checkpoint before rank 0 deletes
    if world.is_main and start.saved is None:
        delete_checkpoints(config.run_dir)
    return lock


class RunLock:
    """An OS lock on a run directory (its `.lock` file), held while the run lives, so that a second
    run in the same directory is refused; the OS releases it when the process ends, however it ends."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # no flock (Windows): unlocked
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise UserError(f"another gpt2train run (process {holder}) is training in {run_dir}: wait for it to "
                            "end, or give this one another --run-dir") from None
        try:  # who holds it, for the refusal of a second run; a full disk leaves it unsaid
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
    return Start(config, run_id, path, saved, changes)


def _describe_run(checkpoint: Path) -> str:
    """The earlier run a new one would replace, and how to go on with it (for a refusal)."""
    try:  # a glance at its facts, without reading the weights
        peek = load_weights_only(checkpoint, "checkpoint", mmap=True)
        finished = peek.get("finished") == Outcome.TARGET_REACHED
    except UserError:
        finished = False
    if finished:
        return (f"a run that already reached its target loss at step {peek['step']:,} ({checkpoint.name}): train it "
                "further with --resume and a lower --target-loss")
    return f"checkpoints of an earlier run (latest: {checkpoint.name}): continue it with --resume"
