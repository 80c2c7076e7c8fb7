"""`prepare`: every kind of input, the split, identical bytes on a re-run, and what it leaves on disk."""

import gzip
import hashlib
import importlib
import json
import socket

import numpy as np
import pytest
from helpers import run_cli, server, snapshot  # noqa: F401 - server is a fixture

from gpt2train import prepare
from gpt2train.corpus import load_corpus
from gpt2train.download import cached_path
from gpt2train.errors import UserError
from gpt2train.tokenizer import EOT_ID, get_tokenizer

DOCS = [
    "First document: the quick brown fox jumps over the lazy dog.",
    "Second, with ünïcödé, digits 12345 and <|endoftext|> spelled out in the text.",
    "Third.\n\nIt has paragraphs,   runs of spaces\tand a tab.\n",
]


def tokens_of(data_dir) -> tuple[list[int], list[int]]:
    corpus = load_corpus(str(data_dir))
    return corpus.train.read(0, len(corpus.train)).tolist(), corpus.val.read(0, len(corpus.val)).tolist()


def expected_tokens(docs=DOCS) -> list[int]:
    enc = get_tokenizer()
    return [t for doc in docs for t in [*enc.encode_ordinary(doc), EOT_ID]]


def write_jsonl(path, docs=DOCS, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": len(doc), field: doc}) + "\n")
    return path


def zstd_open(path, mode, encoding):
    import zstandard

    return zstandard.open(path, mode, encoding=encoding)


def write_parquet(path, docs=DOCS):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=2)
    return path


def test_prepare_writes_shards_that_decode_to_the_input(tmp_path):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "b.txt").write_text("Second.")
    manifest = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", val_fraction=0.5)
    train, val = tokens_of(tmp_path / "out")
    enc = get_tokenizer()
    assert enc.decode(train) == "First document.<|endoftext|>"
    assert enc.decode(val) == "Second.<|endoftext|>"
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest
    assert manifest["tokenizer"] == "gpt2" and manifest["vocab_size"] == 50257 and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 1
    for split in ("train", "val"):
        shard = manifest["splits"][split]["shards"][0]
        assert hashlib.sha256((tmp_path / "out" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "train_000000.bin", "val_000000.bin"]


def test_every_kind_of_file_gives_the_same_tokens(tmp_path):
    """Three documents as text files, compressed text files, JSON lines (plain, gzip, zstd) and Parquet."""
    pytest.importorskip("zstandard")
    pytest.importorskip("pyarrow")
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc)
    (tmp_path / "compressed").mkdir()
    with gzip.open(tmp_path / "compressed/0.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[0])
    with zstd_open(tmp_path / "compressed/1.txt.zst", "wt", encoding="utf-8") as f:
        f.write(DOCS[1])
    (tmp_path / "compressed/2.txt").write_text(DOCS[2])
    inputs = {
        "txt": tmp_path / "txt",
        "compressed": tmp_path / "compressed",
        "jsonl": write_jsonl(tmp_path / "d.jsonl"),
        "jsonl.gz": write_jsonl(tmp_path / "d.jsonl.gz", opener=gzip.open),
        "jsonl.zst": write_jsonl(tmp_path / "d.jsonl.zst", opener=zstd_open),
        "parquet": write_parquet(tmp_path / "d.parquet"),
    }
    results = {}
    for kind, path in inputs.items():
        manifest = prepare([str(path)], tmp_path / f"out-{kind}", val_fraction=0.3)
        results[kind] = (tokens_of(tmp_path / f"out-{kind}"), manifest["text_sha256"], manifest["documents"])
    (train, val), _, documents = results["txt"]
    assert train + val == expected_tokens() and documents == 3 and val
    assert all(result == results["txt"] for result in results.values())


def test_directories_are_searched_recursively_with_include_and_exclude(tmp_path):
    (tmp_path / "docs/sub/deeper").mkdir(parents=True)
    for i in range(4):
        (tmp_path / f"docs/sub/{i}.txt").write_text(f"document number {i}")
    (tmp_path / "docs/sub/deeper/notes.md").write_text("markdown notes")
    (tmp_path / "docs/skip.bin").write_bytes(b"\xff\xfe")
    assert prepare([str(tmp_path / "docs")], tmp_path / "d1")["documents"] == 4
    assert prepare([str(tmp_path / "docs")], tmp_path / "d2", include=["*.txt", "*.md"],
                   exclude=["sub/3.txt"])["documents"] == 4
    assert prepare([str(tmp_path / "docs/**/[01].txt")], tmp_path / "d3")["documents"] == 2
    with pytest.raises(UserError, match="holds no files matching"):
        prepare([str(tmp_path / "docs")], tmp_path / "d4", exclude=["*.txt"])


def test_json_lines_name_their_text_field(tmp_path):
    pytest.importorskip("pyarrow")  # the Parquet file at the end
    write_jsonl(tmp_path / "d.jsonl", field="content")
    prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", text_field="content", val_fraction=0)
    assert tokens_of(tmp_path / "out")[0] == expected_tokens()
    with pytest.raises(UserError, match="line 1 has no 'text' field"):
        prepare([str(tmp_path / "d.jsonl")], tmp_path / "other")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "other")
    with pytest.raises(UserError, match="no column 'body'"):
        prepare([str(write_parquet(tmp_path / "d.parquet"))], tmp_path / "other", text_field="body")
    assert not (tmp_path / "other").exists()


def test_single_document_is_split_by_tokens(tmp_path):
    (tmp_path / "one.txt").write_text("word " * 200)
    splits = prepare([str(tmp_path / "one.txt")], tmp_path / "out", val_fraction=0.1)["splits"]
    assert splits["val"]["tokens"] == int((splits["train"]["tokens"] + splits["val"]["tokens"]) * 0.1)
    train, val = tokens_of(tmp_path / "out")
    assert train + val == expected_tokens(["word " * 200])


def test_prepare_rejects_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_long_documents_are_tokenized_in_pieces_exactly_as_whole(tmp_path, monkeypatch):
    from gpt2train import sources

    pipeline = importlib.import_module("gpt2train.prepare")  # the module, not the function of that name
    # Words between runs of whitespace of every kind: cut in the wrong place, such runs tokenize differently.
    rng = np.random.default_rng(0)
    gaps = [" ", " ", "  ", "\n", "\n\n", " \n", "\t", "   ", ". ", "\n    "]
    text = "".join(f"{word}{gaps[g]}" for word, g in zip(rng.choice(["alpha", "béta", "42", "(x)", "don't"], 5000),
                                                        rng.integers(0, len(gaps), 5000)))
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 300)
    monkeypatch.setattr(pipeline, "BATCH_CHARS", 1000)
    monkeypatch.setattr(sources, "READ_CHARS", 100)
    (tmp_path / "long.txt").write_text(text)
    pieces = list(pipeline.pieces(sources.file_source(tmp_path / "long.txt").read()))
    assert len(pieces) > len(text) // 400 and "".join(p.text for p in pieces) == text
    prepare([str(tmp_path / "long.txt")], tmp_path / "out", val_fraction=0, workers=2)
    assert tokens_of(tmp_path / "out")[0] == expected_tokens([text])


def test_a_rerun_writes_identical_bytes_whatever_the_workers(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text(f"Document {i}. " * (i + 1) + DOCS[i % 3])
    inputs = [str(tmp_path / "*.txt"), str(write_jsonl(tmp_path / "more.jsonl"))]
    prepare(inputs, tmp_path / "a", workers=1, shard_tokens=40)
    prepare(inputs, tmp_path / "b", workers=2, shard_tokens=40)
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert len(files) > 5 and files == {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}


def test_prepared_data_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "big.txt").write_text("many words here " * 100)
    (tmp_path / "small.txt").write_text("few words")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    prepare([str(tmp_path / "big.txt")], out, shard_tokens=50)
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds prepared data.*--overwrite"):
        prepare([str(tmp_path / "small.txt")], out)
    # A failure half-way, even with --overwrite, leaves the data set that was there.
    with pytest.raises(UserError, match="not UTF-8"):
        prepare([str(tmp_path / "small.txt"), str(tmp_path / "latin1.txt")], out, shard_tokens=2, overwrite=True)
    assert snapshot(out) == before
    prepare([str(tmp_path / "small.txt")], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    assert get_tokenizer().decode(sum(tokens_of(out), [])) == "few words<|endoftext|>"


def test_an_interrupted_prepare_leaves_no_shard_and_is_restarted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train_000000.bin.partial").write_bytes(b"half a shard")  # what a killed prepare leaves
    (tmp_path / "a.txt").write_text("some text")
    prepare([str(tmp_path / "a.txt")], out)
    assert not list(out.glob(".*")) and load_corpus(str(out)).train


def serve_docs(server, tmp_path) -> tuple[str, bytes]:
    body = write_jsonl(tmp_path / "served.jsonl.gz", opener=gzip.open).read_bytes()
    server.files["/corpus/docs.jsonl.gz"] = body
    return f"http://127.0.0.1:{server.server_port}/corpus/docs.jsonl.gz", body


def test_a_url_is_downloaded_verified_and_cached(server, tmp_path):
    url, body = serve_docs(server, tmp_path)
    checked = f"{url}#sha256={hashlib.sha256(body).hexdigest()}"
    manifest = prepare([checked], tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out")[0] == expected_tokens() and manifest["sources"] == [checked]
    assert cached_path(url, tmp_path / "out/downloads").read_bytes() == body
    prepare([checked], tmp_path / "out", val_fraction=0, overwrite=True)
    assert len(server.requests) == 1  # the second run used the cached copy


def test_a_download_resumes_from_its_partial_file(server, tmp_path):
    url, body = serve_docs(server, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    partial = cached_path(url, cache).with_name(cached_path(url, cache).name + ".partial")
    partial.write_bytes(body[:20])  # an earlier attempt broke off here
    prepare([url], tmp_path / "out", val_fraction=0, cache_dir=cache)
    assert server.requests == [("/corpus/docs.jsonl.gz", "bytes=20-")]
    assert tokens_of(tmp_path / "out")[0] == expected_tokens() and not partial.exists()


def test_a_download_with_the_wrong_checksum_is_refused(server, tmp_path):
    url, _ = serve_docs(server, tmp_path)
    with pytest.raises(UserError, match="SHA-256 .* not the 0000"):
        prepare([f"{url}#sha256={'0' * 64}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed prepare leaves nothing behind, not even downloads/
    with pytest.raises(UserError, match="HTTP 404"):
        prepare([f"http://127.0.0.1:{server.server_port}/missing.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_local_dataset_directory_is_read_through_the_datasets_library(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (tmp_path / "dataset").mkdir()
    write_jsonl(tmp_path / "dataset" / "train.jsonl")
    prepare([f"hf:{tmp_path / 'dataset'}"], tmp_path / "out", val_fraction=0, hf_split="train")
    assert tokens_of(tmp_path / "out")[0] == expected_tokens()


def test_a_hub_dataset_fails_fast_and_clearly_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # hf: sources need it before they look at the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        prepare(["hf:someone/some-dataset"], tmp_path / "out")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=f"cannot reach 127.0.0.1:{port}"):
        prepare(["hf:someone/some-dataset"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_shows_documents_tokens_speed_and_eta(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(DOCS[0])
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", progress=True)
    line = capsys.readouterr().err
    assert "1 docs" in line and "M tokens" in line and "MB/s" in line and "ETA" in line


def test_prepare_command_on_a_directory_and_on_json_lines(tmp_path):
    (tmp_path / "notes").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "notes" / f"{i}.txt").write_text(doc)
    result = run_cli("prepare", tmp_path / "notes", "--out", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert "Prepared 3 documents" in result.stdout and result.stderr == ""  # no progress line off a terminal
    write_jsonl(tmp_path / "docs.jsonl", field="content")
    result = run_cli("prepare", tmp_path / "docs.jsonl", "--text-field", "content", "--workers", "1",
                     "--shard-tokens", "10", "--val-fraction", "0.3", "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert sum(tokens_of(tmp_path / "a"), []) == sum(tokens_of(tmp_path / "b"), []) == expected_tokens()
    assert len(json.loads((tmp_path / "b/manifest.json").read_text())["splits"]["train"]["shards"]) > 1
