"""Token shards, the manifest, the loader and the samplers."""

import json

import numpy as np
import pytest
import torch
from helpers import SMALL_TEXT, tiny_config

from gpt2train import prepare, train
from gpt2train.corpus import load_corpus
from gpt2train.data import HEADER, RandomWindowSampler, SequentialSampler, TokenSource, read_tokens, token_header
from gpt2train.errors import UserError
from gpt2train.tokenizer import EOT_ID, get_tokenizer
from gpt2train.training.prefetch import Prefetcher


def _token_file(tmp_path, ids):
    path = tmp_path / "t.bin"
    path.write_bytes(token_header(len(ids)) + np.array(ids, dtype="<u2").tobytes())
    return path


def test_token_file_round_trip(tmp_path):
    path = _token_file(tmp_path, [1, 2, 3, 50256])
    assert list(read_tokens(path)) == [1, 2, 3, 50256]
    assert path.stat().st_size == HEADER.size + 4 * 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"NOTOKENS" + b[8:], "bad magic"),
        (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "format version 2"),
        (lambda b: b[:12] + (4).to_bytes(4, "little") + b[16:], "4-byte ids"),
        (lambda b: b[:24] + (5).to_bytes(8, "little") + b[32:], "header promises"),
        (lambda b: b[:-2], "truncated"),
        (lambda b: b[:10], "too short"),
        (lambda b: b[:-2] + (60000).to_bytes(2, "little"), "ids >="),
    ],
)
def test_damaged_token_files_are_rejected(tmp_path, damage, message):
    path = _token_file(tmp_path, [1, 2, 3, 4])
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        read_tokens(path)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same text prepared into one shard per split and into shards of 7 tokens."""
    root = tmp_path_factory.mktemp("sharded")
    for i in range(6):
        (root / f"{i}.txt").write_text(f"Document {i}. " + SMALL_TEXT)
    one = prepare([str(root / "*.txt")], root / "one", val_fraction=0.3)
    many = prepare([str(root / "*.txt")], root / "many", val_fraction=0.3, shard_tokens=7)
    return root, one, many


def test_a_shard_set_reads_as_one_sequence(sharded):
    root, one, many = sharded
    assert len(one["splits"]["train"]["shards"]) == 1 and len(many["splits"]["train"]["shards"]) > 20
    assert all(shard["tokens"] <= 7 for shard in many["splits"]["train"]["shards"])
    whole, split = load_corpus(str(root / "one")), load_corpus(str(root / "many"))
    assert len(split.train) == len(whole.train) == one["splits"]["train"]["tokens"]
    expected = whole.train.read(0, len(whole.train))
    assert np.array_equal(split.train.read(0, len(split.train)), expected)
    for start in range(0, len(expected) - 20, 5):  # windows that straddle shard boundaries
        assert np.array_equal(split.train.read(start, 20), expected[start : start + 20])
    assert np.array_equal(split.val.read(0, len(split.val)), whole.val.read(0, len(whole.val)))
    assert split.text_sha256 == whole.text_sha256 == one["text_sha256"]
    head = split.train[:10]  # as training takes --train-tokens
    assert len(head) == 10 and np.array_equal(np.asarray(head), expected[:10])
    assert split.train[-1] == expected[-1] == EOT_ID and np.array_equal(split.train[30:45], expected[30:45])


def test_manifest_and_shards_are_checked_against_each_other(sharded, tmp_path):
    import shutil

    root, _, _ = sharded
    data = tmp_path / "data"
    shutil.copytree(root / "many", data)
    manifest = json.loads((data / "manifest.json").read_text())

    manifest["splits"]["train"]["shards"][0]["tokens"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lists"):
        load_corpus(str(data))

    manifest["splits"]["train"]["shards"][0]["file"] = "../elsewhere.bin"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="damaged or foreign"):
        load_corpus(str(data))

    (data / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="damaged or foreign"):
        load_corpus(str(data))

    (data / "manifest.json").unlink()
    (data / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="older gpt2train"):
        load_corpus(str(data))


def test_builtin_corpus_is_split_by_document_and_hashed(tmp_path):
    corpus = load_corpus("")
    assert len(corpus.val) > 0.05 * (len(corpus.train) + len(corpus.val))
    assert corpus.train[-1] == EOT_ID
    assert len(corpus.text_sha256) == 64
    # Preparing it gives the very same tokens as the in-memory default.
    prepare([], tmp_path / "builtin", shard_tokens=50_000)
    prepared = load_corpus(str(tmp_path / "builtin"))
    assert np.array_equal(prepared.train.read(0, len(prepared.train)), corpus.train.read(0, len(corpus.train)))
    assert prepared.text_sha256 == corpus.text_sha256


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


@pytest.mark.parametrize("sampler_class", [RandomWindowSampler, SequentialSampler])
def test_sampler_rejects_data_shorter_than_a_window(sampler_class):
    with pytest.raises(UserError, match="fewer than seq_len"):
        sampler_class(np.arange(16, dtype=np.uint16), batch_size=1, seq_len=16, seed=0)


def test_sequential_sampler_visits_every_token_once_per_epoch():
    seq_len, windows = 8, 25
    tokens = TokenSource([np.arange(100, dtype=np.uint16), np.arange(100, 201, dtype=np.uint16)])  # 2 shards
    assert len(tokens) == seq_len * windows + 1
    sampler = SequentialSampler(tokens, batch_size=3, seq_len=seq_len, seed=5)
    seen = []
    for _ in range(windows):  # 75 windows: three epochs, the batches running across their ends
        x, y = sampler.next_batch()
        assert y[:, :-1].equal(x[:, 1:]) and (y[:, -1] == x[:, -1] + 1).all()
        seen += x.tolist()
    epochs = [sorted(t for window in seen[e * windows : (e + 1) * windows] for t in window) for e in range(3)]
    assert all(epoch == list(range(200)) for epoch in epochs)
    starts = [[window[0] for window in seen[e * windows : (e + 1) * windows]] for e in range(3)]
    assert starts[0] != sorted(starts[0]) and starts[0] != starts[1]  # shuffled, anew each epoch


@pytest.mark.parametrize("sampler_class", [RandomWindowSampler, SequentialSampler])
def test_ranks_split_the_global_batch(sampler_class):
    tokens = np.arange(500, dtype=np.uint16)
    single = sampler_class(tokens, batch_size=8, seq_len=10, seed=3)
    ranks = [sampler_class(tokens, batch_size=4, seq_len=10, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        x, y = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.cat([p[0] for p in parts]).equal(x) and torch.cat([p[1] for p in parts]).equal(y)


@pytest.mark.parametrize("sampler_class", [RandomWindowSampler, SequentialSampler])
def test_sampler_state_survives_a_checkpoint_file(sampler_class, tmp_path):
    tokens = np.arange(300, dtype=np.uint16)
    sampler = sampler_class(tokens, batch_size=4, seq_len=16, seed=1)
    for _ in range(7):
        sampler.next_batch()
    torch.save({"sampler": sampler.state_dict()}, tmp_path / "state.pt")
    expected = [sampler.next_batch()[0] for _ in range(5)]
    restored = sampler_class(tokens, batch_size=4, seq_len=16, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["sampler"])
    assert all(restored.next_batch()[0].equal(x) for x in expected)


def test_prefetcher_gives_the_same_batches_and_the_callers_position():
    tokens = np.arange(400, dtype=np.uint16)
    plain = SequentialSampler(tokens, batch_size=2, seq_len=8, seed=0)
    ahead = Prefetcher(SequentialSampler(tokens, batch_size=2, seq_len=8, seed=0), depth=3, pin_memory=False)
    states, batches = [], []
    for _ in range(6):
        assert ahead.state_dict() == plain.state_dict()  # though its thread has made more batches by now
        states.append(plain.state_dict())
        x, _ = plain.next_batch()
        batches.append(x)
        assert ahead.next_batch()[0].equal(x)
    ahead.load_state_dict(states[2])  # rewind, as a resume does
    assert all(ahead.next_batch()[0].equal(x) for x in batches[2:])
    ahead.close()


def test_prefetcher_raises_the_samplers_error():
    class Broken:
        def next_batch(self):
            raise UserError("shard gone")

        def state_dict(self):
            return {}

    with pytest.raises(UserError, match="shard gone"):
        Prefetcher(Broken(), pin_memory=False).next_batch()


def test_sequential_sampling_resumes_on_the_exact_next_batch(tmp_path, small_corpus):
    def run(directory, **overrides):
        # A constant learning rate, so that stopping at step 4 of 4 trains exactly as steps 1-4 of 8 do;
        # short windows, so that the corpus holds several batches of them.
        config = tiny_config(directory, small_corpus, sampling="sequential", seq_len=8, target_loss=0.0,
                             warmup_steps=0, min_lr=1e-2, **overrides)
        return train(config, log=lambda _: None)

    whole = run(tmp_path / "whole", max_steps=8)
    run(tmp_path / "parts", max_steps=4)
    resumed = run(tmp_path / "parts", max_steps=8, resume="latest")
    assert resumed.losses == whole.losses[4:]


def test_prepared_text_decodes_back(sharded):
    root, _, _ = sharded
    corpus = load_corpus(str(root / "many"))
    enc = get_tokenizer()
    train, val = (enc.decode(split.read(0, len(split)).tolist()) for split in (corpus.train, corpus.val))
    assert train.startswith("Document 0. The quick brown fox")
    documents = (train + val).split("<|endoftext|>")
    assert sorted(documents[:-1]) == [f"Document {i}. " + SMALL_TEXT for i in range(6)] and documents[-1] == ""
