"""The checkpoint file format: where a run's checkpoints live, how they are written, found and read.

A run directory keeps its checkpoints as `checkpoints/step_00000400.pt`. Each is written to a
temporary file and renamed into place, so a file with a checkpoint's name is always complete, and
the newest such file is the run's latest checkpoint. Contents are tensors and plain Python values
only, with a checksum that is verified when the checkpoint is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checksum import save_sealed
from .errors import UserError
from .files import atomic_write, load_weights_only

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
    """Write the checkpoint for `step`, then delete all but the newest `keep` of its run's (the same
    `run_id`; another run's checkpoints are never deleted)."""
    path = checkpoint_path(run_dir, step)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": step, **contents}
    atomic_write(path, lambda f: _save_without_crc32(payload, f), direct=True)
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_run_id(p) in (contents.get("run_id"), None)]
    for old in ours[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _save_without_crc32(payload: dict, f) -> None:
    """save_sealed without a CRC-32 per record (computing it was a good part of the time to write a 1.5 GB
    checkpoint): the seal's SHA-256 covers every byte. torch.load does not look at CRCs."""
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        save_sealed(payload, f)
    finally:
        torch.serialization.set_crc32_options(crc32)


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run a checkpoint belongs to, read without its weights; None for a checkpoint that
    carries none (version 1) or cannot be read."""
    try:
        contents = load_weights_only(path, "checkpoint", mmap=True)
    except UserError:
        return None
    return contents.get("run_id") if isinstance(contents, dict) else None


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
    return check_checkpoint(contents, path)


def check_checkpoint(contents: dict, path: str | Path) -> dict:
    """`contents`, read from `path`, if they are a complete checkpoint of a version this gpt2train reads."""
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
