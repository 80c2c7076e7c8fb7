"""Batches made ahead in a background thread, in pinned memory, so a GPU step never waits for data."""

from __future__ import annotations

import queue
import threading
import weakref

import torch

from ..data import Sampler

PUT_WAIT_SECONDS = 0.1  # how often a waiting producer checks whether it should stop


class Prefetcher:
    """Wraps a sampler: the same batches in the same order, `depth` of them made ahead.

    state_dict() describes the position before the next batch the caller will receive, not the
    sampler's own (which has run ahead), so a checkpoint resumes on exactly that batch.
    """

    def __init__(self, sampler: Sampler, depth: int = 2, pin_memory: bool | None = None):
        self.sampler = sampler
        self.depth = depth
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._state = sampler.state_dict()
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, y, self._state = item
        return x, y

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()  # batches made from the old position are dropped
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def close(self) -> None:
        """Stop the thread; the wrapped sampler may be used again (from a position set by load_state_dict)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._queue = self._stop = self._thread = None

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        # The thread holds no reference to self, so a dropped Prefetcher is collected and stops it.
        self._thread = threading.Thread(target=_produce, args=(self.sampler, self._queue, self._stop, self.pin_memory),
                                        daemon=True, name="gpt2train-prefetch")
        weakref.finalize(self, self._stop.set)
        self._thread.start()


def _produce(sampler: Sampler, out: queue.Queue, stop: threading.Event, pin_memory: bool) -> None:
    try:
        while not stop.is_set():
            x, y = sampler.next_batch()
            if pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            _put(out, (x, y, sampler.state_dict()), stop)
    except BaseException as e:  # handed to the training loop, which raises it
        _put(out, e, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=PUT_WAIT_SECONDS)
            return
        except queue.Full:
            pass
