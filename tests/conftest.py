import pytest

from gpt2train.config import resolve_config

# A paragraph of real English: enough distinct tokens to be a corpus, small enough to memorise.
SMALL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. To be or not to be, that is the question. All that glitters is not gold. "
    "The early bird catches the worm, but the second mouse gets the cheese.\n"
)


@pytest.fixture
def small_corpus(tmp_path):
    """A prepared data directory holding a few hundred tokens of text."""
    from gpt2train.data import prepare

    text_file = tmp_path / "corpus.txt"
    text_file.write_text(SMALL_TEXT * 3)
    prepare([str(text_file)], tmp_path / "data")
    return tmp_path / "data"


def tiny_config(tmp_path, data_dir, **overrides):
    """A model small enough that a test trains it in seconds on a CPU."""
    values = dict(
        n_layer=1, n_head=2, n_embd=32, block_size=32, seq_len=32, batch_size=4,
        lr=1e-2, min_lr=1e-3, warmup_steps=5, max_steps=300, target_loss=1.0,
        log_interval=10, device="cpu", data=str(data_dir), out_dir=str(tmp_path / "out"),
    )
    values.update(overrides)
    return resolve_config(overrides=values)
