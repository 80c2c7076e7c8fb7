"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, no file touched."""

import errno
import shutil

import pytest
import torch
from helpers import TINY_FLAGS, cli, damage, flip, snapshot, tiny_config

from gpt2train import GPT, GPTConfig, train
from gpt2train.data import HEADER, shard_name
from gpt2train.final_model import save_final_model


@pytest.fixture(scope="module")
def originals(tmp_path_factory, small_corpus):
    """A prepared corpus, a final model and a run with a checkpoint, made once and copied per test."""
    root = tmp_path_factory.mktemp("originals")
    shutil.copytree(small_corpus, root / "data")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "no_text_here").mkdir()
    (root / "a_file").write_text("not a directory")
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), root / "model.pt", 1, 1.0)
    broken = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    torch.nn.init.constant_(broken.transformer.ln_f.weight, float("nan"))
    save_final_model(broken, root / "nan_model.pt", 1, 1.0)  # intact file, weights that compute NaN
    train(tiny_config(root, root / "data", max_steps=6, target_loss=0.0), log=lambda _: None)
    # A run that reached its target: its final model is in root/saved.
    train(tiny_config(root, root / "data", max_steps=6, target_loss=100.0, run_dir=str(root / "done"),
                      out_dir=str(root / "saved")), log=lambda _: None)
    return root


@pytest.fixture
def work(originals, tmp_path, monkeypatch):
    shutil.copytree(originals, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # default output paths (saved_models, runs) land here, where they are watched
    return tmp_path


def damage_token_file(work, change) -> None:
    damage(work / "data" / shard_name("train", 0), change)


def write(path, text) -> None:
    path.write_text(text)


def checkpoint(work):
    return next((work / "run" / "checkpoints").iterdir())


TRAIN = ["train", *TINY_FLAGS, "--max-steps", "20"]

CASES = {
    # corpus
    "missing input file": (lambda w: ["prepare", w / "nope.txt", "--out", w / "new"], "does not exist"),
    "empty input file": (lambda w: ["prepare", w / "empty.txt", "--out", w / "new"], "holds no text"),
    "not UTF-8": (lambda w: ["prepare", w / "latin1.txt", "--out", w / "new"], "is not UTF-8 text"),
    "directory without text": (lambda w: ["prepare", w / "no_text_here", "--out", w / "new"], "holds no files matching"),
    "prepare over prepared data": (lambda w: ["prepare", w / "empty.txt", "--out", w / "data"], "already holds prepared data"),
    "JSON line without the text field": (lambda w: write(w / "d.jsonl", '{"body": "words"}\n')
                                         or ["prepare", w / "d.jsonl", "--out", w / "new"], "line 1 has no 'text' field"),
    "damaged gzip file": (lambda w: write(w / "d.txt.gz", "not gzip at all")
                          or ["prepare", w / "d.txt.gz", "--out", w / "new"], "is not a valid gz file"),
    "missing data directory": (lambda w: [*TRAIN, "--data", w / "nowhere"], "does not exist"),
    "not a data directory": (lambda w: [*TRAIN, "--data", w / "no_text_here"], "not a prepared data directory"),
    "data is a file": (lambda w: [*TRAIN, "--data", w / "a_file"], "is a file, and --data takes a directory"),
    "shard missing": (lambda w: (w / "data" / shard_name("train", 0)).unlink() or [*TRAIN, "--data", w / "data"],
                      "cannot read token file"),
    "unknown sampling": (lambda w: [*TRAIN, "--sampling", "shuffled"], "invalid choice: 'shuffled'"),
    "corpus shorter than a window": (lambda w: ["train", *TINY_FLAGS, "--block-size", "512", "--seq-len", "512",
                                                "--data", w / "data"], "fewer than seq_len + 1"),
    # token files
    "token file bad header": (lambda w: damage_token_file(w, lambda b: b"NOTATOKN" + b[8:])
                              or [*TRAIN, "--data", w / "data"], "bad magic"),
    "token file wrong dtype": (lambda w: damage_token_file(w, lambda b: b[:12] + (4).to_bytes(4, "little") + b[16:])
                               or [*TRAIN, "--data", w / "data"], "4-byte ids"),
    "token file truncated": (lambda w: damage_token_file(w, lambda b: b[:-10])
                             or [*TRAIN, "--data", w / "data"], "truncated"),
    "token ids beyond the vocabulary": (lambda w: damage_token_file(w, lambda b: b[: HEADER.size] + b"\xff\xff" + b[HEADER.size + 2:])
                                        or [*TRAIN, "--data", w / "data"], "ids >= its vocabulary"),
    # checkpoints
    "truncated checkpoint": (lambda w: damage(checkpoint(w), lambda b: b[:5000])
                             or ["train", "--resume", w / "run"], "truncated or corrupt"),
    "corrupt checkpoint": (lambda w: damage(checkpoint(w), lambda b: b"\x80\x02garbage" * 50)
                           or ["train", "--resume", w / "run"], "truncated or corrupt"),
    "foreign checkpoint": (lambda w: ["train", "--resume", w / "model.pt"], "not a gpt2train training checkpoint"),
    "checkpoint with changed bytes": (lambda w: flip(checkpoint(w), 0.5) or ["train", "--resume", w / "run"],
                                      "is damaged: its bytes do not match the checksum"),
    "checkpoint of another shape": (lambda w: ["train", "--resume", w / "run", "--n-layer", "3", "--max-steps", "20"],
                                    "cannot resume with n_layer=3"),
    "nothing to resume": (lambda w: ["train", "--resume", "--run-dir", w / "no_text_here"], "no checkpoint in"),
    "new run over an earlier one": (lambda w: [*TRAIN, "--data", w / "data", "--run-dir", w / "run"],
                                    "holds checkpoints of an earlier run"),
    # final models
    "truncated final model": (lambda w: damage(w / "model.pt", lambda b: b[:3000])
                              or ["sample", "--model", w / "model.pt"], "truncated or corrupt"),
    "corrupt final model": (lambda w: damage(w / "model.pt", lambda b: b"junk" * 100)
                            or ["sample", "--model", w / "model.pt"], "truncated or corrupt"),
    "foreign model file": (lambda w: torch.save({"state_dict": {"w": torch.zeros(2)}}, w / "other.pt")
                           or ["sample", "--model", w / "other.pt"], "not a gpt2train model file or checkpoint"),
    "neither a run nor a model directory": (lambda w: ["sample", "--model", w / "no_text_here"],
                                            "is neither a run directory (no checkpoints/) nor a Hugging Face"),
    "export over an existing file": (lambda w: ["export", "--model", w / "model.pt", "--format", "pt", "--out",
                                                w / "model.pt"], "exists: choose another --out"),
    "export to a mismatched suffix": (lambda w: ["export", "--model", w / "model.pt", "--format", "safetensors",
                                                 "--out", w / "m.pt"], "does not end as a safetensors file should"),
    "final model path is a directory": (lambda w: (w / "as_dir" / "final_model.pt").mkdir(parents=True)
                                        or [*TRAIN, "--data", w / "data", "--out-dir", w / "as_dir",
                                            "--run-dir", w / "r2"], "is a directory, where the final model"),
    "resume into another run's directory": (lambda w: ["train", "--resume", w / "run", "--run-dir", w / "done",
                                                       "--max-steps", "20"], "holds checkpoints of another run"),
    "final model with changed bytes, sample": (lambda w: flip(w / "model.pt", 0.5) or ["sample", "--model", w / "model.pt"],
                                               "is damaged: its bytes do not match the checksum"),
    "final model with changed bytes, eval": (lambda w: flip(w / "model.pt", 0.3) or ["eval", "--model", w / "model.pt"],
                                             "is damaged: its bytes do not match the checksum"),
    "final model with changed bytes, export": (lambda w: flip(w / "model.pt", 0.7)
                                               or ["export", "--model", w / "model.pt", "--out", w / "hf"],
                                               "is damaged: its bytes do not match the checksum"),
    "weights that compute NaN, sample": (lambda w: ["sample", "--model", w / "nan_model.pt", "--device", "cpu"],
                                         "non-finite logits"),
    "weights that compute NaN, eval": (lambda w: ["eval", "--model", w / "nan_model.pt", "--device", "cpu",
                                                  "--dtype", "float32", "--max-tokens", "64"], "non-finite loss"),
    "another run's final model": (lambda w: [*TRAIN, "--data", w / "data", "--run-dir", w / "new_run",
                                             "--out-dir", w / "saved"], "holds a final model written by the run in"),
    "missing final model": (lambda w: ["sample", "--model", w / "none.pt"], "does not exist"),
    # hyperparameters and config files
    "zero lr": (lambda w: [*TRAIN, "--lr", "0"], "lr must be positive"),
    "infinite lr": (lambda w: [*TRAIN, "--lr", "inf"], "lr must be a finite number, not inf"),
    "negative seed": (lambda w: [*TRAIN, "--seed=-1"], "seed must be in [0, 2**32), not -1"),
    "negative seed in a file": (lambda w: write(w / "c.toml", "seed = -5\n") or ["train", "--config", w / "c.toml"],
                                "seed must be in [0, 2**32), not -5"),
    "negative target": (lambda w: [*TRAIN, "--target-loss=-1"], "target_loss must not be negative"),
    "NaN target": (lambda w: [*TRAIN, "--target-loss", "nan"], "target_loss must be a finite number, not nan"),
    "muon under fsdp": (lambda w: [*TRAIN, "--data", w / "data", "--fsdp", "--optimizer", "muon"],
                        "--optimizer muon does not run under --fsdp"),
    "decay_at without wsd": (lambda w: [*TRAIN, "--decay-at", "8"], "decay_at applies to --schedule wsd"),
    "fsdp without torchrun": (lambda w: [*TRAIN, "--data", w / "data", "--fsdp"],
                              "--fsdp shards a model over the processes of a torchrun launch"),
    "a model too large for memory": (lambda w: [*TRAIN, "--n-layer", "10000000"], "choose a smaller model"),
    "a batch too large for memory": (lambda w: [*TRAIN, "--batch-size", "10" + "0" * 20], "lower --batch-size or --seq-len"),
    "NaN temperature": (lambda w: ["sample", "--model", w / "model.pt", "--temperature", "nan"],
                        "--temperature must be a number"),
    "damaged manifest": (lambda w: write(w / "data" / "manifest.json", '{"format": "other"}')
                         or [*TRAIN, "--data", w / "data"],
                         "data --overwrite`"),  # the whole command in one pair of backticks
    "negative lr": (lambda w: [*TRAIN, "--lr=-1e-3"], "lr must be positive"),
    "zero batch": (lambda w: [*TRAIN, "--batch-size", "0"], "batch_size must be positive"),
    "zero steps": (lambda w: ["train", "--max-steps", "0"], "max_steps must be positive"),
    "seq_len beyond block_size": (lambda w: ["train", "--seq-len", "2048"], "must not exceed block_size"),
    "warmup beyond max steps": (lambda w: ["train", "--warmup-steps", "50", "--max-steps", "10"],
                                "warmup_steps (50) must not exceed max_steps (10)"),
    "min_lr above lr": (lambda w: ["train", "--min-lr", "1e-2"], "min_lr"),
    "unknown preset": (lambda w: ["train", "--preset", "huge"], "invalid choice: 'huge'"),
    "unknown preset in a file": (lambda w: write(w / "c.toml", 'preset = "huge"\n')
                                 or ["train", "--config", w / "c.toml"], "unknown preset 'huge'"),
    "unknown config key": (lambda w: write(w / "c.toml", "learning_rate = 1e-3\n")
                           or ["train", "--config", w / "c.toml"], "unknown key 'learning_rate'"),
    "malformed TOML": (lambda w: write(w / "c.toml", "lr = = 3\n") or ["train", "--config", w / "c.toml"],
                       "not valid TOML"),
    "missing config file": (lambda w: ["train", "--config", w / "none.toml"], "does not exist"),
    "wrong flag type": (lambda w: ["train", "--batch-size", "eight"], "invalid int value"),
    # where the output goes
    "final model dir under a file": (lambda w: [*TRAIN, "--data", w / "data", "--out-dir", w / "a_file" / "models"],
                                     "cannot write the final model"),
    "run dir under a file": (lambda w: [*TRAIN, "--data", w / "data", "--run-dir", w / "a_file" / "run"],
                             "cannot write the checkpoints"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_clear_line_and_changes_nothing(case, work, capsys):
    make_args, message = CASES[case]
    args = make_args(work)  # may damage a file first: the snapshot is taken after that
    before = snapshot(work)
    code, out, err = cli(capsys, *args)
    assert code == 2
    assert message in err
    assert err.startswith("gpt2train") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    assert snapshot(work) == before


def test_debug_shows_the_traceback(work, capsys):
    code, _, err = cli(capsys, "prepare", work / "nope.txt", "--out", work / "new", "--debug")
    assert code == 2 and "Traceback" in err and "does not exist" in err.splitlines()[-1]


def test_disk_full_while_saving_keeps_the_previous_final_model(work, capsys, monkeypatch):
    previous = work / "final_model.pt"  # an earlier final model, where this run writes its own
    shutil.copy(work / "model.pt", previous)
    before = previous.read_bytes()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 a few bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    # --overwrite: replacing a final model another run wrote is allowed, so the save itself is what fails.
    code, out, err = cli(capsys, "train", *TINY_FLAGS, "--data", work / "data", "--target-loss", "100",
                         "--out-dir", work, "--run-dir", work / "new_run", "--overwrite")
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert previous.read_bytes() == before
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # no temp file left behind


def test_a_token_changed_in_a_prepared_shard_is_found_before_it_is_trained_on(work, capsys):
    shard = work / "data" / shard_name("train", 0)
    data = bytearray(shard.read_bytes())
    data[HEADER.size] ^= 1  # one token id, still a valid one: only the manifest's SHA-256 can tell
    shard.write_bytes(bytes(data))
    code, out, err = cli(capsys, *TRAIN, "--data", work / "data", "--run-dir", work / "r", "--out-dir", work / "o")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"token file {shard} does not match the SHA-256 that manifest.json lists" in err
    assert "step 1 |" not in out and not (work / "o").exists()


def fuzz_cases() -> list[tuple[str, str]]:
    """(flag, value) pairs that no `train` flag accepts: the wrong type, out of range, not a number,
    and sizes no memory holds."""
    from gpt2train.cli import _flag
    from gpt2train.config import RUN_FIELDS, base_type, field_types

    huge = "1" + "0" * 30
    cases = []
    for name, annotation in field_types().items():
        kind, choices = base_type(annotation), RUN_FIELDS[name].metadata["choices"] if name in RUN_FIELDS else ()
        flag = _flag(name)
        if choices:
            cases.append((flag, "bogus"))
        elif kind is int:
            cases += [(flag, "abc"), (flag, "1.5"), (flag, "-1")]
            if name in ("n_layer", "n_embd", "block_size", "vocab_size", "batch_size"):
                cases.append((flag, huge))
        elif kind is float:
            cases += [(flag, value) for value in ("abc", "nan", "inf", "-inf", "-1")]
    return cases


@pytest.mark.parametrize("flag, value", fuzz_cases())
def test_no_flag_takes_a_value_it_cannot_use(flag, value, tmp_path, small_corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", *TINY_FLAGS, "--data", small_corpus, "--max-steps", "1", f"{flag}={value}")
    assert code == 2, out
    assert err.startswith("gpt2train") and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
