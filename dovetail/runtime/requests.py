"""Many requests at once: admission with a bounded queue, and a handle per request.

A request is admitted or refused at once (``CoordinatorBusy`` past ``max_pending``), then
waits for one of ``max_active`` slots. Active requests run their rounds in their own
threads, so while the target verifies one request the draft is drafting another: both
devices stay busy across requests. Each request ends with exactly one terminal event:
``done``, ``cancelled`` or ``error``; its chunks come before it, in order.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from dovetail.runtime.results import Chunk, GenerationResult, Stats

TERMINAL = ("done", "cancelled", "error")
SLOT_POLL_S = 0.05  # how often a request waiting for a slot looks at its cancel event


class CoordinatorBusy(RuntimeError):
    """Too many requests in flight: retry later, or raise max_pending / max_active."""


class Admission:
    def __init__(self, max_active: int, max_pending: int, queue_timeout_s: float):
        self.max_pending, self.queue_timeout_s = max_pending, queue_timeout_s
        self._slots = threading.Semaphore(max_active)
        self._lock = threading.Condition()
        self.in_flight = 0  # admitted and not finished (waiting or active)
        self.active = 0     # holding a slot: decoding
        self._cancels: set[threading.Event] = set()  # one per admitted request
        self._closing = False

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.max_pending:
                raise CoordinatorBusy(f"{self.in_flight} requests in flight (max_pending = {self.max_pending})")
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._lock.notify_all()

    @contextmanager
    def cancellable(self, cancel: threading.Event):
        """Register the request's cancel event for cancel_all() while it runs."""
        with self._lock:
            self._cancels.add(cancel)
            if self._closing:  # admitted just as close() began: it ends at once too
                cancel.set()
        try:
            yield cancel
        finally:
            with self._lock:
                self._cancels.discard(cancel)

    def cancel_all(self, timeout_s: float) -> bool:
        """Cancel every request in flight and wait for them to finish; False if some did not in time."""
        with self._lock:
            self._closing = True
            for cancel in self._cancels:
                cancel.set()
            return self._lock.wait_for(lambda: self.in_flight == 0, timeout_s)

    @contextmanager
    def slot(self, cancel: threading.Event | None = None):
        """Hold one of the active slots while the request runs (waiting at most queue_timeout_s).

        The wait ends as soon as ``cancel`` is set (the client left, or close()): the body then
        runs without a slot, and the caller's cancel check skips the work. Yields whether a
        slot is held.
        """
        deadline = time.monotonic() + self.queue_timeout_s
        # A semaphore wait cannot be interrupted: wait in short steps, looking at the event.
        while not self._slots.acquire(timeout=max(0.0, min(SLOT_POLL_S, deadline - time.monotonic()))):
            if cancel is not None and cancel.is_set():
                yield False
                return
            if time.monotonic() >= deadline:
                raise CoordinatorBusy(f"no free slot within {self.queue_timeout_s:g} s "
                                      "(raise queue_timeout_s or max_active)")
        with self._lock:
            self.active += 1
        try:
            yield True
        finally:
            with self._lock:
                self.active -= 1
            self._slots.release()


class Request:
    """A submitted request: iterate it for chunks, ``result()`` for the end, ``cancel()`` to stop.

    ``on_event(kind, payload)`` (optional) sees every event as it happens: ("chunk", Chunk),
    then one of ("done", GenerationResult), ("cancelled", GenerationResult) or
    ("error", exception).
    """

    def __init__(self, on_event: Callable[[str, object], None] | None = None):
        self.stats = Stats()
        self.token_ids: list[int] = []
        self.terminal: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._on_event = on_event
        self._outcome: object = None

    # ---- caller side ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop after the round in flight; tokens already streamed stay committed."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The final result (also for a cancelled request); raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request still running after {timeout} s")
        if self.terminal == "error":
            raise self._outcome
        return self._outcome

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            kind, payload = self._events.get()
            if kind == "chunk":
                yield payload
            elif kind == "error":
                raise payload
            else:
                return

    # ---- coordinator side -------------------------------------------------------------------
    def emit_chunk(self, chunk: Chunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        self._emit("chunk", chunk)

    def finish(self, kind: str, payload) -> None:
        if self.terminal is not None:
            raise RuntimeError(f"request already ended with {self.terminal!r}; cannot end with {kind!r}")
        assert kind in TERMINAL
        self.terminal, self._outcome = kind, payload
        self._emit(kind, payload)
        self._done.set()

    def _emit(self, kind: str, payload) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, payload)
            except Exception:  # a caller's callback must not break decoding
                pass
        self._events.put((kind, payload))
