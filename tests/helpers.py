"""What the tests share: the tiny model, small corpora, and ways to run gpt2train and read what it prints."""

import contextlib
import errno
import hashlib
import http.server
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2train.config import resolve_config
from gpt2train.training.report import parse_step_lines

# A paragraph of real English: enough distinct tokens to be a corpus, small enough to memorise.
SMALL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. To be or not to be, that is the question. All that glitters is not gold. "
    "The early bird catches the worm, but the second mouse gets the cheese.\n"
)

# A model small enough to train in seconds on a CPU, and its run. Device and dtype are pinned: `--dtype
# auto` is bf16 on CPUs with AMX or AVX-512 BF16 and fp32 elsewhere, and the tests compare numbers.
TINY = dict(device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=32, block_size=32, seq_len=32, batch_size=4,
            lr=1e-2, min_lr=1e-3, warmup_steps=5)
# The same as command-line flags.
TINY_FLAGS = [item for key, value in TINY.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def logged_losses(stdout: str) -> dict[int, tuple[str, str]]:
    """step -> (loss, best_loss) as printed."""
    return {s.step: (s.loss, s.best_loss) for s in parse_step_lines(stdout)}


def quiet(config):
    """train(config) without its log lines."""
    from gpt2train import train

    return train(config, log=lambda _: None)


def prepare_small_corpus(directory: Path) -> Path:
    from gpt2train import prepare

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text(SMALL_TEXT * 3)
    prepare([str(directory / "corpus.txt")], directory / "data")
    return directory / "data"


def tiny_config(tmp_path, data_dir, **overrides):
    """A model small enough that a test trains it in seconds on a CPU, in fp32 whatever the CPU; all files
    under tmp_path."""
    values = dict(
        TINY, max_steps=300, target_loss=1.0, log_interval=10, data=str(data_dir), out_dir=str(tmp_path / "out"),
        run_dir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return resolve_config(overrides=values)


def run_cli(*args, cwd=None, timeout=600, env=None):
    """`python -m gpt2train ARGS` in a subprocess, as a user runs it (with `env` added to the environment)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpt2train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_and_wait_for(command: list, pattern: str, env: dict | None = None):
    """Start COMMAND; return the process and its output so far once a line of it matches `pattern`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([str(c) for c in command], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return proc, seen
    proc.wait()
    pytest.fail(f"the run ended before printing {pattern!r}:\n{''.join(seen)}{proc.stderr.read()}")


def cli(capsys, *args):
    """`gpt2train ARGS` in this process: (exit status, stdout, stderr)."""
    from gpt2train.cli import main

    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def snapshot(directory: Path) -> dict:
    """Every file below `directory` with its size, modification time and content hash."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def damage(path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


def flip(path, at: float) -> None:
    """Invert 8 bytes at a fraction `at` of the way through the file."""
    data = bytearray(path.read_bytes())
    start = min(int(len(data) * at), len(data) - 8)
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    path.write_bytes(bytes(data))


def final_model_without_run(path) -> dict:
    """A final model's contents less the record of the run that wrote it: what two runs that trained
    the same model have in common, bit for bit."""
    import torch

    contents = torch.load(path, weights_only=True)
    del contents["run"]
    contents["model_state_dict"] = {k: (v.dtype, tuple(v.shape), v.numpy().tobytes())
                                    for k, v in contents["model_state_dict"].items()}
    return contents


# Three items in HellaSwag's JSONL layout: a WikiHow one with the bracketed artifacts lm-evaluation-harness
# removes, and endings whose characters and UTF-8 bytes differ.
HELLASWAG_ITEMS = [
    dict(ind=0, activity_label="Removing ice from car", ctx_a="Then, the man writes over the snow covering the "
         "window of a car, and a woman wearing winter clothes smiles.", ctx_b="then",
         ctx="Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
             "smiles. then",
         endings=[", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
                  ", the man puts on a christmas coat, knitted with netting.",
                  ", the man continues removing the snow on his car."],
         source_id="activitynet~v_-1IBHYS3L-Y", split="val", split_type="indomain", label=3),
    dict(ind=1, activity_label="Baking cookies", ctx_a="A woman mixes flour and sugar in a bowl.", ctx_b="she",
         ctx="A woman mixes flour and sugar in a bowl. she",
         endings=["adds two eggs and stirs the batter.", "drives the café's car to the naïve dog park.",
                  "plays the piano in the garden.", "throws the bowl at the ceiling."],
         source_id="activitynet~v_bake", split="val", split_type="zeroshot", label=0),
    dict(ind=2, activity_label="Personal Care and Style", ctx_a="[header] How to tie a tie [title] Drape the tie "
         "around your neck.", ctx_b="the wide end",
         ctx="[header] How to tie a tie [title] Drape the tie around your neck. the wide end",
         endings=["should hang lower than the narrow end.", "is eaten by the cat.",
                  "flies to the moon [step] Really.", "becomes a bicycle."],
         source_id="wikihow~1", split="val", split_type="indomain", label=0),
]


def write_hellaswag(path: Path, items=None) -> Path:
    """A HellaSwag JSONL file of `items` (default: HELLASWAG_ITEMS)."""
    import json

    path.write_text("".join(json.dumps(item) + "\n" for item in (items or HELLASWAG_ITEMS)), encoding="utf-8")
    return path


@contextlib.contextmanager
def small_file_system(path, size: str):
    """A tmpfs of `size` mounted at `path` (needs root; skips without)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        unmount(path)


def unmount(path) -> None:
    """Unmount `path`; one that a failed test left a file open on is detached all the same, and the
    failure reported."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)
        pytest.fail(f"a file was left open on {path}")


@contextlib.contextmanager
def read_only(path):
    """`path`, a directory, made read-only with what it holds: a read-only bind mount of itself when
    run as root (whom permissions do not stop), else its permissions; skips where neither works."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    for command in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
        mounted = subprocess.run(command, capture_output=True)
        if mounted.returncode != 0:
            if command[1] != "--bind":
                subprocess.run(["umount", str(path)])
            pytest.skip(f"cannot mount a read-only directory here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        unmount(path)


def fill(file_system: Path) -> Path:
    """Take every free byte of `file_system` with a file of its own (delete it to free them)."""
    filler = file_system / ".filler"
    with open(filler, "ab", buffering=0) as f:
        for block in (2**20, 4096):
            try:
                while True:
                    f.write(bytes(block))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files, honouring `Range: bytes=N-` as a download resume sends it."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        asked = self.headers.get("Range")
        self.server.requests.append((self.path, asked))
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        try:
            self.wfile.write(body[start:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (a full or read-only disk): not the server's error to print

    def log_message(self, *args):
        pass

