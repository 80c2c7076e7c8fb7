"""Safe files: crash-safe writes (a reader sees the old file or the complete new one, never a part)
and loads that never run code from the file."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .checksum import archive_sealed
from .errors import UserError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(f)` into a temporary file beside `path`, then swap it in.

    Temp file in the same directory (so the rename cannot cross file systems), flush and fsync,
    os.replace, then fsync the directory so the rename itself survives a power cut.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}; choose a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror}; the previous file, if any, is unchanged") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a directory through `fill(tmp)` in a temporary sibling, then rename it into place.

    An existing `path` is replaced (whether it may be is the caller's decision): it is moved aside
    and deleted only once the new directory is in place, so a failure leaves the old one whole.
    """
    path = Path(path).absolute()  # "." has no name to put in the sibling's
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}; choose a writable directory") from None
    old = tmp.with_suffix(".old")
    try:
        fill(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a normal directory's mode
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror}; the previous directory, if any, is unchanged") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def check_writable_dir(path: str | Path, purpose: str) -> None:
    """Fail now, not hours into a run, if `path` could not be created or written to.

    Creates nothing: it writes a throwaway file in the nearest directory that already exists.
    """
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            problem = f"{existing} is not writable ({e.strerror})"
    if problem:
        raise UserError(f"cannot write the {purpose} to {path}: {problem}; choose another directory")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_weights_only(path: str | Path, what: str, mmap: bool = False, damaged_fix: str = "",
                      sealed_versions: tuple[int, ...] = ()):
    """torch.load that never runs code from the file; every failure is one UserError line.

    `what` names the file in messages ("checkpoint", "model file"). With `damaged_fix`, the file's
    bytes are first checked against the checksum it carries, and a file whose format_version is
    one of `sealed_versions` must carry one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    sealed = archive_sealed(path) if damaged_fix else None
    if sealed is False:
        raise UserError(f"{path} is damaged: its bytes do not match the checksum it was saved with: {damaged_fix}")
    contents = _torch_load(path, what, mmap)
    version = contents.get("format_version") if isinstance(contents, dict) else None
    if damaged_fix and sealed is None and version in sealed_versions:
        raise UserError(f"{path} carries no checksum, so it cannot be checked for damage (a gpt2train {what} "
                        f"carries one): {damaged_fix}")
    return contents


def _torch_load(path: Path, what: str, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        disallowed = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class or function it would call
        if disallowed:
            raise UserError(
                f"{path} holds objects other than tensors and plain values ({disallowed.group(1)}), so it is not "
                f"a gpt2train {what}; refusing to load it"
            ) from None
        raise UserError(f"{path} is not a readable {what} (truncated or corrupt: not a torch file)") from None
    except Exception as e:  # damaged bytes surface as any of a dozen exception types
        detail = str(e).strip().splitlines()[0] if isinstance(e, (RuntimeError, OSError)) and str(e).strip() else ""
        raise UserError(f"{path} is not a readable {what} (truncated or corrupt{': ' + detail if detail else ''})") from None
