"""The corpus a run reads: a prepared directory's splits, or the built-in corpus tokenized in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import SPLITS, TokenSource, read_manifest, read_split
from .prepare import DEFAULT_VAL_FRACTION, MemorySink, default_workers, tokenize
from .sources import BUILTIN_NAME, builtin_source


@dataclass
class Corpus:
    train: TokenSource
    val: TokenSource
    source: str
    text_sha256: str  # identifies the text, so a resumed run can tell that its data changed


def load_corpus(data_dir: str = "") -> Corpus:
    """A prepared directory's splits by memory map, or the built-in corpus tokenized in memory."""
    if not data_dir:
        return tokenize_builtin()
    manifest = read_manifest(data_dir)
    train, val = (read_split(data_dir, manifest, split) for split in SPLITS)
    return Corpus(train, val, str(Path(data_dir)), str(manifest.get("text_sha256", "")))


def tokenize_builtin() -> Corpus:
    """The built-in corpus, split and tokenized in memory: what training uses when given no --data."""
    sinks = {split: MemorySink() for split in SPLITS}
    tokenized = tokenize([builtin_source()], sinks, DEFAULT_VAL_FRACTION, default_workers())
    train, val = (TokenSource([sinks[split].array()]) for split in SPLITS)
    return Corpus(train, val, BUILTIN_NAME, tokenized.text_sha256)
