from gpt2train import get_tokenizer
from gpt2train.tokenizer import EOT_ID


def test_gpt2_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_decode_inverts_encode():
    enc = get_tokenizer()
    text = "Ünïcode, émoji 🚀, code: def f(x): return x**2\n\n  tabs\tand spaces."
    assert enc.decode(enc.encode(text)) == text
