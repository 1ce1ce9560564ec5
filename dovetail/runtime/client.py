"""The coordinator's end of one worker: its process, its socket, calls with timeouts.

Every wait polls in short slices so that a dead worker is noticed at once, and every
timeout error names the setting that controls it. A worker that died is reported by
describe_exit() (dovetail/system/worker_log.py): the signal that killed it, what that usually means,
and the last lines of its log.
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from typing import Callable

import zmq

from dovetail.protocol import (
    SESSION_ID_PREFIX, Error, MAX_FRAME_BYTES, ProtocolError, Shutdown, configure_socket, decode, encode,
)
from dovetail.system.security import ClientKeys, curve_client
from dovetail.system.worker_log import LOG_EOF_WAIT_S, WorkerLog, describe_exit

log = logging.getLogger("dovetail")

POLL_SLICE_S = 0.05       # how often a wait checks that the worker process still lives
SHARED_SLICE_S = 0.002    # how long one of several waiting threads holds the socket
SHUTDOWN_GRACE_S = 5.0    # how long a worker may take to exit after Shutdown before SIGTERM
SEND_RETRY_S = 0.01       # how often a send with nowhere to go tries again


class WorkerError(RuntimeError):
    """A worker refused a request or failed; ``code`` is the worker's error code."""

    def __init__(self, role: str, code: str, message: str):
        super().__init__(f"{role} worker: {message} [{code}]")
        self.role, self.code, self.detail = role, code, message


class WorkerDied(WorkerError):
    pass


class WorkerTimeout(WorkerError):
    pass


class WorkerUnresponsive(WorkerTimeout):
    """Missed heartbeats: the worker died (remote), hung, or the network between us broke.

    A WorkerTimeout, so a draft that stops answering becomes 'suspect' (target-only until it
    answers again) exactly as a draft that timed out does.
    """


class WorkerClient:
    """``keys``: CurveZMQ keys for a worker started with --curve-secret (None: plain).
    ``stderr_log``: the local worker's WorkerLog; ``backend``: how it runs its model (both
    only for describing its death)."""

    def __init__(self, ctx: zmq.Context, role: str, address: str, proc: subprocess.Popen | None,
                 max_bytes: int = MAX_FRAME_BYTES, keys: ClientKeys | None = None,
                 stderr_log: WorkerLog | None = None, backend: str | None = None):
        self.role, self.address, self.proc = role, address, proc
        self.stderr_log, self.backend = stderr_log, backend
        self._death: str | None = None
        self._death_lock = threading.Lock()
        # One id per client for both of its sockets to this worker (this one and the heartbeat
        # monitor's): a worker serving many clients keeps our session while either speaks.
        self.session = os.urandom(8).hex().encode()
        self.sock = ctx.socket(zmq.DEALER)
        configure_socket(self.sock, max_bytes)
        self.sock.setsockopt(zmq.ROUTING_ID, SESSION_ID_PREFIX + self.session)
        if keys is not None:
            curve_client(self.sock, keys)  # before connect: the handshake starts at connect
        self.sock.connect(address)
        self.max_bytes = max_bytes
        self.vocab_size: int | None = None
        self.pid = proc.pid if proc else None
        self._io = threading.Lock()          # the socket, one thread at a time
        self._cv = threading.Condition()     # the mailboxes below
        self._mail: dict[int, deque] = {-1: deque()}  # replies by request id (-1: not about one)
        self._waiting = 0                    # threads inside recv()
        self.keys = keys  # the heartbeat monitor opens its own socket to the same worker
        # Set by the heartbeat monitor (dovetail/runtime/liveness.py, another thread) while the worker
        # misses heartbeats; cleared when it answers again. A str is set and read atomically.
        self.unresponsive: str | None = None

    def send(self, msg) -> None:
        """Queue ``msg``; while the socket has no peer to queue it for (a remote target whose
        connection dropped), retry until check_alive says the worker is dead or silent."""
        frames = encode(msg)
        req_id = getattr(msg, "req_id", -1)
        with self._cv:  # the reply must find a mailbox, however soon another thread reads it
            self._mail.setdefault(req_id, deque())
        while True:
            with self._io:
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK)  # multipart: all frames or none
                    return
                except zmq.Again:
                    pass
            self.check_alive()
            time.sleep(SEND_RETRY_S)

    def close_mailbox(self, req_id: int) -> None:
        """The request is over: later replies for it are stale and dropped on arrival."""
        with self._cv:
            if req_id != -1:
                self._mail.pop(req_id, None)

    @property
    def open_mailboxes(self) -> list[int]:
        with self._cv:
            return sorted(r for r in self._mail if r != -1)

    def recv(self, match: Callable[[object], bool], timeout_s: float, knob: str, req_id: int = -1):
        """Wait for the first message for ``req_id`` that ``match`` accepts; stale ones are dropped.

        Many request threads share this socket. Whoever finds the socket free reads it and
        sorts what arrives into per-request mailboxes (zmq sockets are not thread-safe, so one
        thread at a time, under ``_io``); the others wait on their mailbox.
        """
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._waiting += 1
        try:
            while True:
                with self._cv:
                    msg = self._take(req_id, match)
                    if msg is not None:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerTimeout(self.role, "timeout", f"no reply within {timeout_s:g} s (raise {knob} if the model is just slow)")
                if self._io.acquire(blocking=False):
                    try:
                        # Alone, wait long in poll; with company, hand the socket over often
                        # so that other threads' sends are not held up.
                        slice_s = POLL_SLICE_S if self._waiting <= 1 else SHARED_SLICE_S
                        if self.sock.poll(int(1000 * min(left, slice_s))):
                            self._sort_incoming()
                    finally:
                        self._io.release()
                else:
                    with self._cv:
                        if not self._ready(req_id):
                            self._cv.wait(min(left, SHARED_SLICE_S))
                self.check_alive()
        finally:
            with self._cv:
                self._waiting -= 1

    def call(self, msg, reply_type: type, timeout_s: float, knob: str):
        req_id = getattr(msg, "req_id", -1)
        self.send(msg)
        return self.recv(lambda m: isinstance(m, reply_type) and getattr(m, "req_id", -1) == req_id,
                         timeout_s, knob, req_id)

    def _sort_incoming(self) -> None:
        """Read whatever has arrived into the mailboxes (caller holds ``_io``)."""
        got = []
        while self.sock.poll(0):
            try:
                got.append(self._read())
            except WorkerError as e:
                got.append(e)  # a bad frame: raised to whoever waits (it has no request id)
        with self._cv:
            for msg in got:
                box = self._mail.get(-1 if isinstance(msg, WorkerError) else getattr(msg, "req_id", -1))
                if box is None:
                    log.debug("%s: dropped a late %s", self.role, type(msg).__name__)
                else:
                    box.append(msg)
            self._cv.notify_all()

    def _ready(self, req_id: int) -> bool:
        return bool(self._mail.get(req_id)) or any(isinstance(m, (Error, WorkerError)) for m in self._mail[-1])

    def _take(self, req_id: int, match):
        """Pop this request's messages until one matches (caller holds ``_cv``)."""
        shared = self._mail[-1]
        for m in list(shared):
            if isinstance(m, WorkerError):
                shared.remove(m)
                raise m
            if isinstance(m, Error) and req_id != -1:
                shared.remove(m)
                raise WorkerError(self.role, m.code, m.message)
        box = self._mail.get(req_id)
        while box:
            msg = box.popleft()
            if isinstance(msg, Error):
                raise WorkerError(self.role, msg.code, msg.message)
            if match(msg):
                return msg
            log.debug("%s: dropped stale %s", self.role, type(msg).__name__)
        return None

    def _read(self):
        frames = self.sock.recv_multipart()
        try:
            return decode(frames, max_bytes=self.max_bytes, vocab_size=self.vocab_size)
        except ProtocolError as e:
            raise WorkerError(self.role, e.code, f"sent a bad frame: {e}") from e

    def exit_description(self) -> str | None:
        """describe_exit() of this worker's process once it ended (None while it runs, and for
        a remote worker). Made once, when first asked: the log's tail is read while the run
        dir still exists, and every later report says the same."""
        if self.proc is None or self.proc.poll() is None:
            return None
        with self._death_lock:
            if self._death is None:
                if self.stderr_log is not None:
                    self.stderr_log.wait(LOG_EOF_WAIT_S)  # its last lines, the crash's stack among them
                self._death = describe_exit(self.proc.returncode,
                                            self.stderr_log.path if self.stderr_log is not None else None,
                                            self.backend, pid=self.proc.pid)
            return self._death

    def check_alive(self) -> None:
        died = self.exit_description()
        if died is not None:
            raise WorkerDied(self.role, "died", died)
        reason = self.unresponsive
        if reason is not None:
            raise WorkerUnresponsive(self.role, "unresponsive", reason)

    def close(self) -> None:
        """Ask the worker to stop, then make sure it did; never leaves a process behind."""
        self.request_shutdown()
        self.wait_exit()

    def request_shutdown(self) -> None:
        try:
            if self.proc is None or self.proc.poll() is None:
                # once, never blocking: a worker gone or unreachable gets no goodbye
                with self._io:
                    self.sock.send_multipart(encode(Shutdown()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=200)

    def wait_exit(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("%s worker %d ignored Shutdown; terminating it", self.role, self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stderr_log is not None:
            self.stderr_log.finish()  # its last lines shown, its log file closed
