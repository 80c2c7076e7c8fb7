"""The run directory and the final model's place, kept for one run: a new run refused where an
earlier run left checkpoints (unless --overwrite), outputs checked before anything is written, the
directory locked and claimed."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from ..checkpoint import CHECKPOINTS, delete_checkpoints, latest_checkpoint
from ..config import TrainConfig
from ..errors import UserError
from ..files import check_writable_dir, load_weights_only, remove_stale_temporaries
from ..final_model import claim_final_model, final_model_path
from . import distributed
from .distributed import World
from .outcome import Outcome


def refuse_to_replace(config: TrainConfig) -> None:
    """A new run never silently replaces an earlier run's checkpoints: refused unless --overwrite."""
    existing = latest_checkpoint(config.run_dir)
    if existing is not None and not config.overwrite:
        raise UserError(f"{config.run_dir} holds {_describe_run(existing)}, start over with --overwrite "
                        "(deletes its checkpoints), or choose another --run-dir")


def check_outputs(config: TrainConfig, run_id: str) -> None:
    """Refuse, before any training, outputs that cannot be written, and another run's final model."""
    final_path = final_model_path(config.out_dir, config.format)
    check_writable_dir(final_path.parent, "final model")
    check_writable_dir(config.run_dir, "checkpoints")
    claim_final_model(final_path, run_id, config.overwrite)


def claim_run_dir(config: TrainConfig, resumed: bool, world: World = World()) -> RunLock | None:
    """Take the run directory for this run (a collective; the first thing the run changes on disk):
    rank 0 locks it, removes what writers that died left half-written, and for a new run started
    with --overwrite deletes the earlier run's checkpoints. Rank 0 gets the lock to release at the end."""
    lock = None
    if world.is_main:
        lock = RunLock(config.run_dir)
        if not resumed:
            try:
                refuse_to_replace(config)  # another run may have started here since this one looked
            except UserError:
                lock.release()
                raise
        remove_stale_temporaries(config.run_dir, every=True)  # no other writer can be there: the lock says so
        remove_stale_temporaries(Path(config.run_dir) / CHECKPOINTS, every=True)
        remove_stale_temporaries(config.out_dir)
    distributed.barrier(world)  # every rank has read the checkpoint before rank 0 deletes
    if world.is_main and not resumed:
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
