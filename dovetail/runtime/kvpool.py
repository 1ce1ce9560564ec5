"""Room in the target's KV cells, reserved per request before it starts.

A llama.cpp target keeps every open request in one pool of KV cells (Handshake.kv_cells).
Checking each request against the whole pool alone lets four ordinary 3k-token prompts into
8192 cells, and the one that finds no room fails halfway. So a request reserves its prompt,
its output and one draft tree's rows before it starts, and waits, first come first served,
until that much is free: capacity, not a fault. What can never fit is refused at once.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager

from dovetail.runtime.requests import CoordinatorBusy

WAIT_SLICE_S = 0.05  # how often a waiting request checks its cancel event


class ContextTooLong(ValueError):
    """The request needs more positions or KV cells than the target has: it can never run."""


class KVPool:
    """``cells``: the pool (0: no shared pool, reservations always succeed at once)."""

    def __init__(self, cells: int, queue_timeout_s: float):
        self.cells, self.queue_timeout_s = cells, queue_timeout_s
        self.reserved = 0
        self._cv = threading.Condition()
        self._queue: deque[int] = deque()  # tickets of the requests waiting, in arrival order
        self._tickets = itertools.count()

    def check(self, need: int) -> None:
        """Refuse a request that would not fit an empty pool."""
        if self.cells and need > self.cells:
            raise ContextTooLong(f"the request needs {need} KV cells (prompt, output and one draft tree) and the "
                                 f"target has {self.cells} in all: shorten the prompt, lower max_tokens, or raise "
                                 "--llama-ctx")

    @contextmanager
    def reserve(self, need: int, cancel: threading.Event | None = None):
        """Hold ``need`` cells while the body runs; yields False (nothing held) when ``cancel``
        is set while waiting. Waits in turn, at most queue_timeout_s (then CoordinatorBusy)."""
        if not self.cells:
            yield True
            return
        self.check(need)
        granted = self._wait(need, cancel)
        try:
            yield granted
        finally:
            if granted:
                with self._cv:
                    self.reserved -= need
                    self._cv.notify_all()

    def _wait(self, need: int, cancel: threading.Event | None) -> bool:
        ticket = next(self._tickets)
        deadline = time.monotonic() + self.queue_timeout_s
        with self._cv:
            self._queue.append(ticket)
            try:
                # First come, first served: a long prompt at the head is not overtaken forever
                # by short ones that happen to fit.
                while not (self._queue[0] == ticket and self.reserved + need <= self.cells):
                    if cancel is not None and cancel.is_set():
                        return False
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CoordinatorBusy(f"no room in the target's {self.cells} KV cells for {need} more within "
                                              f"{self.queue_timeout_s:g} s ({self.reserved} reserved by the requests "
                                              "running)")
                    self._cv.wait(min(left, WAIT_SLICE_S))
                self.reserved += need
                return True
            finally:
                self._queue.remove(ticket)
                self._cv.notify_all()
