"""Text to token files (prepare), token files back to arrays, and the training-batch sampler.

Token file layout (little-endian), followed by the ids themselves:

    offset  size  field
    0       8     magic b"GPT2TOK\\0"
    8       4     format version (uint32, 1)
    12      4     bytes per token (uint32, 2 = uint16)
    16      4     vocabulary size the ids are below (uint32, 50257)
    20      4     reserved (0)
    24      8     token count (uint64)
    32      32    reserved (zeros), so the ids start 64-byte aligned

A prepared directory holds train.bin, val.bin and meta.json (tokenizer, counts, sources, hash).
"""

from __future__ import annotations

import glob
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE, TOKENIZER_NAME, get_tokenizer

MAGIC = b"GPT2TOK\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # 64 bytes
TOKEN_DTYPE = np.dtype("<u2")
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
BUILTIN_NAME = "builtin:pydoc_data.topics"
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class Document:
    name: str
    text: str


def builtin_documents() -> list[Document]:
    """The Python documentation topics every CPython ships: ~465 KB of English, ~139K tokens."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc_data.topics:{key}", topics[key]) for key in sorted(topics)]


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, directories searched recursively for *.txt, globs expanded; in order."""
    paths: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no files match '{item}': check the pattern")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"directory {item} holds no .txt files: point at text files")
            paths.extend(found)
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise UserError(f"input {item} does not exist: give text files, directories or globs")
    return paths


def read_documents(inputs: list[str]) -> list[Document]:
    """One document per input file, read as UTF-8."""
    documents = []
    for path in _expand_inputs(inputs):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text: convert it or leave it out") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        documents.append(Document(str(path), text))
    return documents


def corpus_sha256(documents: list[Document]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def split_documents(documents: list[Document], val_fraction: float) -> tuple[list, list]:
    """Hold out whole documents for validation, about val_fraction of the text, deterministically.

    Walking in order, a document goes to validation when the held-out share of the text seen so
    far stays within val_fraction with it; so the split depends only on the documents' order and
    sizes, and is the same on every run.
    """
    train, val = [], []
    seen = held_out = 0
    for doc in documents:
        seen += len(doc.text)
        if held_out + len(doc.text) <= val_fraction * seen:
            held_out += len(doc.text)
            val.append(doc)
        else:
            train.append(doc)
    return train, val


def tokenize(documents: list[Document]) -> np.ndarray:
    """Each document's tokens followed by <|endoftext|>, as one uint16 array."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary_batch([doc.text for doc in documents])
    out = np.empty(sum(len(x) + 1 for x in ids), dtype=TOKEN_DTYPE)
    pos = 0
    for doc_ids in ids:
        out[pos : pos + len(doc_ids)] = doc_ids
        out[pos + len(doc_ids)] = EOT_ID
        pos += len(doc_ids) + 1
    return out


def tokenize_splits(documents: list[Document], val_fraction: float = DEFAULT_VAL_FRACTION):
    """(train_ids, val_ids). A single document is split by tokens instead: its tail is val."""
    if not any(doc.text.strip() for doc in documents):
        raise UserError("the input holds no text: give non-empty text files")
    documents = [doc for doc in documents if doc.text]
    train_docs, val_docs = split_documents(documents, val_fraction)
    if train_docs and val_docs:
        return tokenize(train_docs), tokenize(val_docs)
    ids = tokenize(documents)
    cut = len(ids) - max(1, int(len(ids) * val_fraction)) if val_fraction > 0 else len(ids)
    return ids[:cut], ids[cut:]


def write_tokens(path: str | Path, ids: np.ndarray) -> None:
    header = HEADER.pack(MAGIC, FORMAT_VERSION, TOKEN_DTYPE.itemsize, GPT2_VOCAB_SIZE, 0, len(ids))

    def write(f):
        f.write(header)
        f.write(np.ascontiguousarray(ids, dtype=TOKEN_DTYPE).tobytes())

    atomic_write(path, write)


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


def prepare(inputs: list[str], out_dir: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION) -> dict:
    """Tokenize text files (or, with no inputs, the built-in corpus) into `out_dir`.

    Returns the manifest written to meta.json.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    documents = read_documents(inputs) if inputs else builtin_documents()
    train_ids, val_ids = tokenize_splits(documents, val_fraction)
    out_dir = Path(out_dir)
    write_tokens(out_dir / SPLIT_FILES["train"], train_ids)
    write_tokens(out_dir / SPLIT_FILES["val"], val_ids)
    meta = {
        "format": "gpt2train-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": GPT2_VOCAB_SIZE,
        "dtype": "uint16",
        "splits": {
            name: {"file": SPLIT_FILES[name], "tokens": int(len(ids))}
            for name, ids in (("train", train_ids), ("val", val_ids))
        },
        "val_fraction": val_fraction,
        "documents": len(documents),
        "sources": [str(s) for s in inputs] if inputs else [BUILTIN_NAME],
        "text_sha256": corpus_sha256(documents),
    }
    atomic_write(out_dir / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    return meta


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    source: str
    text_sha256: str  # identifies the text, so a resumed run can tell that its data changed


def load_corpus(data_dir: str = "") -> Corpus:
    """A prepared directory's splits by memory map, or the built-in corpus tokenized in memory."""
    if not data_dir:
        documents = builtin_documents()
        train, val = tokenize_splits(documents)
        return Corpus(train, val, BUILTIN_NAME, corpus_sha256(documents))
    path = Path(data_dir)
    fix = f"run `gpt2train prepare ... --out {path}`"
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist: {fix}")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a prepared data directory (no {META_FILE}): {fix}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / META_FILE} ({e}): {fix}") from None
    train, val = read_tokens(path / SPLIT_FILES["train"]), read_tokens(path / SPLIT_FILES["val"])
    return Corpus(train, val, str(path), str(meta.get("text_sha256", "")))


class RandomWindowSampler:
    """Batches of random windows of seq_len + 1 tokens: inputs and next-token targets.

    Deterministic for a given seed; its position is its generator state (`state_dict`).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise UserError(
                f"the training data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                f"use more text or a smaller --seq-len"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
