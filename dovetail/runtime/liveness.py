"""The coordinator's heartbeats: does each worker still live and answer?

One background thread sends every worker a Heartbeat each ``heartbeat_interval_s`` and
expects it back. A worker that misses ``heartbeat_liveness`` in a row is marked
unresponsive on its WorkerClient; the next wait on that client (requests poll it every
POLL_SLICE_S) raises WorkerUnresponsive, so an in-flight request to a dead or hung target
ends with that error, and a silent draft turns 'suspect' as after a draft timeout. A
worker that answers again is cleared at once.

Why a thread with its own sockets: ZeroMQ sockets are not thread-safe, and the request
sockets belong to the user's thread, which may sit in its own code between rounds for
any length of time. So this thread never touches them: it opens one DEALER per worker
(with the same CurveZMQ keys) and drives them all from a single zmq.Poller loop. Those
sockets carry a routing id starting with HEARTBEAT_ID_PREFIX, which tells the worker to
answer from its I/O thread at once rather than in turn behind model work (serve.py): a
long prefill is busy, not hung. Heartbeats on the request socket stay in order, which
is what the suspect-draft probe relies on.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import zmq

from dovetail.protocol import HEARTBEAT_ID_PREFIX, Heartbeat, ProtocolError, configure_socket, decode, encode
from dovetail.system.security import curve_client

log = logging.getLogger("dovetail")

STOP_POLL_MS = 50  # how soon the thread notices stop() between heartbeats


class _Peer:
    """One worker as the heartbeat thread sees it."""

    def __init__(self, ctx: zmq.Context, client):
        self.client = client
        self.sock = ctx.socket(zmq.DEALER)
        configure_socket(self.sock)
        # the client's session id: a worker serving many clients (--sessions) counts these
        # heartbeats as that client's session being alive, between its requests too
        self.sock.setsockopt(zmq.ROUTING_ID, HEARTBEAT_ID_PREFIX + client.session)
        self.sock.setsockopt(zmq.LINGER, 0)
        if client.keys is not None:
            curve_client(self.sock, client.keys)
        self.sock.connect(client.address)
        self.waiting = False  # a heartbeat is out and unanswered
        self.misses = 0
        self.exited = False   # its local process ended (reported once; no more heartbeats)


class Liveness:
    """Heartbeats from a daemon thread to each client handed to ``watch()``; ``stop()`` it
    before the context ends."""

    def __init__(self, ctx: zmq.Context, interval_s: float, liveness: int):
        self.ctx = ctx
        self.interval_s, self.liveness = interval_s, liveness
        # Clients join one by one, each after its handshake: a remote target that has
        # answered must hear from us while the draft is still loading (minutes, maybe),
        # or its --heartbeat-timeout would end it; a worker that has not bound yet must
        # not be counted silent.
        self._joining: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._seq = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="dovetail-heartbeat", daemon=True)

    def start(self) -> "Liveness":
        self._thread.start()
        return self

    def watch(self, client) -> None:
        self._joining.put(client)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        peers: list[_Peer] = []
        poller = zmq.Poller()
        by_sock = {}
        try:
            next_beat = time.monotonic()
            while not self._stop.is_set():
                while not self._joining.empty():  # sockets made here: this thread owns them
                    p = _Peer(self.ctx, self._joining.get())
                    peers.append(p)
                    by_sock[p.sock] = p
                    poller.register(p.sock, zmq.POLLIN)
                    self._beat(p)
                now = time.monotonic()
                if now >= next_beat:
                    for p in peers:
                        self._beat(p)
                    next_beat = now + self.interval_s
                wait_ms = min(STOP_POLL_MS, max(0.0, next_beat - time.monotonic()) * 1000)
                if not peers:
                    # An empty zmq Poller returns at once, whatever the timeout: this loop would
                    # spin (and hold the GIL) through the workers' whole start-up.
                    self._stop.wait(STOP_POLL_MS / 1000)
                    continue
                for sock, _ in poller.poll(wait_ms):
                    self._drain(by_sock[sock])
        finally:
            for p in peers:
                p.sock.close(linger=0)

    def _beat(self, p: _Peer) -> None:
        """Count the last heartbeat as missed if it is still out, then send the next one.
        A local worker whose process ended is reported once, as its requests report it
        (the signal, the end of its log), and gets no more heartbeats."""
        if p.exited:
            return
        died = p.client.exit_description() if p.client.proc is not None else None
        if died is not None:
            p.exited = True
            log.warning("%s worker: %s", p.client.role, died)
            return
        if p.waiting:
            p.misses += 1
            if p.misses >= self.liveness and p.client.unresponsive is None:
                p.client.unresponsive = self._reason()
                log.warning("%s worker at %s: %s", p.client.role, p.client.address, p.client.unresponsive)
        try:
            # NOBLOCK: a peer that is gone must never stall this loop (the DEALER queues up
            # to its high-water mark, then refuses; a refused ping is one more miss).
            p.sock.send_multipart(encode(Heartbeat(next(self._seq), time.time())), zmq.NOBLOCK)
        except zmq.Again:
            pass
        p.waiting = True

    def _drain(self, p: _Peer) -> None:
        while p.sock.poll(0):
            try:
                msg = decode(p.sock.recv_multipart())
            except ProtocolError as e:
                log.debug("%s heartbeat: bad frame ignored (%s)", p.client.role, e)
                continue
            if not isinstance(msg, Heartbeat):
                continue
            p.waiting, p.misses = False, 0
            if p.client.unresponsive is not None:
                log.warning("%s worker answers heartbeats again", p.client.role)
                p.client.unresponsive = None

    def _reason(self) -> str:
        window = self.interval_s * self.liveness
        return (f"missed {self.liveness} heartbeats in a row, {window:g} s of silence "
                f"(heartbeat_interval_s={self.interval_s:g} x heartbeat_liveness={self.liveness}): "
                f"it died, hung, or the network to it is down")
