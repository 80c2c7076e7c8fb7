import errno
import io
import math
import pickle

import pytest
import torch
from helpers import tiny_config

from gpt2train import train
from gpt2train.checkpoint import (
    CHECKPOINT_FORMAT, find_checkpoint, latest_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint,
)
from gpt2train.errors import UserError


def contents(value=0.0):
    """A stand-in checkpoint body: every required key, with a tensor to tell versions apart."""
    return {"config": {}, "best_loss": value, "model": {"w": torch.full((4,), value)}, "optimizer": {}, "scaler": {},
            "rng": {}, "sampler": {}, "monitor": {}, "data": {}}


def test_checkpoints_are_numbered_listed_and_pruned(tmp_path):
    for step in (5, 10, 100, 1000):
        save_checkpoint(tmp_path, step, contents(step), keep=3)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000010.pt", "step_00000100.pt", "step_00001000.pt"]  # numeric order, newest 3
    assert latest_checkpoint(tmp_path).name == "step_00001000.pt"
    assert read_checkpoint(latest_checkpoint(tmp_path))["model"]["w"][0] == 1000


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path, small_corpus):
    config = tiny_config(tmp_path, small_corpus, max_steps=6, target_loss=0.0)
    result = train(config, log=lambda _: None)
    saved = torch.load(result.checkpoint_path, weights_only=True)  # raises if anything else is inside
    assert saved["format"] == CHECKPOINT_FORMAT and saved["step"] == 6 and saved["finished"] == "max_steps"
    assert saved["config"] == config.to_flat_dict()
    assert all(not key.startswith(("_orig_mod.", "module.")) for key in saved["model"])
    assert all(t.dtype == torch.float32 for t in saved["model"].values())
    assert set(saved["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert saved["optimizer"]["state"] and saved["sampler"]["rng"]["bit_generator"] == "PCG64"
    assert saved["best_loss"] == min(result.losses)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 10, contents(1.0), keep=2)
    real_save = torch.save

    def crash_halfway(obj, f):
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(UserError, match="No space left on device.*previous file, if any, is unchanged"):
        save_checkpoint(tmp_path, 20, contents(2.0), keep=2)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [first]  # no half-written step 20, no temp file named like one
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert read_checkpoint(first)["model"]["w"][0] == 1.0


def test_a_killed_writer_never_makes_a_partial_file_the_latest(tmp_path):
    first = save_checkpoint(tmp_path, 10, contents(1.0), keep=2)
    (tmp_path / "checkpoints" / ".step_00000020.pt.abc123.tmp").write_bytes(b"PK partial")  # what a kill leaves
    assert latest_checkpoint(tmp_path) == first
    assert find_checkpoint("latest", tmp_path) == first


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),
        (lambda b: b"", "truncated or corrupt"),
        (lambda b: b"\x00garbage" * 100, "truncated or corrupt"),
    ],
)
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, 1, contents(), keep=1)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(UserError, match="not a gpt2train training checkpoint"):
        read_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({**contents(), "format": CHECKPOINT_FORMAT, "format_version": 99, "step": 1}, newer)
    with pytest.raises(UserError, match="version 99"):
        read_checkpoint(newer)
    partial = tmp_path / "partial.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "step": 1, "model": {}}, partial)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        read_checkpoint(partial)


class RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, "payload": RunsCode()}, f, pickle_module=pickle)
    with pytest.raises(UserError, match="objects other than tensors"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_find_checkpoint_accepts_a_file_a_run_dir_or_its_checkpoints_dir(tmp_path):
    path = save_checkpoint(tmp_path / "run", 7, contents(), keep=1)
    assert find_checkpoint(str(path), "elsewhere") == path
    assert find_checkpoint(str(tmp_path / "run"), "elsewhere") == path
    assert find_checkpoint(str(tmp_path / "run" / "checkpoints"), "elsewhere") == path
    assert find_checkpoint("latest", tmp_path / "run") == path
    with pytest.raises(UserError, match="no checkpoint in"):
        find_checkpoint("latest", tmp_path / "empty")
    with pytest.raises(UserError, match="no such checkpoint file or run directory"):
        find_checkpoint(str(tmp_path / "missing.pt"), tmp_path)


def test_best_loss_survives_as_a_plain_float(tmp_path):
    save_checkpoint(tmp_path, 3, contents(math.inf), keep=1)
    assert read_checkpoint(latest_checkpoint(tmp_path))["best_loss"] == math.inf


def test_a_checkpoint_whose_bytes_changed_anywhere_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, contents(), keep=1)
    good = path.read_bytes()
    for at in (0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0):
        i = min(int(len(good) * at), len(good) - 1)
        path.write_bytes(good[:i] + bytes([good[i] ^ 0x80]) + good[i + 1 :])
        with pytest.raises(UserError, match="damaged|truncated or corrupt"):
            read_checkpoint(path)
    path.write_bytes(good[:-1])
    with pytest.raises(UserError, match="damaged|truncated or corrupt"):
        read_checkpoint(path)
    path.write_bytes(good)
    assert read_checkpoint(path)["step"] == 1


def test_a_checkpoint_written_before_checksums_still_resumes(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({**contents(), "format": CHECKPOINT_FORMAT, "format_version": 1, "step": 3}, old)  # no checksum
    assert read_checkpoint(old)["step"] == 3
    new = tmp_path / "new.pt"
    torch.save({**contents(), "format": CHECKPOINT_FORMAT, "format_version": 2, "step": 3}, new)
    with pytest.raises(UserError, match="carries no checksum"):
        read_checkpoint(new)
