"""Progress on stderr: one status line redrawn in place for long steps such as prepare and downloads
(`Progress`), eval's progress (`ProgressLines`), and durations written for people (`format_duration`)."""

from __future__ import annotations

import sys
import time

# Off a terminal, a long job's progress is printed as lines once it has run this long.
PROGRESS_AFTER_SECONDS = 5.0


def format_duration(seconds: float) -> str:
    """A duration for people: "45 s", "12.5 min", "3.2 h", "4.1 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Progress:
    """Redraws `label: detail | MB | MB/s | ETA` at most twice a second; does nothing unless enabled.

    The speed is of the bytes processed; the ETA compares the input bytes consumed with
    `total_bytes` (unknown for a streamed dataset: no ETA).
    """

    INTERVAL = 0.5

    def __init__(self, label: str, total_bytes: int | None, enabled: bool):
        self.label = label
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.width = 0

    def update(self, detail: str, done_bytes: int, input_bytes: int | None = None, force: bool = False) -> None:
        """`done_bytes` processed so far; `input_bytes` of the input consumed (default: the same)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self.drawn_at < self.INTERVAL):
            return
        self.drawn_at = now
        elapsed = max(now - self.started, 1e-9)
        line = f"{self.label}: {detail + ' | ' if detail else ''}{done_bytes / 1e6:,.1f} MB | {done_bytes / 1e6 / elapsed:.1f} MB/s"
        consumed = done_bytes if input_bytes is None else input_bytes
        if self.total_bytes and consumed:
            line += f" | ETA {format_duration(elapsed * max(self.total_bytes - consumed, 0) / consumed)}"
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


class ProgressLines:
    """`eval`'s progress on stderr: redrawn in place on a terminal; elsewhere, once the job has taken a
    while, a line every tenth of the way."""

    def __init__(self, unit: str):
        self.unit, self.terminal, self.said, self.started = unit, sys.stderr.isatty(), 0, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        line = f"eval: {done / total:4.0%} ({done:,}/{total:,} {self.unit})"
        if self.terminal:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.started > PROGRESS_AFTER_SECONDS and done * 10 // total > self.said:
            self.said = done * 10 // total
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.terminal:
            print(file=sys.stderr)
