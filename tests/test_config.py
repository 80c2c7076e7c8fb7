import pytest

from gpt2train.config import TrainConfig, preset_config, resolve_config
from gpt2train.errors import UserError


def test_defaults_are_the_default_recipe():
    config = resolve_config()
    assert config == TrainConfig()
    assert (config.batch_size, config.seq_len, config.max_steps, config.warmup_steps) == (8, 1024, 20000, 2000)
    assert (config.lr, config.min_lr, config.target_loss) == (6e-4, 6e-5, 0.099999)
    assert (config.weight_decay, config.grad_clip, config.log_interval) == (0.1, 1.0, 10)


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nlr = 1e-3\nn_layer = 3\nseq_len = 32\n')
    config = resolve_config(path, {"lr": 2e-3, "batch_size": None})
    tiny = preset_config("tiny")
    assert config.preset == "tiny"
    assert config.lr == 2e-3  # flag beats file
    assert config.model.n_layer == 3 and config.seq_len == 32  # file beats preset
    assert config.model.n_embd == tiny.model.n_embd  # preset beats default
    assert config.batch_size == tiny.batch_size  # an unset flag overrides nothing


def test_a_presets_slice_of_the_builtin_corpus_never_shrinks_the_users_data():
    assert preset_config("tiny").train_tokens == 1024  # the built-in corpus: the preset's slice
    assert resolve_config(overrides={"preset": "tiny", "data": "data/mine"}).train_tokens == 0  # all of it
    mine = resolve_config(overrides={"preset": "tiny", "data": "data/mine", "train_tokens": 5000})
    assert mine.train_tokens == 5000  # unless asked for


def test_int_accepted_for_float_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("target_loss = 1\n")
    assert resolve_config(path).target_loss == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ("lr = \n", "not valid TOML"),
        ("learning_rate = 0.1\n", "unknown key 'learning_rate'"),
        ("batch_size = 'eight'\n", "'batch_size' must be int"),
        ('preset = "huge"\n', "unknown preset 'huge'"),
    ],
)
def test_bad_config_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        resolve_config(path)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        resolve_config("no/such/file.toml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": -1}, "max_steps"),
        ({"seq_len": 2048}, "must not exceed block_size"),
        ({"min_lr": 1e-3}, "min_lr"),
        ({"vocab_size": 1000}, "vocab_size"),
        ({"n_embd": 100}, "multiple of n_head"),
    ],
)
def test_invalid_hyperparameters_are_rejected(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_config(overrides=overrides)


def test_the_example_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).parent.parent / "configs"
    assert resolve_config(root / "gpt2.toml") == resolve_config()
    finetune = resolve_config(root / "finetune-tiny.toml")
    assert finetune.preset == "tiny" and finetune.target_metric == "val" and finetune.train_tokens == 0
