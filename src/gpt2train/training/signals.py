"""Stop signals turned into a request to stop cleanly, after the current step and a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequests:
    """Turns SIGINT and SIGTERM into a request to stop after the current step.

    The training loop polls `signal_number`; a second Ctrl-C stops at once (KeyboardInterrupt).
    Handlers are only installed from the main thread, and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after this step to save a checkpoint "
            "(press Ctrl-C again to quit without saving)",
            file=sys.stderr,
            flush=True,
        )
