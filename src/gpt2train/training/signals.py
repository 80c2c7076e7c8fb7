"""Stop signals turned into a request to stop cleanly, after the current step and a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequests:
    """Turns SIGINT, SIGTERM and SIGHUP (a closed terminal) into a request to stop after the current
    step, and so does `request` (output into a closed pipe).

    The training loop polls `signal_number`; a second Ctrl-C stops at once (KeyboardInterrupt).
    Handlers are only installed from the main thread, and restored on exit.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

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
        self.request(signum, f"{signal.Signals(signum).name} received")

    def request(self, signum: int, why: str) -> None:
        """Stop after this step, as if `signum` had arrived, saying `why` on stderr."""
        self.signal_number = signum
        try:
            print(f"\n{why}: stopping after this step to save a checkpoint (press Ctrl-C again to quit without "
                  "saving)", file=sys.stderr, flush=True)
        except OSError:  # stderr is gone too
            pass
