"""Where documents come from: text, JSON-lines and Parquet files (plain, gzip or zstd), directories,
globs, URLs, Hugging Face datasets and the built-in corpus, each read as a stream of text fragments."""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import socket
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from .download import download
from .errors import UserError
from .optional import require

BUILTIN_NAME = "builtin:pydoc_data.topics"
DEFAULT_TEXT_FIELD = "text"
DEFAULT_HF_SPLIT = "train"
# What a directory is searched for when no --include is given.
DIRECTORY_INCLUDE = ("*.txt", "*.jsonl", "*.parquet", "*.txt.gz", "*.jsonl.gz", "*.txt.zst", "*.jsonl.zst")
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
READ_CHARS = 1 << 20  # text files are read this many characters at a time, however large they are
PARQUET_BATCH_ROWS = 1024
HUB_CONNECT_SECONDS = 5


@dataclass
class Fragment:
    """The next part of a document's text; `last` marks the end of the document."""

    text: str
    last: bool
    source_bytes: int = 0  # input bytes consumed since the previous fragment, for the ETA


@dataclass
class Source:
    size: int | None  # input bytes, for the ETA; None when unknown
    read: Callable[[], Iterator[Fragment]]


def resolve_sources(inputs: list[str], *, text_field: str = DEFAULT_TEXT_FIELD, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = (), hf_split: str = DEFAULT_HF_SPLIT, cache_dir: Path,
                    progress: bool = False) -> list[Source]:
    """Every input checked (and every URL downloaded) before anything is read; no inputs: the built-in corpus.

    An input is an http(s) URL, `hf:DATASET[:CONFIG]`, or a local file, directory or glob pattern.
    """
    if not inputs:
        return [builtin_source()]
    sources = []
    for item in inputs:
        if item.startswith(("http://", "https://")):
            sources.append(file_source(download(item, cache_dir, progress), text_field, name=item))
        elif item.startswith("hf:"):
            sources.append(hf_source(item, hf_split, text_field))
        else:
            sources.extend(file_source(path, text_field) for path in expand_path(item, include, exclude))
    return sources


def builtin_source() -> Source:
    """The Python documentation topics every CPython ships: ~465 KB of English, ~139K tokens."""
    from pydoc_data.topics import topics

    return Source(None, lambda: (Fragment(topics[key], True) for key in sorted(topics)))


def expand_path(item: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Path]:
    """A file as given, a glob's matching files, or a directory's files (recursively) that match an
    --include pattern and no --exclude pattern; sorted, so the order never depends on the file system."""
    if glob.has_magic(item):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
        if not matches:
            raise UserError(f"no files match '{item}': check the pattern")
        return [m for m in matches if m.is_file()]
    path = Path(item)
    if path.is_dir():
        patterns = include or DIRECTORY_INCLUDE
        found = sorted(p for p in path.rglob("*") if p.is_file() and _matches(p, path, patterns)
                       and not _matches(p, path, exclude))
        if not found:
            raise UserError(f"directory {item} holds no files matching {', '.join(patterns)}"
                            f"{' that --exclude leaves' if exclude else ''}: point at text files or change --include")
        return found
    if path.is_file():
        return [path]
    raise UserError(f"input {item} does not exist: give files, directories, globs, URLs or hf:DATASET")


def _matches(path: Path, root: Path, patterns: tuple[str, ...]) -> bool:
    """A pattern with a / is matched against the path below `root`, one without against the file name."""
    relative = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatchcase(relative if "/" in p else path.name, p) for p in patterns)


def file_source(path: Path, text_field: str = DEFAULT_TEXT_FIELD, name: str | None = None) -> Source:
    """A local file, read by its suffixes: .gz/.zst are decompressed, then .jsonl/.json/.ndjson are JSON
    lines (one document per line, its text under `text_field`), .parquet is a Parquet table (one
    document per row), and anything else is UTF-8 text (one document per file)."""
    name = name or str(path)
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in (".gz", ".zst") else None
    kind = suffixes[-1] if suffixes else ""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror}") from None
    if kind == ".parquet" and not compression:
        require("pyarrow.parquet", "reading Parquet files", "parquet")
        return Source(size, lambda: _read_parquet(path, name, size, text_field))
    if compression == ".zst":
        require("zstandard", "reading zstd-compressed files", "zstd")
    if kind in JSON_LINES_SUFFIXES:
        return Source(size, lambda: _read_json_lines(path, name, compression, text_field))
    return Source(size, lambda: _read_text(path, name, compression))


class _Reading:
    """An input file opened for reading, decompressed if need be, with every failure one UserError line."""

    def __init__(self, path: Path, name: str, compression: str | None):
        self.name = name
        self.compression = compression
        try:
            self.raw = path.open("rb")
        except OSError as e:
            raise UserError(f"cannot read {name}: {e.strerror}") from None
        self.counted = 0
        self.stream: BinaryIO = self.raw
        self.damage: tuple[type[BaseException], ...] = ()  # what a damaged compressed file raises
        if compression == ".gz":
            self.stream = gzip.GzipFile(fileobj=self.raw)
            self.damage = (OSError, EOFError, zlib.error)
        elif compression == ".zst":
            zstandard = require("zstandard", "reading zstd-compressed files", "zstd")
            self.stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(self.raw, read_across_frames=True))
            self.damage = (OSError, zstandard.ZstdError)

    def consumed(self) -> int:
        """Input bytes read since the last call."""
        position = self.raw.tell()
        new, self.counted = position - self.counted, position
        return new

    def __enter__(self) -> _Reading:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.stream.close()
        self.raw.close()
        if error is None or isinstance(error, (UserError, GeneratorExit)):
            return
        if isinstance(error, UnicodeDecodeError):
            raise UserError(f"{self.name} is not UTF-8 text: convert it or leave it out") from None
        if isinstance(error, self.damage):
            raise UserError(f"{self.name} is not a valid {self.compression[1:]} file ({error}): "
                            f"re-download it or leave it out") from None
        if isinstance(error, OSError):
            raise UserError(f"cannot read {self.name}: {error.strerror or error}") from None


def _read_text(path: Path, name: str, compression: str | None) -> Iterator[Fragment]:
    with _Reading(path, name, compression) as reading:
        text = io.TextIOWrapper(reading.stream, encoding="utf-8")
        while chunk := text.read(READ_CHARS):
            yield Fragment(chunk, False, reading.consumed())
        yield Fragment("", True, reading.consumed())


def _read_json_lines(path: Path, name: str, compression: str | None, text_field: str) -> Iterator[Fragment]:
    with _Reading(path, name, compression) as reading:
        for number, line in enumerate(reading.stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{name} line {number} is not valid JSON ({e}): each line must be one JSON object") from None
            yield Fragment(_text_of(record, text_field, f"{name} line {number}"), True, reading.consumed())


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where} has no '{text_field}' field: name the field that holds the text with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: '{text_field}' is {type(text).__name__}, not text: choose another --text-field")
    return text


def _read_parquet(path: Path, name: str, size: int, text_field: str) -> Iterator[Fragment]:
    parquet = require("pyarrow.parquet", "reading Parquet files", "parquet")
    try:
        table = parquet.ParquetFile(path)
    except Exception as e:  # pyarrow reports damage as its own ArrowInvalid and as OSError
        raise UserError(f"{name} is not a readable Parquet file ({e}): re-create it or leave it out") from None
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{name} has no column '{text_field}' (it has {', '.join(columns)}): "
                        f"name the text column with --text-field")
    rows, done = max(table.metadata.num_rows, 1), 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        texts = batch.column(0).to_pylist()
        batch_bytes = size * len(texts) // rows  # the file's bytes, shared out by rows: only for the ETA
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"{name} row {done + i + 1}: '{text_field}' is {type(text).__name__}, not text: "
                                f"choose another --text-field")
            yield Fragment(text, True, batch_bytes if i == len(texts) - 1 else 0)
        done += len(texts)


def hf_source(spec: str, split: str = DEFAULT_HF_SPLIT, text_field: str = DEFAULT_TEXT_FIELD) -> Source:
    """`hf:NAME[:CONFIG]` streamed through the datasets library: a dataset on the Hugging Face Hub, or a
    local dataset directory (which needs no network)."""
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise UserError(f"'{spec}' names no dataset: write hf:NAME or hf:NAME:CONFIG")
    datasets = require("datasets", "reading Hugging Face datasets", "datasets")
    if not Path(name).exists():
        _check_hub_reachable(spec)
    try:
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the datasets library reports a missing dataset, config or split in many types
        raise UserError(f"cannot load {spec} (split '{split}'): {_first_line(e)}") from None

    def read() -> Iterator[Fragment]:
        rows, number = iter(dataset), 0
        while True:
            number += 1
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # a dropped connection or a damaged file, in whatever type the library raises
                raise UserError(f"reading {spec} failed at row {number} ({_first_line(e)}): run again") from None
            yield Fragment(_text_of(row, text_field, f"{spec} row {number}"), True)

    return Source(None, read)


def _check_hub_reachable(spec: str) -> None:
    """Fail in seconds, not after the datasets library's retries, when the Hub cannot be reached."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            raise UserError(f"{spec} is streamed from the Hugging Face Hub, but {variable} is set: unset it, or "
                            f"give a local dataset directory as hf:DIR")
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_SECONDS).close()
    except OSError as e:
        raise UserError(f"cannot reach {host}:{port} to stream {spec} ({e.strerror or e}): check the network, or "
                        f"download the dataset and give its directory as hf:DIR") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
