"""Which files answer each of the three questions in docs/architecture.md, measured rather than read:
a tiny run on the CPU, traced call by call (sys.setprofile), prints for each question the gpt2train
files its code runs through. Those that pass the question on (call another gpt2train file, other
than back into one already running further up, as a callback does) come first: they are the files a
reader follows it through. The rest answer alone (a value, a line, a record).

    .venv/bin/python scripts/questions.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import gpt2train
from gpt2train import prepare, train
from gpt2train.config import resolve_config

ROOT = Path(gpt2train.__file__).parent
TINY = dict(device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=32, block_size=32, seq_len=32, batch_size=4,
            warmup_steps=1, log_interval=1)


class Trace:
    """The gpt2train files called while a frame of one of `roots` (file, function) is on the stack and
    none of `outside`, from the `skip`+1-th call of `start` on, and which file passed each call on."""

    def __init__(self, roots, outside=(), start=None, skip=0):
        self.roots, self.outside, self.start, self.skip = set(roots), set(outside), start, skip
        self.files: set[str] = set()
        self.passed_on: set[str] = set()

    def __call__(self, frame, event, arg):
        if event != "call" or (callee := _name(frame)) is None:
            return
        if (callee, frame.f_code.co_name) == self.start:
            self.skip -= 1
        if self.start is not None and self.skip >= 0 or not self._inside(frame):
            return
        self.files.add(callee)
        caller = frame.f_back
        while caller is not None and _name(caller) is None:  # through torch (Module.__call__) to gpt2train
            caller = caller.f_back
        if caller is not None and _name(caller) != callee and not _above(caller, callee):
            self.passed_on.add(_name(caller))

    def _inside(self, frame) -> bool:
        while frame is not None:
            where = (_name(frame), frame.f_code.co_name)
            if where in self.outside:
                return False
            if where in self.roots:
                return True
            frame = frame.f_back
        return False

    def __enter__(self):
        sys.setprofile(self)
        threading.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)

    def line(self, question: str) -> str:
        passing = sorted(self.passed_on & self.files)
        answering = sorted(self.files - set(passing))
        return (f"{question}: {len(self.files)} files; passing it on ({len(passing)}): {', '.join(passing)}; "
                f"answering alone ({len(answering)}): {', '.join(answering)}")


def _above(frame, file: str) -> bool:
    """Whether `file` is running further up the stack than `frame`: a call into it from `frame` is a
    callback (a function or a stream that file handed down), which sends the reader nowhere new."""
    frame = frame.f_back
    while frame is not None:
        if _name(frame) == file:
            return True
        frame = frame.f_back
    return False


def _name(frame) -> str | None:
    try:
        return Path(frame.f_code.co_filename).relative_to(ROOT).as_posix()
    except ValueError:
        return None


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
        data = tmp / "data"
        prepare([str(tmp / "text.txt")], data)

        def run(name: str, **settings):
            values = {**TINY, "data": str(data), "run_dir": str(tmp / name), "out_dir": str(tmp / name / "out"),
                      **settings}
            return train(resolve_config(overrides=values), log=lambda line: None)

        # One step, steady (from the second on), with a validation; its end and checkpoints are the others'.
        loop_end = [("training/loop.py", "_end"), ("training/loop.py", "close"), ("training/signals.py", "__exit__")]
        with Trace([("training/loop.py", "run")], outside=loop_end,
                   start=("training/step.py", "push"), skip=1) as step:
            run("step", max_steps=4, eval_interval=2, checkpoint_interval=1000, target_loss=0.0)
        print(step.line("one step"))

        saves = [("training/checkpoints.py", name) for name in ("due", "save_after", "save_at_end")]
        with Trace(saves) as checkpoint:
            run("resumed", max_steps=4, checkpoint_interval=2, eval_interval=0, target_loss=0.0)
            run("target", max_steps=4, eval_interval=0, target_loss=100.0)
        print(checkpoint.line("a checkpoint"))

        with Trace([("training/resume.py", "resolve_run"), ("training/checkpoints.py", "restore")]) as resume:
            run("resumed", max_steps=6, checkpoint_interval=2, eval_interval=0, target_loss=0.0, resume="latest")
        print(resume.line("--resume"))


if __name__ == "__main__":
    main()
