"""The built-in corpus: tokenized once, then read from the token cache, which is never trusted blindly."""

import subprocess
import sys

import numpy as np
import pytest

import gpt2train.corpus as corpus
from gpt2train.corpus import load_corpus
from gpt2train.runtime import cache_dir
from gpt2train.sources import Fragment, Source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2TRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def tokenize_calls(monkeypatch) -> list:
    calls, real = [], corpus.tokenize
    monkeypatch.setattr(corpus, "tokenize", lambda *a, **k: calls.append(None) or real(*a, **k))
    return calls


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a.train), np.asarray(b.train)) and np.array_equal(np.asarray(a.val), np.asarray(b.val))


def test_the_builtin_corpus_is_tokenized_once_and_then_read_from_the_cache(cache, monkeypatch):
    calls = tokenize_calls(monkeypatch)
    first = load_corpus()
    [file] = cache.iterdir()
    second = load_corpus()
    assert calls == [None]  # the second run read the cache
    assert same(first, second) and first.text_sha256 == second.text_sha256
    assert len(first.train) > 100_000 and cache_dir() == cache.parent


def test_another_text_or_tokenizer_gets_a_cache_file_of_its_own(cache, monkeypatch):
    calls = tokenize_calls(monkeypatch)
    original, tokenizer = load_corpus(), corpus.TOKENIZER_ID
    monkeypatch.setattr(corpus, "TOKENIZER_ID", "another tokenizer")
    load_corpus()
    monkeypatch.setattr(corpus, "TOKENIZER_ID", tokenizer)
    monkeypatch.setattr(corpus, "builtin_source", lambda: Source(None, lambda: iter([Fragment("Other words. " * 500, True)])))
    other = load_corpus()
    assert len(calls) == 3 and len(list(cache.iterdir())) == 3
    assert not same(original, other) and other.text_sha256 != original.text_sha256


def test_a_damaged_cache_file_is_tokenized_again_and_replaced(cache, monkeypatch):
    original = load_corpus()
    [file] = cache.iterdir()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    calls = tokenize_calls(monkeypatch)
    again = load_corpus()
    assert calls == [None] and same(original, again)
    calls.clear()
    assert same(original, load_corpus()) and calls == []  # the file was replaced with a good one
    file.write_bytes(b"")
    assert same(original, load_corpus())
    with np.load(file) as f:  # a well-formed file whose tokens changed after its checksum was taken
        arrays = {key: f[key] for key in f.files}
    arrays["train"][0] ^= 1
    with open(file, "wb") as f:
        np.savez(f, **arrays)
    calls.clear()
    assert same(original, load_corpus()) and calls == [None]


def test_runs_that_fill_the_cache_at_once_both_get_the_tokens(cache):
    script = ("from gpt2train.corpus import load_corpus; import numpy as np; c = load_corpus(); "
              "print(len(c.train), int(np.asarray(c.train).astype(np.int64).sum()), c.text_sha256)")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs) and len(set(outputs)) == 1
    assert len(list(cache.iterdir())) == 1  # one complete file, no temporary one left
    assert outputs[0].split()[2] == load_corpus().text_sha256
