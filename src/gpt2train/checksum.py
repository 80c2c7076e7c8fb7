"""Checksums that a file carries, so that a reader can tell a damaged file from a good one before
using a single weight.

A `.pt` file (torch.save's zip archive) carries the checksum of all its bytes in the archive's
comment, the last bytes of the file, where zip readers (torch.load among them) expect free text:
any changed byte before it, or in it, is found. A safetensors file carries the checksum of its
tensors and metadata in its metadata (`content_digest`).

The checksum is SHA-256 over the SHA-256 digests of consecutive 64 MiB pieces, so that the pieces
are hashed on every core (hashlib releases Python's lock): checking a 1.5 GB checkpoint takes a
fraction of the time it takes to read it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

PIECE_BYTES = 64 * 2**20
PREFIX = "gpt2train-sha256:"
# A zip archive ends with its end-of-central-directory record: 22 bytes, of which the last two give
# the length of the comment that follows.
EOCD = struct.Struct("<4s16sH")
EOCD_MAGIC = b"PK\x05\x06"
COMMENT_BYTES = len(PREFIX) + 64


def _piece_digests(pieces: list, read=lambda piece: piece) -> list[bytes]:
    """SHA-256 of each `read(piece)`, on several threads."""
    with ThreadPoolExecutor(max_workers=min(len(pieces), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(lambda piece: hashlib.sha256(read(piece)).digest(), pieces))


def _file_digest(fd: int, end: int) -> str:
    """The checksum of bytes [0, end) of an open file, read in pieces on several threads, each thread
    into one buffer that it reuses: a fresh 64 MiB buffer per piece cost more to fault in than to hash."""
    starts = list(range(0, max(end, 1), PIECE_BYTES))
    buffers = threading.local()

    def read(start: int) -> memoryview:
        if not hasattr(buffers, "piece"):
            buffers.piece = memoryview(bytearray(min(PIECE_BYTES, end)))
        piece, done = buffers.piece[: min(PIECE_BYTES, end - start)], 0
        while done < len(piece):
            got = _pread_into(fd, piece[done:], start + done)
            if got == 0:
                raise OSError(f"the file ended before byte {end:,}")
            done += got
        return piece

    return PREFIX + hashlib.sha256(b"".join(_piece_digests(starts, read))).hexdigest()


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)  # systems without preadv
    buffer[: len(data)] = data
    return len(data)


class ArchiveSealer:
    """A write-only stream that passes a zip archive (torch.save's) on to `out` and, at `seal()`,
    appends the checksum of every byte it passed as the archive's comment. The bytes are hashed as
    they go by, so the file is never read back to be sealed."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._digests: list[bytes] = []  # of the pieces hashed so far
        self._piece, self._in_piece = hashlib.sha256(), 0
        # The last two bytes are the archive's comment length, which seal() replaces: they are held
        # back, unhashed and unwritten, until more bytes follow them.
        self._held = b""
        self._tail = b""  # the last EOCD.size bytes, to check that an archive without a comment ends here

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= 2:
            self._pass(self._held)
            self._pass(view[:-2])
            self._held = bytes(view[-2:])
        else:
            both = self._held + bytes(view)
            self._pass(both[:-2])
            self._held = both[-2:]
        self._tail = (self._tail + bytes(view[-EOCD.size:]))[-EOCD.size:]
        return len(view)

    def _pass(self, view) -> None:
        self._out.write(view)
        view = memoryview(view)
        while len(view):
            take = min(len(view), PIECE_BYTES - self._in_piece)
            self._piece.update(view[:take])
            self._in_piece += take
            view = view[take:]
            if self._in_piece == PIECE_BYTES:
                self._digests.append(self._piece.digest())
                self._piece, self._in_piece = hashlib.sha256(), 0

    def flush(self) -> None:
        self._out.flush()

    def seal(self) -> None:
        """Write the checksum as the comment of the archive that was written."""
        magic, _, comment_length = EOCD.unpack(self._tail) if len(self._tail) == EOCD.size else (b"", b"", 0)
        if magic != EOCD_MAGIC or comment_length:
            raise ValueError("not a zip archive that ends without a comment")
        if self._in_piece or not self._digests:
            self._digests.append(self._piece.digest())
        comment = (PREFIX + hashlib.sha256(b"".join(self._digests)).hexdigest()).encode()
        self._out.write(struct.pack("<H", len(comment)) + comment)


def save_sealed(obj, f: BinaryIO) -> None:
    """torch.save `obj` to `f`, sealed with the checksum of its bytes."""
    sealer = ArchiveSealer(f)
    torch.save(obj, sealer)
    sealer.seal()


def archive_sealed(path: str | Path) -> bool | None:
    """True when a .pt file's bytes match the checksum it carries, False when they do not, None when
    it carries none (written by an older gpt2train, or by another program)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        tail_start = size - EOCD.size - COMMENT_BYTES
        if tail_start < 0:
            return None
        tail = os.pread(fd, EOCD.size + COMMENT_BYTES, tail_start)
        magic, _, comment_length = EOCD.unpack(tail[: EOCD.size])
        comment = tail[EOCD.size :]
        if magic != EOCD_MAGIC or comment_length != COMMENT_BYTES or not comment.startswith(PREFIX.encode()):
            # No checksum where one belongs: a file without one, or one damaged right there.
            return False if PREFIX.encode() in tail else None
        return _file_digest(fd, size - COMMENT_BYTES - 2).encode() == comment


def content_digest(contents) -> str:
    """The checksum of `contents`: nested dicts, lists and tuples of tensors and plain values.

    A canonical encoding: each value's type and value, dict items in sorted key order, and each
    tensor's dtype, shape and bytes.
    """
    tensors: dict[tuple, torch.Tensor] = {}
    parts: list = []
    _encode(contents, parts, tensors)
    owners, pieces = [], []
    for key, t in tensors.items():
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, max(len(data), 1), PIECE_BYTES):
            owners.append(key)
            pieces.append(data[start : start + PIECE_BYTES])
    tensor_digests = {key: hashlib.sha256() for key in tensors}
    for key, digest in zip(owners, _piece_digests(pieces)):
        tensor_digests[key].update(digest)
    h = hashlib.sha256()
    for part in parts:
        h.update(tensor_digests[part].digest() if isinstance(part, tuple) else part)
    return PREFIX + h.hexdigest()


def _encode(value, parts: list, tensors: dict) -> None:
    """Append the canonical encoding of `value` to parts; a tensor appears as its key in `tensors`."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        # Tensors that share memory (the tied embedding) are hashed once.
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        tensors.setdefault(key, t)
        parts.append(f"T{t.dtype}{tuple(t.shape)}".encode())
        parts.append(key)
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        parts.append(f"D{len(items)}".encode())
        for k, v in items:
            _encode(k, parts, tensors)
            _encode(v, parts, tensors)
    elif isinstance(value, (list, tuple)):
        parts.append(f"L{len(value)}".encode())
        for v in value:
            _encode(v, parts, tensors)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        text = repr(value).encode()
        parts.append(f"{type(value).__name__}{len(text)}:".encode() + text)
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}")
