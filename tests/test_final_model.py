import sys

import pytest
import torch
from helpers import tiny_config

from gpt2train import GPT, GPTConfig, load_model, train
from gpt2train.checksum import save_sealed
from gpt2train.errors import UserError
from gpt2train.final_model import claim_final_model, read_model, save_final_model, written_by


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)).eval()


@pytest.mark.parametrize("name", ["final_model.pt", "final_model.safetensors"])
def test_both_formats_round_trip_to_the_same_model(tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    model = small_model()
    save_final_model(model, tmp_path / name, step=7, best_loss=0.25)
    loaded = load_model(tmp_path / name)
    config, _, facts = read_model(tmp_path / name)
    assert config == model.config
    assert (facts["step"], facts["best_loss"], facts["tokenizer"]) == (7, 0.25, "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        expected = model.half().float()(x)[0]  # what fp16 storage keeps of the weights
        assert torch.equal(loaded(x)[0], expected)


def test_safetensors_stores_the_tied_matrix_once(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    model = small_model()
    save_final_model(model, tmp_path / "m.safetensors", step=1, best_loss=1.0)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert (tmp_path / "m.safetensors").stat().st_size < 2 * model.num_params() + 20_000


def test_training_writes_safetensors_when_asked(tmp_path, small_corpus):
    pytest.importorskip("safetensors")
    result = train(tiny_config(tmp_path, small_corpus, format="safetensors", target_loss=5.0), log=lambda _: None)
    assert result.final_model_path == tmp_path / "out" / "final_model.safetensors"
    assert isinstance(load_model(result.final_model_path), GPT)


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    pytest.importorskip("safetensors")
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
    with open(tmp_path / "m.pt", "wb") as f:  # an intact file, with its checksum
        save_sealed(contents, f)
    with pytest.raises(UserError, match="do not fit its config"):
        load_model(tmp_path / "m.pt")


def test_safetensors_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    with pytest.raises(UserError, match=r"-m pip install 'safetensors>=0.4'"):
        save_final_model(small_model(), tmp_path / "m.safetensors", step=1, best_loss=1.0)


def test_a_run_that_could_not_save_safetensors_fails_before_training(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    lines = []
    with pytest.raises(UserError, match="needs the safetensors package"):
        train(tiny_config(tmp_path, small_corpus, format="safetensors"), log=lines.append)
    assert lines == []


# Where bytes are changed: the zip or safetensors header, the pickle or JSON, the weights, the
# zip's central directory, the checksum itself.
FLIP_AT = [0.0, 0.001, 0.25, 0.5, 0.75, 0.999, 1.0]


def flipped(data: bytes, at: float) -> bytes:
    i = min(int(len(data) * at), len(data) - 1)
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


@pytest.mark.parametrize("name", ["final_model.pt", "final_model.safetensors"])
def test_a_final_model_whose_bytes_changed_anywhere_is_refused(tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    path = tmp_path / name
    save_final_model(small_model(), path, step=1, best_loss=1.0)
    good = path.read_bytes()
    damaged = {f"byte at {at:.1%}": flipped(good, at) for at in FLIP_AT}
    damaged |= {"truncated by one byte": good[:-1], "cut in half": good[: len(good) // 2]}
    for how, data in damaged.items():
        path.write_bytes(data)
        with pytest.raises(UserError, match="damaged|truncated or corrupt|not a readable"):
            load_model(path)
            pytest.fail(f"{how}: loaded")
    path.write_bytes(good)
    assert isinstance(load_model(path), GPT)  # the same bytes, restored, load


def test_a_final_model_records_the_run_that_wrote_it(tmp_path, small_corpus):
    result = train(tiny_config(tmp_path, small_corpus, target_loss=5.0), log=lambda _: None)
    run = torch.load(result.final_model_path, weights_only=True)["run"]
    assert run["dir"] == str((tmp_path / "run").resolve()) and len(run["id"]) == 32
    assert torch.load(result.checkpoint_path, weights_only=True)["run_id"] == run["id"]


def test_a_new_run_never_replaces_another_runs_final_model(tmp_path, small_corpus):
    first = train(tiny_config(tmp_path, small_corpus, target_loss=5.0), log=lambda _: None)
    before = first.final_model_path.read_bytes()
    other = tiny_config(tmp_path, small_corpus, target_loss=5.0, run_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match=f"{first.final_model_path} holds a final model written by the run in "
                                        f"{(tmp_path / 'run').resolve()}.*another --out-dir.*--overwrite"):
        train(other, log=lambda _: None)
    assert first.final_model_path.read_bytes() == before and not (tmp_path / "other").exists()
    # --overwrite says that replacing it is meant.
    second = train(tiny_config(tmp_path, small_corpus, target_loss=5.0, run_dir=str(tmp_path / "other"),
                               overwrite=True), log=lambda _: None)
    assert torch.load(second.final_model_path, weights_only=True)["run"]["dir"] == str((tmp_path / "other").resolve())


def test_the_run_that_wrote_the_final_model_may_replace_it_when_resumed(tmp_path, small_corpus):
    first = train(tiny_config(tmp_path, small_corpus, target_loss=5.0), log=lambda _: None)
    again = train(tiny_config(tmp_path, small_corpus, target_loss=4.0, resume="latest"), log=lambda _: None)
    assert again.reached_target and again.steps > first.steps
    saved = torch.load(again.final_model_path, weights_only=True)
    assert saved["step"] == again.steps and saved["run"]["id"] == torch.load(first.final_model_path.parent / "final_model.pt", weights_only=True)["run"]["id"]


@pytest.mark.parametrize("name", ["final_model.pt", "final_model.safetensors"])
def test_a_final_model_is_claimed_only_by_the_run_that_wrote_it(tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    path = tmp_path / name
    claim_final_model(path, "any", overwrite=False)  # nothing there yet
    save_final_model(small_model(), path, step=1, best_loss=1.0, run={"id": "first", "dir": "/runs/first"})
    assert written_by(path) == {"id": "first", "dir": "/runs/first"}
    claim_final_model(path, "first", overwrite=False)  # its own run may replace it
    claim_final_model(path, "second", overwrite=True)  # and anyone, when told to
    with pytest.raises(UserError, match=f"{path} holds a final model written by the run in /runs/first"):
        claim_final_model(path, "second", overwrite=False)
    path.write_bytes(b"not a model")  # a file no run can be named for is not replaced silently either
    with pytest.raises(UserError, match="by an older gpt2train or another program"):
        claim_final_model(path, "second", overwrite=False)


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, small_corpus):
    """A run that ran out of steps: no final model, only its checkpoints."""
    tmp = tmp_path_factory.mktemp("unfinished")
    result = train(tiny_config(tmp, small_corpus, max_steps=6, target_loss=0.0), log=lambda _: None)
    assert result.final_model_path is None
    return tmp / "run", result


def test_a_checkpoint_or_its_run_directory_loads_as_the_model_it_holds(unfinished_run):
    run_dir, result = unfinished_run
    expected = result.model.eval()
    x = torch.randint(0, 50257, (1, 16))
    for source in (result.checkpoint_path, run_dir, run_dir / "checkpoints"):
        model = load_model(source)
        with torch.no_grad():
            assert torch.equal(model(x)[0], expected(x)[0])  # the fp32 weights, exactly
    config, _, facts = read_model(run_dir)
    assert config == expected.config and facts["step"] == 6 and facts["run"]["dir"] == str(run_dir.resolve())


def test_sample_eval_and_export_take_a_run_directory(unfinished_run, tmp_path):
    from helpers import run_cli

    run_dir, _ = unfinished_run
    sampled = run_cli("sample", "--model", run_dir, "--prompt", "The", "--max-new-tokens", "4", "--seed", "1",
                      "--device", "cpu")
    assert sampled.returncode == 0 and sampled.stdout.startswith("The"), sampled.stderr
    scored = run_cli("eval", "--model", run_dir, "--device", "cpu", "--dtype", "float32", "--max-tokens", "64")
    assert scored.returncode == 0 and "val loss" in scored.stdout, scored.stderr
    exported = run_cli("export", "--model", run_dir, "--format", "pt", "--out", tmp_path / "m")
    assert exported.returncode == 0, exported.stderr
    contents = torch.load(tmp_path / "m" / "final_model.pt", weights_only=True)  # the default recipe's fp16 file
    assert all(t.dtype == torch.float16 for t in contents["model_state_dict"].values())
    assert contents["step"] == 6 and contents["run"]["dir"] == str(run_dir.resolve())
    again = run_cli("export", "--model", run_dir, "--format", "pt", "--out", tmp_path / "m")
    assert again.returncode == 2 and "exists: choose another --out, or replace it with --overwrite" in again.stderr
