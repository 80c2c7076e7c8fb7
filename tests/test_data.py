import json

import numpy as np
import pytest

from gpt2train.data import (
    HEADER, RandomWindowSampler, builtin_documents, corpus_sha256, load_corpus, prepare, read_tokens,
)
from gpt2train.errors import UserError
from gpt2train.tokenizer import EOT_ID, get_tokenizer


def test_prepare_writes_token_files_that_decode_to_the_input(tmp_path):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "b.txt").write_text("Second.")
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", val_fraction=0.5)
    train, val = read_tokens(tmp_path / "out/train.bin"), read_tokens(tmp_path / "out/val.bin")
    enc = get_tokenizer()
    assert enc.decode(list(train)) == "First document.<|endoftext|>"
    assert enc.decode(list(val)) == "Second.<|endoftext|>"
    on_disk = json.loads((tmp_path / "out/meta.json").read_text())
    assert on_disk == meta
    assert on_disk["splits"]["train"]["tokens"] == len(train)
    assert on_disk["tokenizer"] == "gpt2" and on_disk["vocab_size"] == 50257


def test_prepare_reads_directories_and_globs(tmp_path):
    (tmp_path / "docs/sub").mkdir(parents=True)
    for i in range(4):
        (tmp_path / f"docs/sub/{i}.txt").write_text(f"document number {i}")
    (tmp_path / "docs/skip.bin").write_bytes(b"\xff\xfe")
    meta = prepare([str(tmp_path / "docs")], tmp_path / "d1")
    assert meta["documents"] == 4
    meta = prepare([str(tmp_path / "docs/**/[01].txt")], tmp_path / "d2")
    assert meta["documents"] == 2


def test_single_document_is_split_by_tokens(tmp_path):
    (tmp_path / "one.txt").write_text("word " * 200)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", val_fraction=0.1)
    splits = meta["splits"]
    assert splits["val"]["tokens"] == int((splits["train"]["tokens"] + splits["val"]["tokens"]) * 0.1)


def test_prepare_rejects_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_builtin_corpus_is_split_by_document_and_hashed():
    docs = builtin_documents()
    assert len(docs) > 50 and sum(len(d.text) for d in docs) > 300_000
    corpus = load_corpus("")
    assert len(corpus.val) > 0.05 * (len(corpus.train) + len(corpus.val))
    assert corpus.train[-1] == EOT_ID
    assert len(corpus_sha256(docs)) == 64


def _token_file(tmp_path, ids):
    from gpt2train.data import write_tokens

    path = tmp_path / "t.bin"
    write_tokens(path, np.array(ids, dtype=np.uint16))
    return path


def test_token_file_round_trip(tmp_path):
    path = _token_file(tmp_path, [1, 2, 3, 50256])
    assert list(read_tokens(path)) == [1, 2, 3, 50256]
    assert path.stat().st_size == HEADER.size + 4 * 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"NOTOKENS" + b[8:], "bad magic"),
        (lambda b: b[:-2], "truncated"),
        (lambda b: b[:10], "too short"),
        (lambda b: b[:12] + (4).to_bytes(4, "little") + b[16:], "4-byte ids"),
        (lambda b: b[:-2] + (60000).to_bytes(2, "little"), "ids >="),
    ],
)
def test_damaged_token_files_are_rejected(tmp_path, damage, message):
    path = _token_file(tmp_path, [1, 2, 3, 4])
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        read_tokens(path)


def test_sampler_is_deterministic_for_a_seed_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = RandomWindowSampler(tokens, batch_size=4, seq_len=16, seed=7)
    b = RandomWindowSampler(tokens, batch_size=4, seq_len=16, seed=7)
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    assert xa.equal(xb) and ya.equal(yb)
    assert xa.shape == (4, 16) and ya[:, :-1].equal(xa[:, 1:])  # targets are inputs shifted by one
    state = a.state_dict()
    after = a.next_batch()[0]
    c = RandomWindowSampler(tokens, batch_size=4, seq_len=16, seed=99)
    c.load_state_dict(state)
    assert c.next_batch()[0].equal(after)
    assert not RandomWindowSampler(tokens, 4, 16, seed=8).next_batch()[0].equal(xa)


def test_sampler_covers_the_last_token():
    tokens = np.arange(10, dtype=np.uint16)
    sampler = RandomWindowSampler(tokens, batch_size=64, seq_len=9, seed=0)
    x, y = sampler.next_batch()
    assert x[0].tolist() == list(range(9)) and y[0].tolist() == list(range(1, 10))


def test_sampler_rejects_data_shorter_than_a_window():
    with pytest.raises(UserError, match="fewer than seq_len"):
        RandomWindowSampler(np.arange(16, dtype=np.uint16), batch_size=1, seq_len=16, seed=0)
