"""What the benchmark scripts share: gpt2train's processes run from this checkout, each output line
stamped with the seconds since launch, so that the time to any line (the time to target is the time
to TARGET_LINE) is read from the same record as the line itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_LINE = "Target loss achieved!"
TIMED_OUT = 124  # timeout(1)'s status, so that a command stopped at its limit reads as it would in a shell


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a timed process: this checkout's gpt2train first on the path (absolute, since
    runs start in directories of their own), and output unbuffered, so that a line is stamped when printed."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


class Launched:
    """A command running in a process group of its own, its output read by a thread as it comes: each
    line stamped with the seconds since launch, and written to `log` (when given) as `%8.2f LINE`.
    stderr goes with stdout, or to the file `stderr`. `timeout` (seconds) is the limit `wait` holds it to."""

    def __init__(self, command: list, *, cwd: Path | None = None, env: dict | None = None, log: Path | None = None,
                 stderr: Path | None = None, timeout: float | None = None):
        self.lines: list[tuple[float, str]] = []
        self.exit_s: float | None = None
        self._ended = False
        self._new_line = threading.Condition()
        self._log = open(log, "w") if log else None  # closed by wait
        self._stderr = open(stderr, "w") if stderr else None
        self.started = time.perf_counter()
        self.deadline = None if timeout is None else self.started + timeout
        # A process group of its own: the limit and kill reach its compile workers too, which would otherwise
        # hold the output pipe open after it.
        self.proc = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env or child_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=self._stderr or subprocess.STDOUT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            seconds = time.perf_counter() - self.started
            with self._new_line:
                self.lines.append((seconds, line))
                self._new_line.notify_all()
            if self._log:
                self._log.write(f"{seconds:8.2f} {line}")
                self._log.flush()
        with self._new_line:
            self._ended = True
            self._new_line.notify_all()

    @property
    def text(self) -> str:
        """The output so far, unstamped."""
        return "".join(line for _, line in self.lines)

    def first(self, prefix: str | tuple[str, ...]) -> float | None:
        """Seconds from launch to the first line starting with `prefix`; None if none has."""
        return next((seconds for seconds, line in self.lines if line.startswith(prefix)), None)

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Whether a line matching `pattern` is printed within `timeout` seconds (False as soon as the
        output ends without one)."""
        found, deadline, seen = re.compile(pattern), time.perf_counter() + timeout, 0
        with self._new_line:
            while True:
                if any(found.search(line) for _, line in self.lines[seen:]):
                    return True
                seen = len(self.lines)
                left = deadline - time.perf_counter()
                if self._ended or left <= 0:
                    return False
                self._new_line.wait(left)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self) -> int:
        """The exit status; TIMED_OUT where the limit ran out first: then the group gets SIGTERM, and
        SIGKILL 10 s later."""
        try:
            status = self.proc.wait(None if self.deadline is None else max(0.0, self.deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
            status = TIMED_OUT
        self.exit_s = time.perf_counter() - self.started
        self._reader.join(10)
        if self._reader.is_alive():  # something it started outlived it, holding the pipe open
            self._signal(signal.SIGKILL)
            self._reader.join()
        for file in (self.proc.stdout, self._log, self._stderr):
            if file:
                file.close()
        return status

    def _signal(self, number: int) -> None:
        try:
            os.killpg(self.proc.pid, number)
        except ProcessLookupError:  # the whole group has ended
            pass
