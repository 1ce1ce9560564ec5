"""Client sessions of a worker that serves many coordinators (``--sessions``).

A coordinator talks to a worker through two sockets: its request socket (routing id
SESSION_ID_PREFIX + S) and its heartbeat socket (HEARTBEAT_ID_PREFIX + S), with S random
per client (dovetail/runtime/client.py, liveness.py). Both count as that client being
alive, so a client deep in its own code between rounds, whose request socket is quiet,
keeps its session through its heartbeats. A session ends when its client sends Shutdown
(only that client's requests are closed, the worker goes on) or stays silent for the
timeout; the worker itself ends on SIGTERM or SIGINT (serve.py).

A peer with neither prefix (a plain DEALER) is a session of its own.
"""
from __future__ import annotations

import logging
import time

from dovetail.protocol import HEARTBEAT_ID_PREFIX, SESSION_ID_PREFIX

log = logging.getLogger(__name__)


def session_key(peer: bytes) -> bytes:
    for prefix in (SESSION_ID_PREFIX, HEARTBEAT_ID_PREFIX):
        if peer.startswith(prefix):
            return peer[len(prefix):]
    return peer


def describe(key: bytes) -> str:
    """A session id for the log: printable ids as they are, others in hex."""
    text = key.decode("ascii", "replace")
    return text if text.isprintable() and len(text) <= 32 else key.hex()[:32]


class Session:
    def __init__(self, now: float):
        self.last = now
        self.request_peers: set[bytes] = set()  # the sockets whose requests the handler keeps


class Sessions:
    """Who is connected, and since when silent; ``timeout_s`` 0 never expires anyone."""

    def __init__(self, timeout_s: float, role: str):
        self.timeout_s, self.role = timeout_s, role
        self.open: dict[bytes, Session] = {}

    def heard(self, peer: bytes) -> None:
        key, now = session_key(peer), time.monotonic()
        session = self.open.get(key)
        if session is None:
            session = self.open[key] = Session(now)
            log.info("%s worker: client %s connected (%d session(s) open)", self.role, describe(key), len(self.open))
        session.last = now
        if not peer.startswith(HEARTBEAT_ID_PREFIX):  # heartbeat sockets never hold requests
            session.request_peers.add(peer)

    def end(self, peer: bytes, why: str) -> None:
        """The client behind ``peer`` said goodbye (its requests are closed by then)."""
        key = session_key(peer)
        if self.open.pop(key, None) is not None:
            log.info("%s worker: client %s %s (%d session(s) open)", self.role, describe(key), why, len(self.open))

    def expire(self) -> list[bytes]:
        """End every session silent for longer than the timeout; the request peers whose
        requests must now be closed."""
        if not self.timeout_s:
            return []
        now, peers = time.monotonic(), []
        for key, session in list(self.open.items()):
            if now - session.last > self.timeout_s:
                del self.open[key]
                peers.extend(session.request_peers)
                log.warning("%s worker: client %s sent nothing for %g s (--heartbeat-timeout); closing its "
                            "session (%d session(s) open)", self.role, describe(key), self.timeout_s, len(self.open))
        return peers
