"""Token shards and the manifest that lists them, read back as one token sequence, and the samplers
that cut it into training batches.

A prepared directory holds manifest.json and, per split, shards named train_000000.bin,
val_000000.bin, ... Each shard is a token file: a 64-byte little-endian header, then the ids.

    offset  size  field
    0       8     magic b"GPT2TOK\\0"
    8       4     format version (uint32, 1)
    12      4     bytes per token (uint32, 2 = uint16)
    16      4     vocabulary size the ids are below (uint32, 50257)
    20      4     reserved (0)
    24      8     token count (uint64)
    32      32    reserved (zeros), so the ids start 64-byte aligned
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .errors import UserError
from .files import file_sha256
from .tokenizer import GPT2_VOCAB_SIZE, TOKENIZER_NAME

MAGIC = b"GPT2TOK\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # 64 bytes
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gpt2train-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
LEGACY_FILES = ("meta.json", "train.bin", "val.bin")  # the single-file layout of gpt2train 0.1


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def token_header(count: int) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, TOKEN_DTYPE.itemsize, GPT2_VOCAB_SIZE, 0, count)


def read_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a token file after checking its header, size and id range."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise UserError(f"cannot read token file {path}: {e.strerror}; run `gpt2train prepare`") from None
    fix = "re-create it with `gpt2train prepare`"
    if len(raw) < HEADER.size:
        raise UserError(f"token file {path} is too short to hold a header: {fix}")
    magic, version, itemsize, vocab, _, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gpt2train token file (bad magic): {fix}")
    if version != FORMAT_VERSION:
        raise UserError(f"token file {path} has format version {version}, this gpt2train reads {FORMAT_VERSION}: {fix}")
    if itemsize != TOKEN_DTYPE.itemsize:
        raise UserError(f"token file {path} stores {itemsize}-byte ids, expected {TOKEN_DTYPE.itemsize}: {fix}")
    expected_size = HEADER.size + count * itemsize
    actual_size = path.stat().st_size
    if actual_size != expected_size:
        raise UserError(
            f"token file {path} is {actual_size} bytes but its header promises {expected_size} "
            f"(truncated or corrupt): {fix}"
        )
    if count == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    ids = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER.size, shape=(count,))
    if int(ids.max()) >= vocab:
        raise UserError(f"token file {path} holds ids >= its vocabulary size {vocab}: {fix}")
    return ids


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory, checked for the fields the loader relies on."""
    path = Path(data_dir)
    fix = f"run `gpt2train prepare ... --out {path}`"
    if path.is_file():
        raise UserError(f"{path} is a file, and --data takes a directory written by `gpt2train prepare`: "
                        f"run `gpt2train prepare {path} --out DIR`, then train with --data DIR")
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist: {fix}")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (path / LEGACY_FILES[0]).exists():
            raise UserError(f"{path} was prepared by an older gpt2train (meta.json, no {MANIFEST_FILE}): "
                            f"prepare it again with --overwrite") from None
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST_FILE}): {fix}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / MANIFEST_FILE} ({e}): {fix}") from None
    problem = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        problem = f"not a {MANIFEST_FORMAT} manifest"
    elif manifest.get("format_version") != MANIFEST_VERSION:
        problem = f"format version {manifest.get('format_version')}, this gpt2train reads {MANIFEST_VERSION}"
    elif manifest.get("tokenizer") != TOKENIZER_NAME:
        problem = f"tokenizer {manifest.get('tokenizer')!r}, not {TOKENIZER_NAME!r}"
    else:
        for split in SPLITS:
            shards = manifest.get("splits", {}).get(split, {}).get("shards")
            if not isinstance(shards, list) or not all(_is_shard_entry(s) for s in shards):
                problem = f"no valid shard list for the {split} split"
                break
    if problem:
        raise UserError(f"{path / MANIFEST_FILE} is damaged or foreign ({problem}): run "
                        f"`gpt2train prepare ... --out {path} --overwrite`")
    return manifest


def _is_shard_entry(entry) -> bool:
    # A plain file name: a manifest never points outside its own directory.
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("tokens"), int)
            and Path(entry["file"]).name == entry["file"] and entry["file"] not in ("", ".", ".."))


def read_split(data_dir: str | Path, manifest: dict, split: str) -> TokenSource:
    """A split's shards by memory map, each checked against its header and the manifest's count now,
    and against the manifest's SHA-256 when it is first read from."""
    parts, checks = [], []
    for entry in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / entry["file"]
        ids = read_tokens(path)
        if len(ids) != entry["tokens"]:
            raise UserError(f"token file {path} holds {len(ids):,} tokens but {MANIFEST_FILE} lists "
                            f"{entry['tokens']:,}: re-create the directory with `gpt2train prepare --overwrite`")
        parts.append(ids)
        checks.append(ShardCheck(path, entry["sha256"]) if entry.get("sha256") else None)
    return TokenSource(parts, checks)


class ShardCheck:
    """A shard's bytes against the SHA-256 its manifest lists, checked once, when a window is first read
    from it: a run pays only for the shards it uses, and never reads a token that changed since
    `prepare` (hashing reads the shard once, at disk speed)."""

    def __init__(self, path: Path, sha256: str):
        self.path, self.sha256 = path, sha256
        self.done = False
        self._lock = threading.Lock()  # the data thread and the loop may both read

    def __call__(self) -> None:
        if self.done:
            return
        with self._lock:
            if not self.done and file_sha256(self.path) != self.sha256:
                raise UserError(f"token file {self.path} does not match the SHA-256 that {MANIFEST_FILE} lists (it "
                                "changed after `gpt2train prepare` wrote it): re-create the directory with "
                                "`gpt2train prepare --overwrite`")
            self.done = True


class TokenSource:
    """Token ids kept in consecutive arrays (memory-mapped shards), used like one array.

    len() counts them all; an int index gives one token; a slice (without a step) gives a view that
    reads nothing until it is used; np.asarray() reads all of it. Each part may come with a check
    (ShardCheck) that runs before its tokens are first read.
    """

    def __init__(self, parts: list[np.ndarray], checks: list | None = None):
        checks = checks or [None] * len(parts)
        kept = [(p, c) for p, c in zip(parts, checks) if len(p)]
        self.parts = [p for p, _ in kept]
        self.checks = [c for _, c in kept]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # starts[-1] is the total

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int | slice) -> TokenSource | int:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a TokenSource slice takes no step")
            pieces = self._pieces(start, max(stop - start, 0))
            return TokenSource([view for _, view in pieces], [self.checks[i] for i, _ in pieces])
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"token {index} of {len(self)}")
        return int(self.read(position, 1)[0])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = self.read(0, len(self))
        return ids if dtype is None else ids.astype(dtype)

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as one array, across shard boundaries."""
        views = self._views(start, length)
        if len(views) == 1:
            return views[0]
        return np.concatenate(views) if views else np.empty(0, dtype=TOKEN_DTYPE)

    def _views(self, start: int, length: int) -> list[np.ndarray]:
        """The pieces of the parts that hold tokens[start : start + length], without copying, checked."""
        pieces = self._pieces(start, length)
        for i, _ in pieces:
            if self.checks[i] is not None:
                self.checks[i]()
        return [view for _, view in pieces]

    def _pieces(self, start: int, length: int) -> list[tuple[int, np.ndarray]]:
        """(part index, view) of each part that holds some of tokens[start : start + length]."""
        pieces = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[i]) if i < len(self.parts) else 0
        while length > 0 and i < len(self.parts):
            pieces.append((i, self.parts[i][offset : offset + length]))
            length -= len(pieces[-1][1])
            i, offset = i + 1, 0
        return pieces


class Sampler(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class _WindowSampler:
    """What both samplers share: the tokens, the batch shape, and this rank's share of each batch.

    Each step the sampler picks the windows of all ranks together, batch_size x world_size of them,
    and rank r takes the r-th slice: any split of the same global batch over ranks sees the same
    windows, and no two ranks the same ones.
    """

    def __init__(self, tokens: TokenSource | np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens = tokens if isinstance(tokens, TokenSource) else TokenSource([tokens])
        if len(self.tokens) < seq_len + 1:
            raise UserError(
                f"the training data has {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                f"use more text or a smaller --seq-len"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def _batch(self, global_starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's windows of seq_len + 1 tokens: (inputs, next-token targets)."""
        starts = global_starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.tokens.read(int(s), self.seq_len + 1) for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]


class RandomWindowSampler(_WindowSampler):
    """Batches of windows that start anywhere, drawn by a generator seeded with `seed`.

    Its position is the generator's state (`state_dict`).
    """

    def __init__(self, tokens: TokenSource | np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(tokens, batch_size, seq_len, seed, rank, world_size)
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * self.world_size))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class SequentialSampler(_WindowSampler):
    """Every non-overlapping window of seq_len input tokens once per epoch, in a shuffled order.

    Window i holds inputs tokens[i * seq_len : (i + 1) * seq_len] and targets one token later; the
    last (len - 1) % seq_len tokens fill no window. Epoch e visits the windows in the order of a
    permutation seeded by (seed, e), and the batches run on into the next epoch without a break.
    Its position is (epoch, windows of the epoch already handed out).
    """

    def __init__(self, tokens: TokenSource | np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(tokens, batch_size, seq_len, seed, rank, world_size)
        self.windows = (len(self.tokens) - 1) // seq_len
        self.epoch = 0
        self.position = 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = []
        wanted = self.batch_size * self.world_size
        while wanted:
            if self.position == self.windows:
                self.epoch, self.position = self.epoch + 1, 0
            taken = self._order_of(self.epoch)[self.position : self.position + wanted]
            chosen.append(taken)
            self.position += len(taken)
            wanted -= len(taken)
        return self._batch(np.concatenate(chosen) * self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


SAMPLERS = {"random": RandomWindowSampler, "sequential": SequentialSampler}
