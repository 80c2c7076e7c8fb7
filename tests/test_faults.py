"""The fault matrix: every place gpt2train writes, on a read-only location and on a full file system
(a real one: a small tmpfs, filled at the moment of the write under test). Each ends in one line that
names the path and what to do, with the documented exit status and no traceback; what existed before
is unchanged and loadable; and where the write is not essential (records, plot, caches), training
goes on. See docs/failures.md."""

import contextlib
import importlib
import shutil

import pytest
from helpers import (
    TINY_FLAGS, cli, damage, fill, flip, quiet, read_only, run_cli, small_file_system,
    snapshot, tiny_config,
)

from gpt2train import plot
from gpt2train.checkpoint import list_checkpoints, read_checkpoint
from gpt2train.config import load_toml
from gpt2train.corpus import load_corpus
from gpt2train.final_model import load_model, save_final_model
from gpt2train.metrics import read_metrics
from gpt2train.model import GPT, GPTConfig
from gpt2train.training.loop import Trainer

NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


def train_args(data, run_dir, out_dir, *more):
    return ["train", *TINY_FLAGS, "--data", data, "--run-dir", run_dir, "--out-dir", out_dir, "--target-loss", "0",
            "--log-interval", "1", "--warmup-steps", "1", *more]


def refused(code, out, err, *fragments):
    """One line on stderr, exit status 2, no traceback."""
    assert code == 2, out + err
    assert err.startswith("gpt2train") and err.count("\n") == 1 and "Traceback" not in out + err, err
    for fragment in fragments:
        assert fragment in err, err


def warned_once(code, out, err, fragment, status=3):
    """The run went on to its end (here: out of steps, status 3) and said `fragment` once."""
    assert code == status and err == "" and "Traceback" not in out, out + err
    assert out.count(fragment) == 1, out


def after_step(monkeypatch, **actions):
    """Run actions["at_N"]() once step N is read and recorded, before its checkpoint (if one is due)."""
    timed = Trainer._time

    def hooked(self, step, seconds, ends_here):
        timed(self, step, seconds, ends_here)
        if f"at_{step}" in actions:
            actions[f"at_{step}"]()

    monkeypatch.setattr(Trainer, "_time", hooked)


def after_filling(disk, function):
    """`function`, called once `disk` is full."""

    def filled_first(*args, **kwargs):
        fill(disk)
        return function(*args, **kwargs)

    return filled_first


def faulty(fault: str, location):
    """Where the fault is made: `location` made read-only, or nothing more (a disk already filled)."""
    return read_only(location) if fault == "read-only" else contextlib.nullcontext(location)


@pytest.fixture
def disk(tmp_path):
    """A 64 MB file system of its own: room for two of the tiny model's checkpoints, until filled."""
    with small_file_system(tmp_path / "disk", "64m") as mounted:
        yield mounted


# --- caches -------------------------------------------------------------------------------------------------

CACHED_RUN = ["train", *TINY_FLAGS, "--train-tokens", "4096", "--max-steps", "2", "--warmup-steps", "1", "--target-loss", "0",
              "--log-interval", "1"]


def test_a_read_only_cache_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch):
    """Also the regression test of a crash before the first step (torch._dynamo imported twice) with
    the cache on a read-only mount: a process of its own, since this one has imported torch._dynamo."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by the runs of this process before
    with read_only(tmp_path / "cache") as cache:
        result = run_cli(*CACHED_RUN, "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out",
                         env={"GPT2TRAIN_CACHE": str(cache)})
        assert list(cache.iterdir()) == []
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "step 2 |" in result.stdout
    assert result.stdout.count(f"compile cache not used: {cache / 'inductor'} cannot be written ({READ_ONLY})") == 1
    assert result.stdout.count(f"token cache not used: {cache / 'tokens'}") == 1
    assert f"could not be written ({READ_ONLY})" in result.stdout


def test_a_cache_path_that_cannot_be_created_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by the runs of this process before
    (tmp_path / "a_file").write_text("not a directory")
    cache = tmp_path / "a_file" / "cache"
    result = run_cli(*CACHED_RUN, "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out",
                     env={"GPT2TRAIN_CACHE": str(cache)})
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert result.stdout.count("compile cache not used") == 1 and result.stdout.count("token cache not used") == 1
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_a_full_token_cache_is_said_once_and_the_run_goes_on(disk, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2TRAIN_CACHE", str(disk))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by this run: restored after it
    (disk / "tokens").mkdir()
    fill(disk)
    code, out, err = cli(capsys, *CACHED_RUN, "--run-dir", tmp_path / "run", "--out-dir", tmp_path / "out")
    warned_once(code, out, err, f"token cache not used: {disk / 'tokens'}")
    assert f"could not be written ({NO_SPACE})" in out and "step 2 |" in out
    assert sorted(p.name for p in (disk / "tokens").iterdir()) == []  # no partial file


def test_a_failed_background_import_is_one_line_on_the_main_thread_and_never_tried_again(tmp_path, monkeypatch):
    from gpt2train.errors import UserError
    from gpt2train.runtime import import_in_background

    runs = tmp_path / "runs"
    (tmp_path / "half_imported.py").write_text(f"open({str(runs)!r}, 'a').write('ran\\n')\n"
                                               "raise OSError(30, 'Read-only file system')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"could not import half_imported \(OSError: \[Errno 30\] Read-only file "
                                        r"system\): check the torch installation") as raised:
        import_in_background("half_imported").join()
    assert "\n" not in str(raised.value) and isinstance(raised.value.__cause__, OSError)  # --debug shows it
    assert runs.read_text() == "ran\n"


def test_a_failed_plot_warm_up_is_one_line_at_the_plot(plotted_run, monkeypatch):
    from gpt2train.errors import UserError

    monkeypatch.setattr(plot, "_warm_up_failed", None)
    monkeypatch.setattr(plot, "_warming", None)
    monkeypatch.setattr(plot, "_save", lambda fig, f: (_ for _ in ()).throw(RuntimeError("no fonts\nat all")))
    plot.warm_up()
    with pytest.raises(UserError, match=r"^matplotlib failed to draw \(RuntimeError: no fonts\): draw the plot later "
                                        r"with `gpt2train plot "):
        plot.plot_run(plotted_run)


# --- the run directory: its lock, config.toml, metrics.jsonl, TensorBoard events, checkpoints, loss.png ------


def test_a_read_only_run_directory_is_refused_before_the_run_starts(tmp_path, small_corpus, capsys):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    code, _, _ = cli(capsys, *train_args(small_corpus, run_dir, out_dir, "--max-steps", "2"))
    assert code == 3
    before = snapshot(run_dir)
    with read_only(run_dir):
        code, out, err = cli(capsys, *train_args(small_corpus, run_dir, out_dir, "--max-steps", "4", "--resume"))
    refused(code, out, err, f"cannot write the checkpoints to {run_dir}", "choose another directory")
    assert snapshot(run_dir) == before
    assert read_checkpoint(list_checkpoints(run_dir)[-1])["step"] == 2


def test_a_read_only_output_directory_is_refused_and_its_final_model_kept(tmp_path, small_corpus, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), out_dir / "final_model.pt", 1, 1.0)
    before = snapshot(out_dir)
    with read_only(out_dir):
        code, out, err = cli(capsys, *train_args(small_corpus, tmp_path / "run", out_dir, "--overwrite"))
    refused(code, out, err, f"cannot write the final model to {out_dir}", "choose another directory")
    assert snapshot(out_dir) == before and load_model(out_dir / "final_model.pt")


def test_a_full_run_directory_at_the_start_loses_the_records_only(disk, small_corpus, capsys, monkeypatch):
    """The lock, config.toml and metrics.jsonl find no room; the run trains, and its checkpoint is
    written once there is room again."""
    filler = fill(disk)
    after_step(monkeypatch, at_1=filler.unlink)
    code, out, err = cli(capsys, *train_args(small_corpus, disk / "run", disk / "out", "--max-steps", "3"))
    warned_once(code, out, err, f"warning: records not kept from here on (could not write {disk / 'run'}/")
    assert NO_SPACE in out and "free some space there" in out and "step 3 |" in out
    assert read_checkpoint(list_checkpoints(disk / "run")[-1])["step"] == 3
    assert not [p for p in (disk / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a thread's traceback fails it
def test_a_full_disk_while_recording_keeps_every_whole_record(disk, small_corpus, capsys, monkeypatch):
    """metrics.jsonl's appends go on in the room its last block has; the first that finds none is
    undone, the records stop there, and the run goes on. The same for the TensorBoard events."""
    pytest.importorskip("torch.utils.tensorboard")
    run_dir = disk / "run"
    filled = []
    after_step(monkeypatch, at_2=lambda: filled.append(fill(disk)), at_40=lambda: filled[0].unlink())
    code, out, err = cli(capsys, *train_args(small_corpus, run_dir, disk / "out", "--max-steps", "42", "--tensorboard"))
    warned_once(code, out, err, f"warning: metrics not kept from here on (could not write {run_dir / 'metrics.jsonl'}: "
                                f"{NO_SPACE}")
    assert out.count("warning: TensorBoard events not kept from here on (") == 1
    records = read_metrics(run_dir)  # every line whole: the file loads
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and 2 <= len(records) < 40
    assert load_toml(run_dir / "config.toml")["max_steps"] == 42
    assert "step 42 |" in out and read_checkpoint(list_checkpoints(run_dir)[-1])["step"] == 42


def test_a_periodic_checkpoint_that_finds_the_disk_full_is_tried_again_at_the_next(disk, small_corpus, capsys,
                                                                                     monkeypatch):
    run_dir = disk / "run"
    filled = []
    after_step(monkeypatch, at_3=lambda: filled.append(fill(disk)), at_5=lambda: filled[0].unlink())
    code, out, err = cli(capsys, *train_args(small_corpus, run_dir, disk / "out", "--max-steps", "8",
                                             "--checkpoint-interval", "2", "--log-interval", "100"))
    first = run_dir / "checkpoints" / "step_00000002.pt"
    warned_once(code, out, err, f"warning: could not write the checkpoint of step 4 ({NO_SPACE}): free some space "
                                f"there, or write elsewhere; training goes on and tries again at the next checkpoint, "
                                f"and until one is written a stop or a crash goes back to {first}")
    assert "checkpoint saved: " + str(run_dir / "checkpoints" / "step_00000006.pt") in out
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006.pt", "step_00000008.pt"]
    assert read_checkpoint(list_checkpoints(run_dir)[-1])["step"] == 8
    assert not list((run_dir / "checkpoints").glob(".*"))  # no partial file


def test_a_checkpoint_at_the_end_that_finds_the_disk_full_says_what_is_lost(disk, small_corpus, capsys,
                                                                            monkeypatch):
    run_dir = disk / "run"
    after_step(monkeypatch, at_3=lambda: fill(disk))
    code, out, err = cli(capsys, *train_args(small_corpus, run_dir, disk / "out", "--max-steps", "4",
                                             "--checkpoint-interval", "2", "--log-interval", "100"))
    first = run_dir / "checkpoints" / "step_00000002.pt"
    refused(code, out, err, f"could not write the checkpoint of step 4 ({NO_SPACE}), so the training since the last "
                            f"one is lost: free some space, then resume from the last checkpoint written ({first})")
    assert [p.name for p in list_checkpoints(run_dir)] == [first.name] and read_checkpoint(first)["step"] == 2


def test_a_target_checkpoint_that_finds_the_disk_full_leaves_the_final_model(tmp_path, small_corpus, capsys):
    """The final model (3.2 MB) fits; its checkpoint (19.5 MB) does not."""
    with small_file_system(tmp_path / "small", "12m") as small:
        code, out, err = cli(capsys, "train", *TINY_FLAGS, "--data", small_corpus, "--run-dir", small / "run",
                             "--out-dir", tmp_path / "out", "--target-loss", "100")
        assert list_checkpoints(small / "run") == []
    assert code == 0 and err == "" and "Traceback" not in out, out + err
    assert out.count(f"warning: could not write the checkpoint of step 1 ({NO_SPACE})") == 1
    assert load_model(tmp_path / "out" / "final_model.pt")


def test_a_plot_that_finds_the_disk_full_is_said_and_the_run_ends_as_it_would(disk, small_corpus, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(plot, "plot_run", after_filling(disk, plot.plot_run))
    code, out, err = cli(capsys, *train_args(small_corpus, disk / "run", disk / "out", "--max-steps", "2"))
    warned_once(code, out, err, f"loss plot not drawn: could not write {disk / 'run' / 'loss.png'}: {NO_SPACE}")
    assert not (disk / "run" / "loss.png").exists() and read_checkpoint(list_checkpoints(disk / "run")[-1])


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory, small_corpus):
    """A run directory with its loss.png (shared: copied before use)."""
    tmp = tmp_path_factory.mktemp("plotted")
    quiet(tiny_config(tmp, small_corpus, max_steps=2, warmup_steps=1, target_loss=0.0, log_interval=1))
    assert (tmp / "run" / "loss.png").is_file()
    return tmp / "run"


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_plot_onto_a_location_it_cannot_write_keeps_the_earlier_plot(fault, plotted_run, tmp_path, capsys):
    with small_file_system(tmp_path / "disk", "64m") as disk:
        shutil.copytree(plotted_run, disk / "run")
        before = snapshot(disk / "run")
        if fault == "full":
            fill(disk)
        with faulty(fault, disk / "run"):
            code, out, err = cli(capsys, "plot", disk / "run")
        refused(code, out, err, f"could not write {disk / 'run' / 'loss.png'}: ",
                READ_ONLY if fault == "read-only" else NO_SPACE)
        (disk / ".filler").unlink(missing_ok=True)
        assert snapshot(disk / "run") == before


# --- prepare, export and downloads: what they replace stays whole --------------------------------------------


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_prepare_onto_a_location_it_cannot_write_keeps_the_earlier_data(fault, tmp_path, small_corpus, capsys):
    (tmp_path / "more.txt").write_text("Other words, many of them. " * 2000)
    with small_file_system(tmp_path / "disk", "8m") as disk:
        shutil.copytree(small_corpus, disk / "data")
        before = snapshot(disk / "data")
        if fault == "full":
            fill(disk)
        with faulty(fault, disk):
            code, out, err = cli(capsys, "prepare", tmp_path / "more.txt", "--out", disk / "data", "--overwrite")
        if fault == "read-only":
            refused(code, out, err, f"cannot write the prepared data to {disk / 'data'}", "choose another directory")
        else:
            refused(code, out, err, f"could not write the prepared data to {disk / 'data'}: {NO_SPACE}; free some "
                                    "space or choose another --out")
        assert snapshot(disk / "data") == before and len(load_corpus(str(disk / "data")).train) > 0


def test_a_full_disk_at_the_manifest_keeps_the_earlier_data(tmp_path, small_corpus, capsys, monkeypatch):
    """The shards fit; the manifest, the last file written, does not."""
    preparing = importlib.import_module("gpt2train.prepare")  # the package's `prepare` is the function

    (tmp_path / "more.txt").write_text("Other words, many of them. " * 200)
    with small_file_system(tmp_path / "disk", "8m") as disk:
        shutil.copytree(small_corpus, disk / "data")
        before = snapshot(disk / "data")
        monkeypatch.setattr(preparing, "atomic_write", after_filling(disk, preparing.atomic_write))
        code, out, err = cli(capsys, "prepare", tmp_path / "more.txt", "--out", disk / "data", "--overwrite")
        refused(code, out, err, f"could not write the prepared data to {disk / 'data'}: {NO_SPACE}")
        assert snapshot(disk / "data") == before and len(load_corpus(str(disk / "data")).train) > 0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "final_model.pt"
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), path, 1, 1.0)
    return path


@pytest.mark.parametrize("format", ["hf", "pt"])
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_export_onto_a_location_it_cannot_write_keeps_the_earlier_export(fault, format, model_file, tmp_path, capsys):
    with small_file_system(tmp_path / "disk", "16m") as disk:
        out = disk / ("hf" if format == "hf" else "model.pt")
        code, _, err = cli(capsys, "export", "--model", model_file, "--format", format, "--out", out)
        assert code == 0, err
        before = snapshot(disk)
        if fault == "full":
            fill(disk)
        with faulty(fault, disk):
            code, out_text, err = cli(capsys, "export", "--model", model_file, "--format", format, "--out", out,
                                      "--overwrite")
        refused(code, out_text, err, READ_ONLY if fault == "read-only" else NO_SPACE,
                "is unchanged", "write elsewhere")
        (disk / ".filler").unlink(missing_ok=True)
        assert snapshot(disk) == before
        assert load_model(out)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_download_onto_a_location_it_cannot_write_says_so(fault, server, tmp_path, capsys):
    server.files["/big.txt"] = b"Many words to download. " * 200_000  # 4.8 MB
    server.files["/small.txt"] = b"A few words. " * 100
    url = f"http://127.0.0.1:{server.server_port}"
    with small_file_system(tmp_path / "disk", "4m") as disk:
        code, _, err = cli(capsys, "prepare", f"{url}/small.txt", "--out", tmp_path / "first", "--cache-dir", disk,
                           "--val-fraction", "0")
        assert code == 0, err
        before = snapshot(disk)
        with faulty(fault, disk):
            code, out, err = cli(capsys, "prepare", f"{url}/big.txt", "--out", tmp_path / "data", "--cache-dir", disk)
        refused(code, out, err, f"cannot write the download of {url}/big.txt to {disk}: ",
                READ_ONLY if fault == "read-only" else NO_SPACE, "choose another --cache-dir")
        assert {name: facts for name, facts in snapshot(disk).items() if not name.endswith(".partial")} == before
        assert not (tmp_path / "data").exists()


# --- damaged inputs: refused or rebuilt in one line, never loaded silently ------------------------------------

DAMAGES = {"truncated": lambda path: damage(path, lambda b: b[: len(b) * 2 // 3]),
           "bit-flipped": lambda path: flip(path, 0.6)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, small_corpus):
    """A run of 4 steps (a checkpoint, metrics.jsonl) and final models in both formats (shared: copied before use)."""
    root = tmp_path_factory.mktemp("written")
    shutil.copytree(small_corpus, root / "data")
    quiet(tiny_config(root, root / "data", max_steps=4, warmup_steps=1, target_loss=0.0, log_interval=1))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    for name in ("final_model.pt", "final_model.safetensors"):
        save_final_model(model, root / name, 1, 1.0)
    return root


@pytest.fixture
def copy(written, tmp_path, monkeypatch):
    shutil.copytree(written, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# file -> (the file in a copy of `written`, the command that reads it, what its one line says)
DAMAGED = {
    "shard": (lambda w: w / "data" / "train_000000.bin", lambda w: train_args(w / "data", w / "r", w / "o"),
              "token file"),
    "manifest": (lambda w: w / "data" / "manifest.json", lambda w: train_args(w / "data", w / "r", w / "o"),
                 "manifest.json"),
    "checkpoint": (lambda w: list_checkpoints(w / "run")[-1], lambda w: ["train", "--resume", w / "run",
                                                                         "--max-steps", "6"], "step_00000004.pt"),
    "final model": (lambda w: w / "final_model.pt", lambda w: ["sample", "--model", w / "final_model.pt"],
                    "final_model.pt"),
    "safetensors final model": (lambda w: w / "final_model.safetensors",
                                lambda w: ["eval", "--model", w / "final_model.safetensors", "--data", w / "data"],
                                "final_model.safetensors"),
    "metrics file": (lambda w: w / "run" / "metrics.jsonl", lambda w: ["plot", w / "run"], "metrics.jsonl is damaged"),
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("what", DAMAGED)
def test_a_damaged_file_is_refused_in_one_line(what, how, copy, capsys):
    where, command, named = DAMAGED[what]
    if what == "safetensors final model":
        pytest.importorskip("safetensors")
    DAMAGES[how](where(copy))
    before = snapshot(copy)
    code, out, err = cli(capsys, *command(copy))
    refused(code, out, err, named)
    assert snapshot(copy) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_a_resumed_run_keeps_the_readable_records_of_a_damaged_metrics_file(how, copy, capsys):
    metrics = copy / "run" / "metrics.jsonl"
    DAMAGES[how](metrics)
    code, out, err = cli(capsys, "train", "--resume", copy / "run", "--max-steps", "6")
    warned_once(code, out, err, f"{metrics} was damaged (1 line(s) not records, the first: line ")
    steps = [r["step"] for r in read_metrics(copy / "run")]
    assert steps == sorted(set(steps)) and steps[-2:] == [5, 6] and len(steps) < 6  # the damaged record dropped


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_token_cache_is_tokenized_again_and_said_once(how, tmp_path, monkeypatch):
    import gpt2train.corpus as corpus
    from gpt2train.sources import Fragment, Source

    monkeypatch.setenv("GPT2TRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "builtin_source", lambda: Source(None, lambda: iter([Fragment("Some words. " * 300,
                                                                                            True)])))
    first = load_corpus()
    [file] = (tmp_path / "tokens").iterdir()
    DAMAGES[how](file)
    again = load_corpus()
    assert again.note.startswith(f"token cache {file} ") and again.note.endswith("the corpus was tokenized again")
    assert again.train.read(0, len(again.train)).tolist() == first.train.read(0, len(first.train)).tolist()
    assert first.note is None and load_corpus().note is None  # replaced by a whole file
