"""HellaSwag: its validation set (downloaded once into the cache and verified, or a local copy) and a
model's accuracy on it, as lm-evaluation-harness scores it and as build-nanogpt and llm.c do."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .download import cached_path, download
from .errors import UserError
from .model import GPT
from .runtime import cache_dir
from .scoring import Request, loglikelihoods
from .tokenizer import get_tokenizer

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The file's Git object id in the HellaSwag authors' repository: what that repository itself checks.
GIT_BLOB_ID = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
ITEMS = 10042
ENDINGS = 4
FIELDS = {"activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, "endings": list}


@dataclass(frozen=True)
class Source:
    """Where the validation set comes from, and the Git object id it must have."""

    url: str = URL
    git_blob_id: str = GIT_BLOB_ID


SOURCE = Source()


@dataclass(frozen=True)
class Item:
    activity_label: str
    ctx_a: str
    ctx_b: str
    ctx: str
    endings: tuple[str, ...]
    label: int  # the index of the true ending


@dataclass
class Counts:
    """Items scored and how many each way of scoring got right: what ranks add up."""

    items: int = 0
    acc: int = 0
    acc_norm: int = 0
    acc_norm_completion: int | None = 0  # None: not scored

    def as_tuple(self) -> tuple[int, ...]:
        return self.items, self.acc, self.acc_norm, self.acc_norm_completion or 0

    def accuracies(self) -> dict[str, float]:
        n = max(self.items, 1)
        figures = {"acc": self.acc, "acc_norm": self.acc_norm, "acc_norm_completion": self.acc_norm_completion}
        return {name: count / n for name, count in figures.items() if count is not None}


def git_blob_id(data: bytes) -> str:
    """The id Git gives a file of these bytes (SHA-1 of a short header and the bytes)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def dataset_path(data: str | Path = "", cache: Path | None = None, progress: bool = False) -> Path:
    """The validation set to read: `data` if given, else the cached copy, downloaded and verified on first use."""
    if data:
        path = Path(data)
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} is not a file: pass the path of a copy of {Path(URL).name}")
        return path
    folder = (cache or cache_dir()) / "hellaswag"

    def verify(path: Path) -> None:
        actual = git_blob_id(path.read_bytes())
        if actual != SOURCE.git_blob_id:
            raise UserError(f"{SOURCE.url} has Git object id {actual}, not {SOURCE.git_blob_id}: it was not kept; "
                            f"download the file yourself and pass it with --data FILE")

    cached = cached_path(SOURCE.url, folder)
    if cached.exists():
        try:
            verify(cached)  # at each use: the disk may have damaged it since it was downloaded
            return cached
        except UserError:
            cached.unlink()
            print(f"hellaswag: the cached copy {cached} was damaged: it was deleted and is fetched again",
                  file=sys.stderr)
    try:
        return download(SOURCE.url, folder, progress, verify)
    except UserError as e:
        raise UserError(f"HellaSwag's validation set is not in {folder} and could not be fetched ({e}); on a "
                        f"machine with a network, download {SOURCE.url} and pass it with --data FILE") from None


def read_items(path: str | Path, limit: int = 0) -> list[Item]:
    """The items of a HellaSwag JSONL file (the first `limit`, if not 0), every line checked."""
    path = Path(path)
    items = []
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if limit and len(items) == limit:
                    break
                if line.strip():
                    items.append(_item(line, f"{path} line {number}"))
    except OSError as e:
        raise UserError(f"cannot read HellaSwag file {path}: {e.strerror}") from None
    if not items:
        raise UserError(f"{path} holds no HellaSwag items: is it the right file?")
    return items


def _item(line: bytes, where: str) -> Item:
    try:
        doc = json.loads(line)
    except ValueError as e:  # UnicodeDecodeError is one
        raise UserError(f"{where} is not a JSON object ({e}): is this a HellaSwag file?") from None
    if not isinstance(doc, dict):
        raise UserError(f"{where} is not a JSON object: is this a HellaSwag file?")
    for key, kind in FIELDS.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise UserError(f"{where}: '{key}' is missing or not a {kind.__name__}: is this a HellaSwag file?")
    label = doc.get("label")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy of the data set writes "3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise UserError(f"{where}: 'label' is missing or not a whole number: is this a HellaSwag file?")
    endings = doc["endings"]
    if len(endings) != ENDINGS or not all(isinstance(e, str) and e for e in endings):
        raise UserError(f"{where}: an item needs {ENDINGS} non-empty endings, this one has {len(endings)}")
    if not 0 <= label < ENDINGS:
        raise UserError(f"{where}: label {label} is not the index of one of the {ENDINGS} endings (0 to 3)")
    return Item(doc["activity_label"], doc["ctx_a"], doc["ctx_b"], doc["ctx"], tuple(endings), label)


def _preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up of HellaSwag text: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def harness_query(item: Item) -> str:
    return _preprocess(item.activity_label + ": " + item.ctx_a + " " + item.ctx_b.capitalize())


def harness_choices(item: Item) -> list[str]:
    return [_preprocess(ending) for ending in item.endings]


def _harness_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> Request:
    """lm-evaluation-harness's split of a context and its continuation into tokens: the whole text
    encoded at once, the continuation being what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # trailing spaces belong to the continuation, as they do in GPT-2's tokens
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return Request(tuple(head), tuple(whole[len(head):]))


def requests(items: Sequence[Item], completion: bool = True) -> list[Request]:
    """Per item, its 4 endings as the harness asks for them, then (with `completion`) its 4 endings as
    build-nanogpt does (the raw context, then " " + ending, encoded apart)."""
    return [request for item in items for request in _item_requests(item, completion)]


@functools.lru_cache(maxsize=None)
def _item_requests(item: Item, completion: bool) -> tuple[Request, ...]:
    """One item's requests, tokenized once per process: a run that scores the same items at every
    evaluation does not encode them again (3 s for the whole validation set on a CPU core)."""
    encode = get_tokenizer().encode_ordinary
    query = harness_query(item)
    out = [_harness_pair(encode, query, " " + choice) for choice in harness_choices(item)]
    if completion:
        context = tuple(encode(item.ctx))
        out += [Request(context, tuple(encode(" " + ending))) for ending in item.endings]
    return tuple(out)


def score(
    model: GPT, items: Sequence[Item], device: torch.device, dtype: torch.dtype = torch.float32,
    batch_tokens: int = 0, progress: Callable[[int, int], None] | None = None, completion: bool = True,
) -> Counts:
    """How many items the model gets right, three ways:
    - acc: the ending with the highest log-likelihood (lm-evaluation-harness);
    - acc_norm: the highest log-likelihood per character of the ending (lm-evaluation-harness);
    - acc_norm_completion: the lowest mean loss per token of the ending (build-nanogpt, llm.c), unless
      `completion` is False (half the work: the harness's two figures alone).
    `progress(done, total)` counts items."""
    per_item = 2 * ENDINGS if completion else ENDINGS
    asked = requests(items, completion)
    report = None if progress is None else lambda done, total: progress(done // per_item, len(items))
    scores = [s.logprob for s in loglikelihoods(model, asked, device, dtype, batch_tokens, report)]
    counts = Counts(items=len(items), acc_norm_completion=0 if completion else None)
    for i, item in enumerate(items):
        first = i * per_item
        harness = scores[first : first + ENDINGS]
        lengths = [len(choice) for choice in harness_choices(item)]
        counts.acc += _argmax(harness) == item.label
        counts.acc_norm += _argmax([s / n for s, n in zip(harness, lengths)]) == item.label
        if completion:
            tokens = [len(r.continuation) for r in asked[first + ENDINGS : first + per_item]]
            per_token = [s / n for s, n in zip(scores[first + ENDINGS : first + per_item], tokens)]
            counts.acc_norm_completion += _argmax(per_token) == item.label
    return counts


def _argmax(values: list[float]) -> int:
    """The first index of the largest value, as numpy.argmax picks it."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
