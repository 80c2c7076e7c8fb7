"""Hugging Face interchange: gpt2train models to transformers' GPT-2 directories and back, offline."""

import json
import os
import sys

# Never reach the Hub: every model here is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

# Every test here builds or loads transformers' GPT-2 (pip install 'gpt2train[hf]'); transformers itself
# requires safetensors, which writing an export needs.
pytest.importorskip("transformers")
from helpers import cli, run_cli, snapshot
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from gpt2train import GPT, GPTConfig, generate, get_tokenizer, load_model, train
from gpt2train.config import resolve_config
from gpt2train.corpus import load_corpus
from gpt2train.data import RandomWindowSampler
from gpt2train.errors import UserError
from gpt2train.final_model import save_final_model
from gpt2train.hf import export_hf, read_hf_model
from gpt2train.tokenizer import EOT_ID, GPT2_VOCAB_SIZE
from gpt2train.training.resume import resume_changes

PROMPT = [464, 2068, 7586, 21831]  # "The quick brown fox"


def tiny_hf_model() -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 built by transformers, every parameter random (biases and LayerNorms too)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tiny_gpt(**config) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def load_export(directory) -> GPT2LMHeadModel:
    """transformers' model from an exported directory, which must supply every weight it expects."""
    hf, info = GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert {k: list(v) for k, v in info.items()} == {k: [] for k in info}
    return hf.eval()


def save_openai_layout(model: GPT2LMHeadModel, directory) -> None:
    """pytorch_model.bin as OpenAI's gpt2 repository stores it: no `transformer.` prefix, no output head,
    and the causal-mask buffers older transformers versions saved."""
    model.config.save_pretrained(directory)
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, directory / "pytorch_model.bin")


def save_bin_with_head(model: GPT2LMHeadModel, directory) -> None:
    """pytorch_model.bin with the `transformer.` prefix and lm_head.weight stored as well."""
    model.config.save_pretrained(directory)
    torch.save(dict(model.state_dict()), directory / "pytorch_model.bin")


LAYOUTS = {
    "save_pretrained": lambda model, directory: model.save_pretrained(directory),
    "openai_bin": save_openai_layout,
    "bin_with_head": save_bin_with_head,
}


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(directory)
    return directory


# Hugging Face to gpt2train


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_model_reads_a_transformers_directory_with_the_same_logits(hf_model, tmp_path, layout):
    LAYOUTS[layout](hf_model, tmp_path)
    model = load_model(tmp_path)
    assert model.config.vocab_size == 50257 and model.config.block_size == 64
    x = torch.randint(0, 50257, (2, 40))
    torch.testing.assert_close(logits(model, x), logits(hf_model, x), rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_transformers(hf_model, hf_dir):
    ours = list(generate(load_model(hf_dir), PROMPT, max_new_tokens=24, temperature=0))
    theirs = hf_model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=24, pad_token_id=EOT_ID)
    assert len(ours) == 24
    assert ours == theirs[0, len(PROMPT):].tolist()


# gpt2train to Hugging Face


@pytest.mark.parametrize("trim_vocab", [False, True])
def test_transformers_loads_an_export_with_no_missing_weights_and_the_same_logits(tmp_path, trim_vocab):
    model = tiny_gpt()
    export_hf(model, tmp_path / "hf", trim_vocab=trim_vocab)
    hf = load_export(tmp_path / "hf")
    assert hf.config.vocab_size == (GPT2_VOCAB_SIZE if trim_vocab else 50304)
    assert hf.dtype == torch.float32
    x = torch.randint(0, 50257, (2, 40))
    expected = logits(model, x)
    if trim_vocab:  # the real tokens' logits are unchanged; only the padded slots are gone
        expected = expected[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(logits(hf, x), expected, rtol=1e-5, atol=1e-5)


def test_a_model_without_biases_exports_zero_biases(tmp_path):
    model = tiny_gpt(bias=False)
    export_hf(model, tmp_path / "hf")
    hf = load_export(tmp_path / "hf")
    assert torch.count_nonzero(hf.transformer.h[0].mlp.c_fc.bias) == 0
    x = torch.randint(0, 50257, (1, 30))
    torch.testing.assert_close(logits(hf, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_transformers_never_generates_a_padded_vocabulary_slot(tmp_path):
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[GPT2_VOCAB_SIZE:] *= 50  # make the padded rows the likeliest
    assert int(logits(model, torch.tensor([PROMPT]))[0, -1].argmax()) >= GPT2_VOCAB_SIZE
    export_hf(model, tmp_path / "hf")
    hf = load_export(tmp_path / "hf")
    theirs = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12, pad_token_id=EOT_ID)
    ours = list(generate(model, PROMPT, max_new_tokens=12, temperature=0, stop_at_eot=False))
    assert theirs[0, len(PROMPT):].tolist()[: len(ours)] == ours


def test_round_trips_keep_every_weight(hf_model, hf_dir, tmp_path):
    # transformers -> gpt2train -> transformers
    export_hf(load_model(hf_dir), tmp_path / "back")
    again = load_export(tmp_path / "back")
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # gpt2train -> transformers -> gpt2train
    model = tiny_gpt()
    export_hf(model, tmp_path / "there")
    for name, tensor in load_model(tmp_path / "there").state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_the_exported_tokenizer_gives_gpt2train_ids_offline(tmp_path):
    export_hf(tiny_gpt(), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = get_tokenizer()
    for text in ["Hello world", " leading space", "Ünïcode, émoji 🚀\n\n  tabs\tand spaces.",
                 "def f(x):\n    return x**2  # it's", "spaces before punctuation , like this . don 't",
                 "one<|endoftext|>two"]:
        ids = enc.encode(text, allowed_special="all")
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == EOT_ID and len(theirs) == GPT2_VOCAB_SIZE


def test_export_command_end_to_end(tmp_path):
    model = tiny_gpt()
    save_final_model(model, tmp_path / "final_model.pt", step=1, best_loss=1.0)
    result = run_cli("export", "--model", tmp_path / "final_model.pt", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert f"to {tmp_path / 'hf'}" in result.stdout
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
        "tokenizer_config.json", "vocab.json",
    ]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_positions"], config["vocab_size"], config["torch_dtype"]) == (64, 50304, "float32")
    hf = load_export(tmp_path / "hf")
    x = torch.randint(0, 50257, (1, 30))
    torch.testing.assert_close(logits(hf, x), logits(load_model(tmp_path / "final_model.pt"), x), rtol=1e-5, atol=1e-5)


def test_overwrite_replaces_an_earlier_export_only_when_asked(tmp_path, capsys):
    save_final_model(tiny_gpt(), tmp_path / "m.pt", step=1, best_loss=1.0)
    assert cli(capsys, "export", "--model", tmp_path / "m.pt", "--out", tmp_path / "hf")[0] == 0
    before = snapshot(tmp_path / "hf")
    code, _, err = cli(capsys, "export", "--model", tmp_path / "m.pt", "--out", tmp_path / "hf", "--trim-vocab")
    assert code == 2 and "--overwrite" in err and snapshot(tmp_path / "hf") == before
    code, _, _ = cli(capsys, "export", "--model", tmp_path / "m.pt", "--out", tmp_path / "hf", "--trim-vocab",
                     "--overwrite")
    assert code == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == GPT2_VOCAB_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.pt"]  # no temporary directory left


def test_a_failed_export_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    export_hf(tiny_gpt(), tmp_path / "hf")
    before = snapshot(tmp_path / "hf")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        export_hf(tiny_gpt(), tmp_path / "hf", trim_vocab=True, overwrite=True)
    assert snapshot(tmp_path / "hf") == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_without_safetensors_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    with pytest.raises(UserError, match=r"-m pip install 'safetensors>=0.4'"):
        export_hf(tiny_gpt(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# Fine-tuning from Hugging Face weights


def init_from_values(tmp_path, data_dir, hf_dir, **overrides):
    return dict(init_from=str(hf_dir), seq_len=32, batch_size=4, max_steps=3, warmup_steps=1, lr=1e-3,
                min_lr=1e-4, target_loss=0.0, device="cpu", dtype="float32", data=str(data_dir),
                out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), **overrides)


def test_init_from_starts_training_from_the_transformers_weights(tmp_path, small_corpus, hf_model, hf_dir):
    config = resolve_config(overrides=init_from_values(tmp_path, small_corpus, hf_dir))
    assert (config.model.n_layer, config.model.n_embd, config.model.block_size, config.model.vocab_size) == (2, 32, 64, 50257)
    lines = []
    result = train(config, log=lines.append)
    assert f"initialized from {hf_dir}" in lines
    assert "model: 2 layers, 2 heads, 32 wide, context 64, vocab 50,257" in lines
    x, y = RandomWindowSampler(load_corpus(str(small_corpus)).train, 4, 32, seed=config.seed).next_batch()
    hf_loss = F.cross_entropy(logits(hf_model, x).view(-1, 50257), y.reshape(-1)).item()
    assert result.losses[0] == pytest.approx(hf_loss, rel=1e-5)


def test_a_resumed_run_takes_its_weights_from_the_checkpoint(tmp_path, small_corpus, hf_model, capsys):
    hf_model.save_pretrained(tmp_path / "hf")
    values = init_from_values(tmp_path, small_corpus, tmp_path / "hf")
    assert train(resolve_config(overrides=values), log=lambda _: None).status == "max_steps"
    for file in (tmp_path / "hf").iterdir():
        file.unlink()  # the directory is not read again
    code, out, err = cli(capsys, "train", "--resume", tmp_path / "run", "--max-steps", "5")
    assert code == 3, err
    assert "resumed from" in out and "not reached in 5 steps" in out and "initialized from" not in out


def test_a_checkpoint_from_before_init_from_existed_still_resumes(tmp_path, small_corpus):
    config = resolve_config(overrides=dict(data=str(small_corpus), run_dir=str(tmp_path)))
    saved = config.to_flat_dict()
    del saved["init_from"]
    assert resume_changes(saved, config) == []


# Bad directories and settings: one line, exit status 2, nothing changed


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def untied_head(directory):
    edit_config(directory, tie_word_embeddings=False)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    torch.save(state, directory / "pytorch_model.bin")


def drop_weight(directory):
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    del state["transformer.h.1.mlp.c_fc.weight"]
    torch.save(state, directory / "pytorch_model.bin")


SAMPLE = ["sample", "--model"]
BAD = {
    "no config.json": (lambda d: (d / "config.json").unlink(), SAMPLE, "has no config.json"),
    "not GPT-2": (lambda d: edit_config(d, model_type="llama"), SAMPLE, "model_type is 'llama'"),
    "another activation": (lambda d: edit_config(d, activation_function="relu"), SAMPLE, "activation_function is 'relu'"),
    "scaled by layer": (lambda d: edit_config(d, scale_attn_by_inverse_layer_idx=True), SAMPLE,
                        "scale_attn_by_inverse_layer_idx is on"),
    "reordered attention": (lambda d: edit_config(d, reorder_and_upcast_attn=True), SAMPLE, "reorder_and_upcast_attn"),
    "another MLP width": (lambda d: edit_config(d, n_inner=64), SAMPLE, "n_inner is 64"),
    "small vocabulary": (lambda d: edit_config(d, vocab_size=1000), SAMPLE, "vocab_size 1000 is below"),
    "weights of another shape": (lambda d: edit_config(d, n_embd=64), SAMPLE, "the weights do not match the config"),
    "untied head": (untied_head, SAMPLE, "not its token embedding"),
    "missing weight": (drop_weight, SAMPLE, "has no weight h.1.mlp.c_fc.weight"),
    "no weights file": (lambda d: (d / "pytorch_model.bin").unlink(), SAMPLE, "has no model.safetensors or pytorch_model.bin"),
    "truncated weights": (lambda d: (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:3000]),
                          SAMPLE, "truncated or corrupt"),
    "init-from shape disagrees": (lambda d: None, ["train", "--n-layer", "3", "--init-from"],
                                  "n_layer=3 disagrees with"),
    "init-from context too short": (lambda d: None, ["train", "--init-from"], "seq_len (1024) must not exceed block_size (64)"),
    "export into a non-empty directory": (lambda d: None, ["export", "--model", "m.pt", "--out"], "is not empty"),
    "overwrite a directory that is not an export": (lambda d: (d / "config.json").unlink(),
                                                    ["export", "--model", "m.pt", "--overwrite", "--out"], "no config.json"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_directories_get_one_clear_line_and_change_nothing(case, hf_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_bin_with_head(hf_model, tmp_path / "hf")
    save_final_model(tiny_gpt(), tmp_path / "m.pt", step=1, best_loss=1.0)
    damage, args, message = BAD[case]
    damage(tmp_path / "hf")
    before = snapshot(tmp_path)
    code, out, err = cli(capsys, *args, tmp_path / "hf")
    assert code == 2
    assert message in err
    assert err.startswith("gpt2train") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_read_hf_model_ignores_the_stored_head_when_the_config_ties_it(hf_model, tmp_path):
    save_bin_with_head(hf_model, tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])  # transformers ties it over this
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, weights = read_hf_model(tmp_path)
    assert torch.equal(weights["lm_head.weight"], hf_model.transformer.wte.weight)
