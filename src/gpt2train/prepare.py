"""Documents to token shards: the train/val split, tokenization on every core, shards streamed to
disk, and the manifest, so memory stays flat however large the corpus."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import (
    HEADER, LEGACY_FILES, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS, TOKEN_DTYPE, shard_name,
    token_header,
)
from .errors import UserError
from .files import WriteError, atomic_write, check_writable_dir, file_sha256
from .progress import Progress
from .sources import (
    BUILTIN_NAME, DEFAULT_HF_SPLIT, DEFAULT_TEXT_FIELD, Fragment, Source, resolve_sources,
)
from .tokenizer import EOT_ID, EOT_TOKEN, GPT2_VOCAB_SIZE, TOKENIZER_NAME, get_tokenizer

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SHARD_TOKENS = 100_000_000
DOWNLOADS = "downloads"  # where URLs are cached inside the output directory, unless --cache-dir says otherwise
PENDING_MANIFEST = f".{MANIFEST_FILE}.new"  # the new manifest, until the new shards are in place
# Documents longer than this many characters are tokenized in pieces of about this size, cut where
# the cut cannot change a token (see _CUT), so one huge file neither fills memory nor one core.
PIECE_CHARS = 1 << 20
BATCH_CHARS = 1 << 20  # text handed to a worker at a time
# A single space between two non-space characters: GPT-2's pre-tokenizer always starts a new piece
# at such a space (" word", " 42", " ("), and no piece before it runs past it, so the text on either
# side tokenizes exactly as it does in the whole.
_CUT = re.compile(r"(?<=\S) (?=\S)")
_SHARD = re.compile(r"^(?:train|val)_\d{6}\.bin$")
_TEMPORARY_SHARD = re.compile(r"^\.(?:train|val)_\d{6}\.bin\.partial$")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Piece:
    text: str
    first: bool  # starts a document
    last: bool  # ends a document: <|endoftext|> follows it
    source_bytes: int  # input bytes consumed for it, for the ETA
    split: str = ""  # set when it is routed
    text_bytes: int = 0  # its UTF-8 length, for the speed


def pieces(fragments: Iterable[Fragment]) -> Iterator[Piece]:
    """A source's fragments regrouped into whole documents, or pieces of about PIECE_CHARS of longer ones.

    Empty documents are left out.
    """
    buffer, first, source_bytes, searched = "", True, 0, 0
    for fragment in fragments:
        buffer += fragment.text
        source_bytes += fragment.source_bytes
        while len(buffer) > PIECE_CHARS:
            cut = _CUT.search(buffer, max(PIECE_CHARS, searched))
            if cut is None:  # no safe place yet: read on
                searched = len(buffer) - 1
                break
            yield Piece(buffer[: cut.start()], first, False, source_bytes)
            buffer, first, source_bytes, searched = buffer[cut.start():], False, 0, 0
        if fragment.last:
            if buffer or not first:
                yield Piece(buffer, first, True, source_bytes)
                source_bytes = 0
            buffer, first, searched = "", True, 0


class SplitRule:
    """Holds out whole documents for validation, about val_fraction of the text, as they stream past.

    A document goes to validation when the held-out share of the text seen so far stays within
    val_fraction with it, so the split depends only on the documents' order and sizes. A document
    cut into pieces is judged by its first piece.
    """

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.seen = self.held_out = 0

    def assign(self, chars: int) -> str:
        self.seen += chars
        if self.held_out + chars <= self.val_fraction * self.seen:
            self.held_out += chars
            return "val"
        return "train"

    def account(self, split: str, chars: int) -> None:
        """A later piece of a document already assigned to `split`."""
        self.seen += chars
        self.held_out += chars if split == "val" else 0


class ShardWriter:
    """A split's tokens, streamed into shards of at most shard_tokens each.

    Shards keep temporary names (.train_000000.bin.partial) until commit(), so an interrupted
    prepare never leaves a file that looks like a complete shard.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory = directory
        self.split = split
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # the closed ones: file, tokens, sha256
        self.tokens = 0
        self._file = None
        self._count = 0  # tokens in the open shard

    def _temporary(self, index: int) -> Path:
        return self.directory / f".{shard_name(self.split, index)}.partial"

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self._count == self.shard_tokens:
                self.close()
                self._file = self._temporary(len(self.shards)).open("w+b")
                self._file.write(token_header(0))  # the count is filled in when the shard is closed
                self._count = 0
            n = min(len(ids), self.shard_tokens - self._count)
            self._file.write(ids[:n].tobytes())
            self._count += n
            self.tokens += n
            ids = ids[n:]

    def take_tail(self, n: int) -> np.ndarray:
        """Remove and return the last n tokens, or fewer if the open shard holds fewer."""
        n = min(n, self._count)
        if not n:
            return np.empty(0, dtype=TOKEN_DTYPE)
        keep = HEADER.size + (self._count - n) * TOKEN_DTYPE.itemsize
        self._file.seek(keep)
        tail = np.frombuffer(self._file.read(), dtype=TOKEN_DTYPE)
        self._file.truncate(keep)
        self._file.seek(keep)
        self._count -= n
        self.tokens -= n
        return tail

    def close(self) -> None:
        """Finish the open shard, if any: its token count in the header, synced, hashed."""
        if self._file is None:
            return
        f, self._file = self._file, None
        with f:
            f.seek(0)
            f.write(token_header(self._count))
            f.flush()
            os.fsync(f.fileno())
        path = self._temporary(len(self.shards))
        self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self._count,
                            "sha256": file_sha256(path)})

    def commit(self) -> None:
        for index, shard in enumerate(self.shards):
            os.replace(self._temporary(index), self.directory / shard["file"])

    def discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # what it still buffered finds the disk full: the file is deleted anyway
                pass
            self._file = None
        for index in range(len(self.shards) + 1):
            self._temporary(index).unlink(missing_ok=True)


class MemorySink:
    """A split's tokens kept in memory: the built-in corpus, tokenized for every run."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        self.arrays.append(ids)
        self.tokens += len(ids)

    def take_tail(self, n: int) -> np.ndarray:
        ids = self.array()
        self.arrays, self.tokens = [ids[: len(ids) - n]], len(ids) - n
        return ids[len(ids) - n:]

    def array(self) -> np.ndarray:
        return np.concatenate(self.arrays) if self.arrays else np.empty(0, dtype=TOKEN_DTYPE)


def _encode(pieces: list[Piece]) -> list[np.ndarray]:
    """Each piece's tokens, followed by <|endoftext|> where it ends a document."""
    enc = get_tokenizer()
    if all(piece.last and EOT_TOKEN not in piece.text for piece in pieces):
        # Whole documents in one call, which spends less time holding Python's lock: joined by
        # <|endoftext|>, encoded as the special token, they are cut exactly where they meet and each
        # tokenizes as it does alone.
        ids = enc.encode_to_numpy(EOT_TOKEN.join(piece.text for piece in pieces) + EOT_TOKEN,
                                  allowed_special={EOT_TOKEN}).astype(TOKEN_DTYPE)
        return np.split(ids, np.flatnonzero(ids == EOT_ID)[:-1] + 1)
    out = []
    for piece in pieces:
        ids = enc.encode_to_numpy(piece.text, disallowed_special=())  # == encode_ordinary, without a list
        tokens = np.empty(len(ids) + piece.last, dtype=TOKEN_DTYPE)
        tokens[: len(ids)] = ids
        if piece.last:
            tokens[-1] = EOT_ID
        out.append(tokens)
    return out


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator[tuple]:
    """(item, fn(item)) in order, computed on `workers` threads with at most 2 x workers items in flight.

    tiktoken releases the GIL while it encodes, so threads keep every core busy without copying the
    text to other processes; `workers` 1 runs everything in this thread.
    """
    if workers == 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()


@dataclass
class Tokenized:
    documents: dict[str, int]  # per split
    text_sha256: str  # SHA-256 of every document's UTF-8 text, each followed by a zero byte


def tokenize(sources: list[Source], sinks: dict, val_fraction: float, workers: int,
             progress: bool = False) -> Tokenized:
    """Tokenize every document of `sources` into sinks["train"] or sinks["val"] (ShardWriter or MemorySink).

    When no whole document went to validation (a single document, say), the last tokens of the
    training split become the validation split, about val_fraction of them.
    """
    rule = SplitRule(val_fraction)
    digest = hashlib.sha256()
    documents = dict.fromkeys(SPLITS, 0)
    has_text = False

    def batches() -> Iterator[list[Piece]]:
        nonlocal has_text
        batch, chars, split = [], 0, "train"
        for source in sources:
            for piece in pieces(source.read()):
                try:
                    data = piece.text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates (JSON can spell them): replaced, as tiktoken does
                    piece.text = piece.text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                    data = piece.text.encode("utf-8")
                digest.update(data)
                if piece.last:
                    digest.update(b"\0")
                if piece.first:
                    split = rule.assign(len(piece.text))
                    documents[split] += 1
                else:
                    rule.account(split, len(piece.text))
                has_text = has_text or (piece.text != "" and not piece.text.isspace())
                piece.split, piece.text_bytes = split, len(data)
                batch.append(piece)
                chars += len(piece.text)
                if chars >= BATCH_CHARS:
                    yield batch
                    batch, chars = [], 0
        if batch:
            yield batch

    sizes = [source.size for source in sources]
    bar = Progress("prepare", None if None in sizes else sum(sizes), progress)
    text_bytes = source_bytes = 0

    def counts() -> str:
        return f"{sum(documents.values()):,} docs | {sum(sink.tokens for sink in sinks.values()) / 1e6:,.1f}M tokens"

    try:
        for batch, token_arrays in _ordered_map(_encode, batches(), workers):
            for piece, ids in zip(batch, token_arrays):
                sinks[piece.split].write(ids)
                text_bytes += piece.text_bytes
                source_bytes += piece.source_bytes
            bar.update(counts(), text_bytes, source_bytes)
        bar.update(counts(), text_bytes, source_bytes, force=True)
    finally:
        bar.close()
    if not has_text:
        raise UserError("the input holds no text: give non-empty text files")
    if val_fraction > 0 and not sinks["val"].tokens:
        sinks["val"].write(sinks["train"].take_tail(max(1, int(sinks["train"].tokens * val_fraction))))
    return Tokenized(documents, digest.hexdigest())


def tokenize_inputs(inputs: list[str]) -> np.ndarray:
    """Every document of `inputs` in memory, unsplit: the text `gpt2train eval FILES` scores."""
    sinks = {split: MemorySink() for split in SPLITS}
    with tempfile.TemporaryDirectory() as downloads:  # a URL among the inputs is read once, then dropped
        tokenize(resolve_sources(inputs, cache_dir=Path(downloads)), sinks, 0.0, default_workers())
    return sinks["train"].array()


def prepare(inputs: list[str], out_dir: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION, *,
            workers: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = DEFAULT_TEXT_FIELD,
            include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), hf_split: str = DEFAULT_HF_SPLIT,
            cache_dir: str | Path | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Tokenize `inputs` (or, with none, the built-in corpus) into token shards and a manifest in out_dir.

    `workers` 0 uses every core. Returns the manifest. The same inputs always give the same bytes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard tokens must be positive, got {shard_tokens}")
    if workers < 0:
        raise UserError(f"workers must not be negative (0 uses every core), got {workers}")
    out = Path(out_dir)
    check_writable_dir(out, "prepared data")
    _check_replaceable(out, overwrite)
    created = [d for d in (out / DOWNLOADS, out) if not d.exists()]  # removed again if prepare fails
    writers = {split: ShardWriter(out, split, shard_tokens) for split in SPLITS}
    try:
        sources = resolve_sources(inputs, text_field=text_field, include=tuple(include), exclude=tuple(exclude),
                                  hf_split=hf_split, cache_dir=Path(cache_dir) if cache_dir else out / DOWNLOADS,
                                  progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.iterdir():  # from a prepare that was interrupted
            if _TEMPORARY_SHARD.match(leftover.name):
                leftover.unlink()
        tokenized = tokenize(sources, writers, val_fraction, workers or default_workers(), progress)
        for writer in writers.values():
            writer.close()
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "tokenizer": TOKENIZER_NAME,
            "vocab_size": GPT2_VOCAB_SIZE,
            "dtype": "uint16",
            "header_bytes": HEADER.size,
            "shard_tokens": shard_tokens,
            "val_fraction": val_fraction,
            "documents": sum(tokenized.documents.values()),
            "splits": {
                split: {"documents": tokenized.documents[split], "tokens": writers[split].tokens,
                        "shards": writers[split].shards}
                for split in SPLITS
            },
            "sources": list(inputs) or [BUILTIN_NAME],
            "text_sha256": tokenized.text_sha256,
        }
        _commit(out, writers, manifest)
    except (OSError, WriteError) as e:
        _discard(out, writers, created)
        reason = e.reason if isinstance(e, WriteError) else e.strerror
        raise UserError(f"could not write the prepared data to {out}: {reason}; free some space or choose "
                        f"another --out") from None
    except BaseException:
        _discard(out, writers, created)
        raise
    return manifest


def _check_replaceable(out: Path, overwrite: bool) -> None:
    existing = [name for name in (MANIFEST_FILE, *LEGACY_FILES) if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds prepared data ({existing[0]}): choose another --out, or add "
                        f"--overwrite to replace it")


def _commit(out: Path, writers: dict[str, ShardWriter], manifest: dict) -> None:
    """Swap the new shards in and the old data set out; the new manifest, renamed into place last,
    completes it. It is written first, under a temporary name: the last write that a full disk can
    fail, while the old data set is still whole."""
    atomic_write(out / PENDING_MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the directory is no data set until the end
    new = {shard["file"] for writer in writers.values() for shard in writer.shards}
    for old in out.iterdir():
        if (_SHARD.match(old.name) or old.name in LEGACY_FILES) and old.name not in new:
            old.unlink()
    for writer in writers.values():
        writer.commit()
    os.replace(out / PENDING_MANIFEST, out / MANIFEST_FILE)


def _discard(out: Path, writers: dict[str, ShardWriter], created: list[Path]) -> None:
    for writer in writers.values():
        writer.discard()
    (out / PENDING_MANIFEST).unlink(missing_ok=True)
    for directory in created:
        try:
            directory.rmdir()  # only if nothing (a download worth keeping) is in it
        except OSError:
            pass
