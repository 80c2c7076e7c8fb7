"""The command line and config files, fuzzed: every flag of every subcommand (walked from the parser
itself) and every config key is fed the values a user can type wrongly. Each case ends in one line and
exit status 2, or is accepted and runs; never a traceback. Training and benchmarking stop once the
run is set up and its paths checked: the failures looked for are in parsing and validation."""

import argparse
import itertools
import os

import pytest
from helpers import TINY_FLAGS, cli, run_cli

from gpt2train.cli import build_parser
from gpt2train.config import field_types
from gpt2train.final_model import save_final_model
from gpt2train.model import GPT, GPTConfig

HUGE = "1" + "0" * 30
# What a user types wrongly, as the shell hands it over: a file name that is not UTF-8 arrives as
# surrogate escapes.
VALUES = ["", "abc", "1.5", "-1", "0", "nan", "inf", "-inf", HUGE, "ünï€ ✓", os.fsdecode(b"\xff\xfebad")]
PATHS = ["a_file.txt", "a_directory", "missing", "unreadable.txt", "a_file.txt/below"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), path, 1, 1.0)
    return path


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory holding a file, a directory and an unreadable file; default outputs land here."""
    (tmp_path / "a_file.txt").write_text("Some words to read. " * 20)
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "unreadable.txt").write_text("Hidden words.")
    (tmp_path / "unreadable.txt").chmod(0)  # unreadable to all but root
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def set_up_only(monkeypatch):
    """`train` and `bench` end once their run is set up: config resolved and validated, the run's
    paths and memory checked and its data read; training and timing are stubbed."""
    import gpt2train.bench as bench
    import gpt2train.training.loop as loop
    from gpt2train.corpus import load_corpus
    from gpt2train.device import check_fits, resolve_device
    from gpt2train.training.outcome import Outcome
    from gpt2train.training.resume import resolve_run
    from gpt2train.training.rundir import check_outputs

    def train(config, **_):
        plan = resolve_run(config)
        check_outputs(plan.config, plan.run_id)
        check_fits(config, resolve_device(config.device))
        load_corpus(config.data)
        return argparse.Namespace(exit_status=Outcome.MAX_STEPS.exit_status())

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(bench, "run_variant", lambda *a: {})
    monkeypatch.setattr(bench, "run_in_subprocess", lambda *a: {})
    monkeypatch.setattr(bench, "describe", lambda *a: [])
    monkeypatch.setattr(bench, "as_json", lambda *a: "")
    monkeypatch.setattr(bench, "generation_report", lambda *a: [])


class Enough(BaseException):
    """Raised by a stub once a command has shown that it runs, where the rest would only take time."""


@pytest.fixture
def short_samples(monkeypatch):
    """Samples of at most three tokens, and three samples, whatever --max-new-tokens and --num-samples ask;
    clear the list returned before each command."""
    import gpt2train.sample as sample

    generate, calls = sample.generate, []

    def short(*args, **kwargs):
        calls.append(None)
        if len(calls) > 3:
            raise Enough
        return itertools.islice(generate(*args, **kwargs), 3)

    monkeypatch.setattr(sample, "generate", short)
    return calls


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def base_args(command: str, out, model_file, small_corpus) -> list:
    """A command line of `command` that works (writing to `out`), to which the fuzzed flag is added: given
    last, it overrides the same flag here."""
    return {
        "prepare": [out.parent / "a_file.txt", "--out", out, "--quiet"],
        "train": [*TINY_FLAGS, "--data", small_corpus],
        "bench": [*TINY_FLAGS, "--steps", "1", "--warmup", "0"],
        "sample": ["--model", model_file, "--max-new-tokens", "2", "--device", "cpu", "--seed", "1"],
        "eval": ["--model", model_file, "--data", small_corpus, "--device", "cpu", "--dtype", "float32",
                 "--max-tokens", "64"],
        "export": ["--model", model_file, "--out", out],
        "plot": [],
    }[command]


def flag_cases() -> list[tuple[str, str]]:
    """(subcommand, option) for every option of every subcommand, its positional arguments included."""
    cases = []
    for command, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or "--debug" in action.option_strings:
                continue
            cases.append((command, action.option_strings[0] if action.option_strings else action.dest))
    return cases


def problem_with(capsys, place, *args) -> str | None:
    """What is wrong with how `gpt2train ARGS` ended, if anything. It must end in one line and exit
    status 2, having written nothing, or be accepted: done (0), or set up and stopped (3, a stubbed
    train); never a traceback."""
    before = sorted(place.rglob("*"))
    try:
        code, out, err = cli(capsys, *args)
    except Enough:
        capsys.readouterr()
        return None
    except Exception as e:  # noqa: BLE001 - every case is reported, not only the first
        return f"raised {type(e).__name__}: {e}"
    if "Traceback" in out + err:
        return "a traceback"
    if code == 2:
        if not (err.startswith("gpt2train") and err.count("\n") == 1):
            return f"not one line: {err!r}"
        return "wrote files" if sorted(place.rglob("*")) != before else None
    return None if code in (0, 3) else f"exit status {code}: {err!r}"


@pytest.mark.parametrize("command, option", flag_cases())
def test_every_flag_given_a_wrong_value_ends_in_one_line_or_runs(command, option, place, model_file, small_corpus,
                                                                  set_up_only, short_samples, capsys):
    parser = subcommands()[command]
    action = next(a for a in parser._actions if option in (a.option_strings or [a.dest]))
    values = VALUES + [str(place / p) for p in PATHS]
    if action.nargs == 0:  # a switch: given a value anyway
        cases = [[f"{option}=yes"]]
    elif action.option_strings:
        cases = [[f"{option}={value}"] for value in values]
    else:  # a positional argument
        cases = [[value] for value in values]
    problems = []
    for number, extra in enumerate(cases):
        short_samples.clear()
        problem = problem_with(capsys, place, command,
                               *base_args(command, place / f"out{number}", model_file, small_corpus), *extra)
        if problem:
            problems.append(f"{extra}: {problem}")
    assert not problems, "\n".join(problems)


# --- config files -------------------------------------------------------------------------------------------

TOML_VALUES = ['""', '"abc"', "-1", "0", "1.5", "nan", "inf", "-inf", HUGE, "true", "[1, 2]", "{ a = 1 }",
               '"ünï€ ✓"', "1979-05-27", '"a_file.txt/below"']

FILES = {
    "not UTF-8": b"\xff\xfe\x00\x00l\x00r\x00 = 1",
    "binary": bytes(range(256)) * 4,
    "truncated string": b'preset = "ti',
    "truncated number": b"lr = 1e",
    "truncated table": b"[mod",
    "a table": b"[model]\nn_layer = 2\n",
    "an array of tables": b"[[runs]]\nlr = 0.001\n",
    "a dotted key": b"model.n_layer = 2\n",
    "a byte order mark": "\ufefflr = 0.001\n".encode(),
    "a key twice": b"lr = 0.001\nlr = 0.002\n",
    "NUL bytes": b"lr = 0.001\x00\n",
    "empty": b"",
    "a very long line": b"data = \"" + b"x" * 100_000 + b"\"\n",
}


def config_cases() -> list[tuple[str, bytes]]:
    cases = [(f"{key} = {value}", f"{key} = {value}\n".encode()) for key in field_types() for value in TOML_VALUES]
    return cases + list(FILES.items())


def test_every_config_key_given_a_wrong_value_ends_in_one_line_or_runs(place, small_corpus, set_up_only, capsys):
    problems = []
    for name, content in config_cases():
        (place / "config.toml").write_bytes(content)
        problem = problem_with(capsys, place, "train", *TINY_FLAGS, "--data", small_corpus, "--config", "config.toml")
        if problem:
            problems.append(f"{name!r}: {problem}")
    assert not problems, "\n".join(problems)


def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_status_2(tmp_path):
    """As a user meets it: a file saved as UTF-16 (it starts ff fe 00), a process of its own."""
    (tmp_path / "bad.toml").write_bytes("lr = 0.001\n".encode("utf-16"))
    result = run_cli("train", "--config", tmp_path / "bad.toml", *TINY_FLAGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"gpt2train train: error: config file {tmp_path / 'bad.toml'} is not UTF-8 text (byte 0 is " \
                            "0xff): save it as UTF-8\n"


def test_the_cases_cover_every_flag_and_key():
    """The walk finds what the parser has: a new flag or key is fuzzed without a change here."""
    flags = flag_cases()
    assert len({command for command, _ in flags}) == len(subcommands()) - 1  # presets takes no option but --debug
    assert ("train", "--lr") in flags and ("prepare", "inputs") in flags and ("export", "--out") in flags
    assert len(config_cases()) == len(field_types()) * len(TOML_VALUES) + len(FILES)
