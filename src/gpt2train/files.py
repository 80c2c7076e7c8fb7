"""Safe files: crash-safe writes (a reader sees the old file or the complete new one, never a part)
and loads that never run code from the file."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from .checksum import archive_sealed
from .errors import UserError


# Temporary files are named .NAME.HOST-PID.RANDOM.tmp: the writer's machine and process, so that a
# later start can tell the leftovers of a writer that died from the file of one still writing.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>\w*)-(?P<pid>\d+)\.\w+\.tmp$")


class WriteError(UserError):
    """A file could not be written (a full disk, a file-size limit, no permission); the previous
    file, if any, is unchanged."""

    def __init__(self, path: Path, reason: str, code: int | None = None):
        super().__init__(f"could not write {path}: {reason}; the previous file, if any, is unchanged: "
                         f"{write_fix(code)}")
        self.path, self.reason, self.code = path, reason, code


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_fix(code: int | None) -> str:
    """What to do about a write that failed with OS error `code`."""
    if code in _FULL:
        return "free some space there, or write elsewhere"
    return "make the directory writable, or write elsewhere"


def _writer_tag() -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}-{os.getpid()}"


class _RecordingFile:
    """A file that remembers the OSError a write raised. torch's zip writer reports a failed write
    (a full disk, a file-size limit) as a RuntimeError that no longer says why."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class DirectFile:
    """A write-only stream to an open file descriptor (closed with it) that bypasses the page cache
    (O_DIRECT) where the system and the file system allow it, for files of a gigabyte or more.

    Buffered, such a file first fills the page cache (new pages are slow to come by on some
    machines) and reaches the disk only at the fsync; written direct, it reaches the disk as it is
    written, and the fsync has little left to wait for. The bytes are copied into two aligned
    buffers: while one fills, the other is written on a thread. `flush()` writes the rest (a last
    piece of any length), after which the file is written through the page cache.
    """

    BUFFER_BYTES = 8 * 2**20
    ALIGN = 4096  # of O_DIRECT's offsets, lengths and memory: a multiple of every disk's block size

    def __init__(self, fd: int):
        self._fd = fd
        self._direct = _set_direct(fd, True)
        self._buffers = [mmap.mmap(-1, self.BUFFER_BYTES) for _ in range(2)]  # page-aligned
        self._current, self._filled = 0, 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2train-direct")
        self._pending: Future | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while len(view):
            take = min(len(view), self.BUFFER_BYTES - self._filled)
            self._buffers[self._current][self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self.BUFFER_BYTES:
                self._wait()
                self._pending = self._writer.submit(self._write_all, memoryview(self._buffers[self._current]))
                self._current, self._filled = 1 - self._current, 0
        return written

    def flush(self) -> None:
        self._wait()
        view = memoryview(self._buffers[self._current])[: self._filled]
        aligned = len(view) - len(view) % self.ALIGN if self._direct else 0
        self._write_all(view[:aligned])
        self._direct = _set_direct(self._fd, False) if self._direct else False
        self._write_all(view[aligned:])
        self._filled = 0

    def fileno(self) -> int:
        return self._fd

    def _wait(self) -> None:
        """Until the buffer being written is written; raises what writing it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                view = view[os.write(self._fd, view) :]
            except OSError as e:  # a file system that takes O_DIRECT at open but not for this write
                if not (self._direct and e.errno == errno.EINVAL):
                    raise
                self._direct = _set_direct(self._fd, False)

    def close(self) -> None:
        """Close the file once no write is under way (a failed one included)."""
        try:
            self._writer.shutdown(wait=True)
        finally:
            os.close(self._fd)  # the buffers go with the last view of them (a failed write's traceback holds one)

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is now on."""
    flag = getattr(os, "O_DIRECT", 0)  # Linux; other systems write through the page cache
    if not flag:
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:  # a file system without direct I/O (tmpfs on older kernels)
        return False
    return on


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], direct: bool = False) -> None:
    """Write through `write(f)` into a temporary file beside `path`, then swap it in.

    Temp file in the same directory (so the rename cannot cross file systems), flush and fsync,
    os.replace, then fsync the directory so the rename itself survives a power cut. A failure to
    write, whatever the writer raised for it, is a UserError naming the system's reason. With
    `direct`, `f` is a write-only DirectFile (for large files written in one pass).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.",
                                   suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e.strerror or str(e), e.errno) from None
    try:
        with DirectFile(fd) if direct else os.fdopen(fd, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except Exception as e:
                if f.error is not None and e is not f.error:
                    raise f.error from None
                raise
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(path, e.strerror or str(e), e.errno) from None
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(directory: str | Path, every: bool = False) -> None:
    """Delete the temporary files that writers on this machine left in `directory` when they died
    before renaming them into place; with `every`, all of atomic_write's temporary files (when no
    other process can be writing there)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    host = _writer_tag().rsplit("-", 1)[0]
    for path in directory.iterdir():
        found = _TEMPORARY.match(path.name)
        if every and path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
        elif found and found["host"] == host and not _alive(int(found["pid"])):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
        raise UserError(f"could not write {path}: {e.strerror}; the previous directory, if any, is unchanged: "
                        f"{write_fix(e.errno)}") from None
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
            raise UserError(f"could not write {path}: {e.strerror}; the previous directory, if any, is unchanged: "
                            f"{write_fix(e.errno)}") from None
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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
