"""eval --lm-eval: lm-evaluation-harness's tasks on a gpt2train model in process, offline, against the
harness's own `hf` model on the model's Hugging Face export."""

import atexit
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Never reach the Hub: the models are built here and the task reads a local JSON-lines file. The datasets
# library's cache is this test run's own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="gpt2train-test-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from gpt2train import GPT, GPTConfig, generate, get_tokenizer
from gpt2train.cli import main
from gpt2train.final_model import save_final_model
from gpt2train.harness import LOWEST_VERSION, lm_eval_model, run_lm_eval
from gpt2train.hf import export_hf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from hellaswag import write_local_task  # noqa: E402 - the benchmark's copy of the harness's task

TASK = "hellaswag_local"

# HellaSwag's format (its validation split's fields), with WikiHow's bracketed artifacts for process_docs.
ITEMS = [
    ("Baking cookies", "A woman stands in a kitchen and cracks two eggs into a bowl.", "she",
     ["whisks them together with sugar and butter until smooth.", "throws the bowl out of the window.",
      "starts to sing loudly into a wooden spoon for the camera.", "puts on her running shoes and leaves."], 0),
    ("Playing guitar", "A man sits on a stool holding an acoustic guitar.", "he",
     ["eats the guitar strings one at a time.", "tunes the strings and begins strumming a slow song.",
      "paints the stool bright red.", "folds the guitar into a paper plane."], 1),
    ("Home and Garden", "[header] How to water a lawn [title] Water early in the morning. [step] The grass",
     "absorbs",
     ["the water before the sun evaporates it.", "the neighbours' cat.", "every book on the shelf.",
      "nothing at all, ever, under any circumstances whatsoever."], 0),
    ("Washing a car", "A car is parked in a driveway. A boy carries a bucket of soapy water toward it.", "the boy",
     ["flies away on the bucket.", "reads a newspaper on the roof.",
      "scrubs the doors with a sponge and rinses them with a hose.", "plants a tree in the bucket."], 2),
    ("Running a marathon", "Hundreds of runners gather at a starting line in a city street.", "a horn",
     ["sounds and the runners set off down the road.", "grows out of the ground.",
      "orders a pizza for the crowd.", "becomes a small river."], 0),
    ("Family Life", "[header] How to plan a picnic [title] Choose a park. [step] Look for one", "that",
     ["is close to home and has some shade.", "flies.", "speaks three languages fluently.",
      "was built on the moon in the year 3000."], 0),
]


def hellaswag_rows() -> list[dict]:
    return [dict(ind=i, activity_label=label, ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}", endings=endings,
                 source_id=f"local~{i}", split="val", split_type="indomain", label=str(gold))
            for i, (label, ctx_a, ctx_b, endings, gold) in enumerate(ITEMS)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """An include directory holding a local copy of the harness's hellaswag task, with its own process_docs."""
    directory = tmp_path_factory.mktemp("tasks")
    data = directory / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows()))
    write_local_task(directory, data, TASK)
    return directory


@pytest.fixture(autouse=True)
def local_tasks_only(monkeypatch):
    """The harness's task managers without its thousands of built-in tasks, whose index takes over ten
    seconds to build: what the tests run is the local task."""
    import lm_eval.tasks

    class LocalTaskManager(TaskManager):
        def __init__(self, **kwargs):
            super().__init__(include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)


@pytest.fixture(scope="module")
def model() -> GPT:
    """A random 2-layer GPT with a 64-token context (HellaSwag's items are cut from the left to fit), its
    weights large enough that its predictions are far from ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory) -> Path:
    return export_hf(model, tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def hf_lm(hf_dir):
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8)


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_local_hellaswag_scores_as_the_harness_hf_model_does(model, hf_dir, tasks, tmp_path, capsys):
    output = tmp_path / "results.json"
    ours = run_lm_eval(model, [TASK], include=tasks, output=output)
    printed = capsys.readouterr().out
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                                     tasks=[TASK], task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
                                     log_samples=False)
    ours_scores, their_scores = ours["results"][TASK], theirs["results"][TASK]
    assert ours["n-samples"][TASK]["effective"] == len(ITEMS)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours_scores[metric] == their_scores[metric], metric
    # A model that got every item right, or none, would agree whatever its scores; the log-likelihoods
    # themselves are compared in the next test.
    assert ours_scores["acc,none"] not in (0.0, 1.0) or ours_scores["acc_norm,none"] not in (0.0, 1.0)
    assert TASK in printed and "acc_norm" in printed
    saved = json.loads(output.read_text())
    assert saved["results"][TASK]["acc,none"] == ours_scores["acc,none"]
    assert saved["config"]["model_num_parameters"] == model.num_params()


def test_the_built_in_hellaswag_gives_the_harness_acc_and_acc_norm(model, tasks, tmp_path, capsys):
    from gpt2train import hellaswag

    bridged = run_lm_eval(model, [TASK], include=tasks, output=tmp_path / "results.json")["results"][TASK]
    counts = hellaswag.score(model, hellaswag.read_items(tasks / "hellaswag.jsonl"), torch.device("cpu"))
    assert counts.items == len(ITEMS)
    assert (counts.accuracies()["acc"], counts.accuracies()["acc_norm"]) == (bridged["acc,none"], bridged["acc_norm,none"])
    assert counts.acc_norm not in (0, len(ITEMS))  # agreement that means something
    # And item by item, the very tokens the harness's own task asks about (its text clean-up, its split).
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks))
    # Newer harnesses load tasks with load(), which replaced load_task_or_group().
    task = manager.load(TASK)["tasks"][TASK] if hasattr(manager, "load") else manager.load_task_or_group([TASK])[TASK]
    adapter = lm_eval_model(model)
    theirs = [tuple(map(tuple, adapter._encode_pair(task.doc_to_text(doc), " " + choice)))
              for doc in task.validation_docs() for choice in task.doc_to_choice(doc)]
    ours = hellaswag.requests(hellaswag.read_items(tasks / "hellaswag.jsonl"))
    assert [(r.context, r.continuation) for i, r in enumerate(ours) if i % 8 < 4] == theirs


def test_loglikelihoods_match_the_harness_hf_model(model, hf_lm):
    text = " ".join(row["ctx"] + " " + " ".join(row["endings"]) for row in hellaswag_rows())
    requests = [
        ("The quick brown fox", " jumps over the lazy dog."),
        ("A context with a trailing space ", "moves it into the continuation"),
        ("", "An empty context, scored after the end-of-text token."),
        (text, " and a context longer than the model's 64 positions, cut from the left."),
    ]
    ours = lm_eval_model(model).loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(ours, theirs, strict=True):
        assert our_logprob == pytest.approx(their_logprob, rel=1e-4, abs=1e-3)
        assert our_greedy == their_greedy

    texts = [("A short text.",), (text,)]  # the second takes several 64-token windows
    assert len(get_tokenizer().encode_ordinary(text)) > 3 * model.config.block_size
    ours = lm_eval_model(model).loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    theirs = hf_lm.loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_generate_until_stops_at_the_stop_strings_and_decodes_greedily(model, hf_lm):
    enc = get_tokenizer()
    prompt = "The quick brown fox"
    long_text = " ".join(row["ctx"] for row in hellaswag_rows())
    greedy = enc.decode(list(generate(model, enc.encode_ordinary(prompt), 30, temperature=0, top_k=None)))
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]  # text the greedy continuation reaches midway
    assert stop.strip() and len(greedy) > 10
    requests = [
        (prompt, {"until": [stop, "never in the text"], "max_gen_toks": 30, "do_sample": False}),
        (prompt, {"until": "never in the text", "max_gen_toks": 30}),
        (prompt, {"until": [], "max_gen_toks": 10, "do_sample": False, "temperature": 0.7}),
        (long_text, {"until": [], "max_gen_toks": 8}),  # the context cut to leave room for 8 new tokens
    ]
    ours = lm_eval_model(model).generate_until(instances("generate_until", requests), disable_tqdm=True)
    assert ours[0] == greedy[: greedy.index(stop)]
    assert ours[1] == greedy
    assert ours[2] == enc.decode(list(generate(model, enc.encode_ordinary(prompt), 10, temperature=0, top_k=None)))
    kept = enc.encode_ordinary(long_text)[-(model.config.block_size - 8) :]
    assert ours[3] == enc.decode(list(generate(model, kept, 8, temperature=0, top_k=None)))
    assert hf_lm.generate_until(instances("generate_until", requests), disable_tqdm=True) == ours


def cli_error(capsys, *argv) -> str:
    """The error `gpt2train ARGV` prints, which must be one line, with exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_writes_new_results_files_and_prints_the_table(model, tasks, tmp_path, monkeypatch, capsys):
    model_file = tmp_path / "final_model.pt"
    save_final_model(model, model_file, step=0, best_loss=0.0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda *_: "lm-eval-now")  # the same second for both runs
    argv = ["eval", "--model", model_file, "--device", "cpu", "--dtype", "float32", "--lm-eval", TASK,
            "--lm-eval-include", tasks, "--limit", "2"]
    for name in ("lm-eval-now.json", "lm-eval-now-1.json"):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        out = capsys.readouterr().out
        assert exit_.value.code == 0
        assert TASK in out and f"results: {name}" in out
        assert json.loads((tmp_path / name).read_text())["n-samples"][TASK]["effective"] == 2


def test_unknown_task_is_one_line(tasks, tmp_path, capsys):
    err = cli_error(capsys, "eval", "--model", tmp_path / "absent.pt", "--lm-eval", f"{TASK},hellaswag_lokal",
                    "--lm-eval-include", tasks)
    assert "'hellaswag_lokal'" in err and TASK in err and "list them with `lm_eval" in err


def test_bad_flags_are_one_line(tmp_path, capsys):
    assert "must not be negative" in cli_error(capsys, "eval", "--lm-eval", TASK, "--limit", "-1")
    assert "must not be negative" in cli_error(capsys, "eval", "--lm-eval", TASK, "--num-fewshot", "-1")
    assert "--num-fewshot apply to --lm-eval" in cli_error(capsys, "eval", "--num-fewshot", "5")
    assert "not a directory" in cli_error(capsys, "eval", "--lm-eval", TASK, "--lm-eval-include", tmp_path / "none")


def test_missing_harness_is_one_line_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    err = cli_error(capsys, "eval", "--lm-eval", TASK)
    assert "lm-evaluation-harness" in err and "-m pip install" in err and "lm_eval" in err


def test_harness_without_the_interface_is_one_line(monkeypatch, capsys):
    import lm_eval.api.model

    monkeypatch.delattr(lm_eval.api.model.TemplateLM, "_encode_pair")
    err = cli_error(capsys, "eval", "--lm-eval", TASK)
    assert f"not the installed {importlib.metadata.version('lm_eval')}" in err and f"{LOWEST_VERSION} or later" in err


def test_importing_gpt2train_does_not_import_the_harness():
    code = "import sys, gpt2train, gpt2train.cli, gpt2train.harness; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
