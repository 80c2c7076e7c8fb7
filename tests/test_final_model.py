import sys

import pytest
import torch

from conftest import tiny_config
from gpt2train import GPT, GPTConfig, load_model, train
from gpt2train.errors import UserError
from gpt2train.final_model import read_final_model, save_final_model


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)).eval()


@pytest.mark.parametrize("name", ["final_model.pt", "final_model.safetensors"])
def test_both_formats_round_trip_to_the_same_model(tmp_path, name):
    model = small_model()
    save_final_model(model, tmp_path / name, step=7, best_loss=0.25)
    loaded = load_model(tmp_path / name)
    contents = read_final_model(tmp_path / name)
    assert contents["config"] == model.config.to_dict()
    assert (contents["step"], contents["best_loss"], contents["tokenizer"]) == (7, 0.25, "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        expected = model.half().float()(x)[0]  # what fp16 storage keeps of the weights
        assert torch.equal(loaded(x)[0], expected)


def test_safetensors_stores_the_tied_matrix_once(tmp_path):
    from safetensors import safe_open

    model = small_model()
    save_final_model(model, tmp_path / "m.safetensors", step=1, best_loss=1.0)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert (tmp_path / "m.safetensors").stat().st_size < 2 * model.num_params() + 20_000


def test_training_writes_safetensors_when_asked(tmp_path, small_corpus):
    result = train(tiny_config(tmp_path, small_corpus, format="safetensors", target_loss=5.0), log=lambda _: None)
    assert result.final_model_path == tmp_path / "out" / "final_model.safetensors"
    assert isinstance(load_model(result.final_model_path), GPT)


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    import safetensors.torch

    (tmp_path / "other.safetensors").write_bytes(safetensors.torch.save({"w": torch.zeros(2)}))
    with pytest.raises(UserError, match="not a gpt2train model file"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable gpt2train safetensors file"):
        load_model(tmp_path / "bad.safetensors")


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    save_final_model(small_model(), tmp_path / "m.pt", step=1, best_loss=1.0)
    contents = torch.load(tmp_path / "m.pt", weights_only=True)
    contents["config"]["n_embd"] = 32
    torch.save(contents, tmp_path / "m.pt")
    with pytest.raises(UserError, match="do not fit its config"):
        load_model(tmp_path / "m.pt")


def test_safetensors_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    with pytest.raises(UserError, match=r"pip install 'gpt2train\[safetensors\]'"):
        save_final_model(small_model(), tmp_path / "m.safetensors", step=1, best_loss=1.0)


def test_a_run_that_could_not_save_safetensors_fails_before_training(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    lines = []
    with pytest.raises(UserError, match="needs the safetensors package"):
        train(tiny_config(tmp_path, small_corpus, format="safetensors"), log=lines.append)
    assert lines == []
