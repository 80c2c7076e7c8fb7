"""The corpus a run reads: a prepared directory's splits, or the built-in corpus, tokenized once and then
read from the token cache."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import SPLITS, TOKEN_DTYPE, TokenSource, read_manifest, read_split
from .files import WriteError, atomic_write
from .prepare import DEFAULT_VAL_FRACTION, MemorySink, default_workers, tokenize
from .runtime import CACHE_ENV, cache_dir
from .sources import BUILTIN_NAME, builtin_source
from .tokenizer import TOKENIZER_ID

TOKEN_CACHE_VERSION = 1  # of how the built-in corpus is split and tokenized: a change makes new cache files


@dataclass
class Corpus:
    train: TokenSource
    val: TokenSource
    source: str
    text_sha256: str  # identifies the text, so a resumed run can tell that its data changed
    note: str | None = None  # the token cache was damaged or could not be written: what happened


def load_corpus(data_dir: str = "") -> Corpus:
    """A prepared directory's splits by memory map, or the built-in corpus tokenized in memory."""
    if not data_dir:
        return tokenize_builtin()
    manifest = read_manifest(data_dir)
    train, val = (read_split(data_dir, manifest, split) for split in SPLITS)
    return Corpus(train, val, str(Path(data_dir)), str(manifest.get("text_sha256", "")))


def tokenize_builtin() -> Corpus:
    """The built-in corpus, split and tokenized: what training uses when given no --data.

    Tokenized once, then read from the token cache (`cache_dir()/tokens`) by every later run: the
    cache file is named by a hash of the corpus text, the tokenizer and this way of splitting it, so
    another Python's corpus or another tokenizer gets a file of its own; it is written atomically,
    and a file whose checksum does not match is tokenized again and replaced. The cache is an
    optimisation: one that is damaged or cannot be written is said in `Corpus.note`, once.
    """
    source = builtin_source()
    key = hashlib.sha256(f"{TOKEN_CACHE_VERSION}|{TOKENIZER_ID}|{DEFAULT_VAL_FRACTION}|".encode())
    for fragment in source.read():
        key.update(fragment.text.encode("utf-8", "surrogatepass") + b"\0")
    path = cache_dir() / "tokens" / f"builtin-{key.hexdigest()[:32]}.npz"
    cached, note = _read_cached(path)
    if cached is not None:
        train, val, text_sha256 = cached
    else:
        sinks = {split: MemorySink() for split in SPLITS}
        text_sha256 = tokenize([source], sinks, DEFAULT_VAL_FRACTION, default_workers()).text_sha256
        train, val = (sinks[split].array() for split in SPLITS)
        note = _write_cached(path, train, val, text_sha256) or note
    return Corpus(TokenSource([train]), TokenSource([val]), BUILTIN_NAME, text_sha256, note)


def _checksum(train: np.ndarray, val: np.ndarray, text_sha256: str) -> str:
    digest = hashlib.sha256(text_sha256.encode())
    for ids in (train, val):
        digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()


def _read_cached(path: Path) -> tuple[tuple[np.ndarray, np.ndarray, str] | None, str | None]:
    """A token cache file's splits and text hash, if the file is there and intact; else why not, if it
    is there (a missing file is the first run's, and says nothing)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            train, val, text_sha256, checksum = f["train"], f["val"], str(f["text_sha256"]), str(f["checksum"])
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable, cut short or damaged
        return None, f"token cache {path} was damaged or unreadable: the corpus was tokenized again"
    if train.dtype != TOKEN_DTYPE or val.dtype != TOKEN_DTYPE or checksum != _checksum(train, val, text_sha256):
        return None, f"token cache {path} did not match its checksum: the corpus was tokenized again"
    return (train, val, text_sha256), None


def _write_cached(path: Path, train: np.ndarray, val: np.ndarray, text_sha256: str) -> str | None:
    """Keep the tokens for the next run, if the cache can be written; a run never fails for want of it.
    Returns the line that says it could not be."""
    arrays = {"train": train, "val": val, "text_sha256": np.array(text_sha256),
              "checksum": np.array(_checksum(train, val, text_sha256))}
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except WriteError as e:
        return (f"token cache not used: {path} could not be written ({e.reason}); the next run tokenizes again "
                f"(set {CACHE_ENV} to a writable directory with room to keep the tokens)")
    return None
