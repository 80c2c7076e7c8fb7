"""HellaSwag: the three accuracies, the data file (downloaded, cached, verified), scoring during training,
and every bad input in one line."""

import json

import pytest
import torch
from helpers import HELLASWAG_ITEMS, TINY, cli, logged_losses, tiny_config, write_hellaswag

from gpt2train import hellaswag, plot
from gpt2train.errors import UserError
from gpt2train.final_model import save_final_model
from gpt2train.metrics import read_metrics
from gpt2train.model import GPT, GPTConfig
from gpt2train.scoring import Score
from gpt2train.tokenizer import get_tokenizer

CPU = ["--device", "cpu", "--dtype", "float32"]


def item(endings, label, ctx="A man walks in.", ctx_b="he"):
    return hellaswag.Item("Walking", ctx, ctx_b, f"{ctx} {ctx_b}", tuple(endings), label)


def test_the_three_accuracies_on_a_hand_checked_example(monkeypatch):
    items = [
        # acc picks "x" (-3), wrongly; per character "abcdef" wins (-1.5); per UTF-8 byte it would be "ééé" (-5/6).
        item(["ab", "abcdef", "x", "ééé"], label=1),
        # acc right (-1); per character "bbbbbbbb" (-2/8) beats "a" (-1/1): acc_norm wrong.
        item(["a", "bbbbbbbb", "cc", "dd"], label=0),
        # acc and acc_norm right, the completion style wrong.
        item(["dd", "ee", "ff", "gg"], label=3),
    ]
    harness = [[-4, -9, -3, -5], [-1, -2, -3, -4], [-9, -9, -9, -1]]
    per_token = [[-2, -1, -3, -4], [-3, -1, -2, -4], [-1, -3, -2, -4]]  # mean loss per token, negated
    encode = get_tokenizer().encode_ordinary
    scores = []
    for it, h, p in zip(items, harness, per_token):
        tokens = [len(encode(" " + e)) for e in it.endings]
        scores += h + [mean * n for mean, n in zip(p, tokens)]
    monkeypatch.setattr(hellaswag, "loglikelihoods", lambda *args, **kwargs: [Score(s, False) for s in scores])
    counts = hellaswag.score(None, items, torch.device("cpu"))
    assert (counts.items, counts.acc, counts.acc_norm, counts.acc_norm_completion) == (3, 2, 2, 1)
    assert counts.accuracies() == pytest.approx({"acc": 2 / 3, "acc_norm": 2 / 3, "acc_norm_completion": 1 / 3})


def test_the_harness_text_is_cleaned_and_the_completion_text_is_raw(tmp_path):
    wikihow = hellaswag.read_items(write_hellaswag(tmp_path / "hs.jsonl"))[2]
    assert hellaswag.harness_query(wikihow) == (
        "Personal Care and Style: How to tie a tie. Drape the tie around your neck. The wide end")
    assert hellaswag.harness_choices(wikihow)[2] == "flies to the moon Really."
    requests = hellaswag.requests([wikihow])
    encode = get_tokenizer().encode_ordinary
    assert requests[4].context == tuple(encode(wikihow.ctx))
    assert requests[6].continuation == tuple(encode(" flies to the moon [step] Really."))


def test_a_context_ending_in_spaces_gives_them_to_the_continuation():
    request = hellaswag._harness_pair(get_tokenizer().encode_ordinary, "He said  ", "hello")
    encode = get_tokenizer().encode_ordinary
    assert request.context == tuple(encode("He said"))
    assert request.context + request.continuation == tuple(encode("He said  hello"))


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), path, 1, 1.0)
    return path


def test_eval_task_prints_the_three_figures_labelled(capsys, tmp_path, tiny_model):
    data = write_hellaswag(tmp_path / "hs.jsonl")
    code, out, err = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, "--data", data, *CPU)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("task: hellaswag | items: 3 |")
    assert [line.split(":")[0] for line in lines[1:]] == ["acc", "acc_norm", "acc_norm_completion"]
    assert "lm-evaluation-harness" in lines[2] and "build-nanogpt" in lines[3]


def test_eval_task_json_agrees_with_the_library(capsys, tmp_path, tiny_model):
    from gpt2train.final_model import load_model

    data = write_hellaswag(tmp_path / "hs.jsonl")
    code, out, _ = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, "--data", data, "--limit", 2,
                       "--json", *CPU)
    result = json.loads(out)
    assert code == 0 and set(result) == {"task", "items", "acc", "acc_norm", "acc_norm_completion", "seconds"}
    counts = hellaswag.score(load_model(tiny_model), hellaswag.read_items(data, 2), torch.device("cpu"))
    assert result["items"] == 2 and {k: result[k] for k in counts.accuracies()} == counts.accuracies()


# The download: a HellaSwag file served on 127.0.0.1 stands in for the authors' repository.


@pytest.fixture
def served(server, tmp_path, monkeypatch):
    body = write_hellaswag(tmp_path / "served.jsonl").read_bytes()
    server.files["/hellaswag_val.jsonl"] = body
    url = f"http://127.0.0.1:{server.server_port}/hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "SOURCE", hellaswag.Source(url, hellaswag.git_blob_id(body)))
    return server, body


def test_the_validation_set_is_downloaded_verified_and_then_read_from_the_cache(served, tmp_path):
    server, body = served
    path = hellaswag.dataset_path(cache=tmp_path / "cache")
    assert path.read_bytes() == body and path.is_relative_to(tmp_path / "cache" / "hellaswag")
    assert hellaswag.dataset_path(cache=tmp_path / "cache") == path
    assert len(server.requests) == 1  # the second use read the cached copy


def test_a_damaged_cached_copy_is_fetched_again(served, tmp_path, capsys):
    server, body = served
    path = hellaswag.dataset_path(cache=tmp_path / "cache")
    damaged = bytearray(body)
    damaged[100] ^= 1
    path.write_bytes(bytes(damaged))
    assert hellaswag.dataset_path(cache=tmp_path / "cache").read_bytes() == body
    assert len(server.requests) == 2 and "damaged" in capsys.readouterr().err


def test_a_download_that_is_not_the_file_is_refused_and_not_kept(served, tmp_path, monkeypatch, capsys, tiny_model):
    server, _ = served
    monkeypatch.setattr(hellaswag, "SOURCE", hellaswag.Source(hellaswag.SOURCE.url, "0" * 40))
    monkeypatch.setenv("GPT2TRAIN_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, *CPU)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data FILE" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_offline_without_a_copy_says_where_to_get_the_file(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.setattr(hellaswag, "SOURCE", hellaswag.Source("http://127.0.0.1:9/hellaswag_val.jsonl"))
    monkeypatch.setenv("GPT2TRAIN_CACHE", str(tmp_path / "cache"))
    code, _, err = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, *CPU)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "http://127.0.0.1:9/hellaswag_val.jsonl" in err and "--data FILE" in err


def bad_line(tmp_path, change):
    items = [dict(i) for i in HELLASWAG_ITEMS]
    change(items[1])
    return write_hellaswag(tmp_path / "bad.jsonl", items)


@pytest.mark.parametrize("change, says", [
    (lambda i: i.update(label=4), "label 4"),
    (lambda i: i.update(label="first"), "'label'"),
    (lambda i: i.update(endings=i["endings"][:3]), "4 non-empty endings"),
    (lambda i: i.pop("ctx_b"), "'ctx_b'"),
])
def test_a_bad_item_is_refused_naming_its_line(capsys, tmp_path, tiny_model, change, says):
    data = bad_line(tmp_path, change)
    code, _, err = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, "--data", data, *CPU)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{data} line 2" in err and says in err


@pytest.mark.parametrize("content", [b'{"ctx": "half a line\n', b"\xff\xfe\x00 not text\n", b"[1, 2]\n"])
def test_a_file_that_is_not_hellaswag_is_refused_in_one_line(capsys, tmp_path, tiny_model, content):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    code, _, err = cli(capsys, "eval", "--task", "hellaswag", "--model", tiny_model, "--data", data, *CPU)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{data} line 1" in err


def test_an_unknown_task_is_refused_in_one_line(capsys, tmp_path, tiny_model):
    code, _, err = cli(capsys, "eval", "--task", "hellaswagg", "--model", tiny_model)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "hellaswagg" in err
    with pytest.raises(UserError, match="eval_tasks must be"):
        tiny_config(tmp_path, "", eval_tasks="hellaswag,mmlu")


# During training.


def test_scoring_during_training_changes_no_loss_and_is_recorded_and_drawn(capsys, tmp_path, small_corpus, monkeypatch):
    data = write_hellaswag(tmp_path / "hs.jsonl")
    base = [*(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()), "--data", small_corpus, "--max-steps", 20,
            "--target-loss", 0, "--log-interval", 5]
    code, plain, err = cli(capsys, "train", *base, "--run-dir", tmp_path / "plain", "--out-dir", tmp_path / "o1")
    assert code == 3, err
    drawn = []
    monkeypatch.setattr(plot, "_save", lambda figure, f: drawn.append(len(figure.axes)))
    code, scored, err = cli(capsys, "train", *base, "--run-dir", tmp_path / "scored", "--out-dir", tmp_path / "o2",
                            "--eval-tasks", "hellaswag", "--task-eval-interval", 10, "--task-eval-data", data)
    assert code == 3, err
    assert logged_losses(scored) == logged_losses(plain)
    lines = [line for line in scored.splitlines() if "hellaswag" in line]
    assert [line.split(" |")[0] for line in lines] == ["step 10", "step 20"]
    assert lines[0].split(" | ")[1].startswith("hellaswag acc_norm: ")
    records = [r for r in read_metrics(tmp_path / "scored") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in records] == [10, 20]
    assert all(r["hellaswag_acc"] * 3 in (0, 1, 2, 3) for r in records)  # a share of 3 items
    assert drawn[-1] == 2  # loss.png has the accuracy panel below the losses


def test_a_run_with_tasks_but_no_data_fails_before_training(capsys, tmp_path, small_corpus):
    code, out, err = cli(capsys, "train", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()), "--data",
                         small_corpus, "--run-dir", tmp_path / "run", "--eval-tasks", "hellaswag",
                         "--task-eval-data", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl is not a file" in err and "step 1" not in out
