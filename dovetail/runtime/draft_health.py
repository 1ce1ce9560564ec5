"""Whether the coordinator may use the draft worker: ok, suspect or dead.

A draft that fails never fails a request: the request goes on with the target alone. What
happens next depends on how it failed. A dead draft (its process exited) stays dead. A draft
that timed out is suspect: before each later request it gets one short heartbeat probe
(``draft_probe_timeout_s``), and drafting resumes once it answers.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time

from dovetail.protocol import Heartbeat
from dovetail.runtime.client import WorkerClient, WorkerDied, WorkerError, WorkerTimeout

log = logging.getLogger("dovetail")

OK, SUSPECT, DEAD = "ok", "suspect", "dead"


class DraftHealth:
    def __init__(self, client: WorkerClient | None, probe_timeout_s: float):
        self.client, self.probe_timeout_s = client, probe_timeout_s
        self.state = OK if client is not None else DEAD
        self._probes = itertools.count(1)
        # One probe at a time: a suspect draft needs one answer, not one per waiting request.
        # (Each probe's echo is its own: the client matches replies about no request to their
        # caller, so a probe and /metrics' handshake may wait at once.)
        self._probing = threading.Lock()

    def usable(self) -> bool:
        """True when requests may draft: ok, or suspect and answering a probe now."""
        if self.state == SUSPECT:
            if not self._probing.acquire(blocking=False):
                return False  # another request is probing: this one goes target-only, not waits
            try:
                if self.state == SUSPECT:
                    self._probe()
            finally:
                self._probing.release()
        return self.state == OK

    def failed(self, error: WorkerError) -> None:
        """A draft call failed: dead if the process is gone, suspect if it timed out."""
        if isinstance(error, WorkerDied):
            self.state = DEAD
        elif isinstance(error, WorkerTimeout):
            self.state = SUSPECT

    def _probe(self) -> None:
        seq = next(self._probes)
        try:
            self.client.send(Heartbeat(seq, time.time()))
            self.client.recv(lambda m: isinstance(m, Heartbeat) and m.seq == seq,
                             self.probe_timeout_s, "draft_probe_timeout_s")
        except WorkerError as e:  # still suspect, or dead
            self.failed(e)
            return
        log.warning("draft worker answers again; drafting resumes")
        self.state = OK
