"""The coordinator's end of one worker: its process, its socket, calls with timeouts.

One I/O thread per client owns the socket: request threads queue what they send and wait
on per-request mailboxes, so several requests' sends and replies never wait on each other.
Replies about no request (a heartbeat's echo, a handshake) share one box, from which each
caller takes only the reply it matches: /metrics' handshake and the draft probe's heartbeat
wait there at once.
Every wait wakes in short slices so that a dead worker is noticed at once, and every
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
IO_POLL_MS = 50           # how often the I/O thread wakes when nothing happens
SEND_RETRY_S = 0.01       # how often a send with nowhere to go tries again
IO_JOIN_S = 2.0           # how long closing waits for the I/O thread to send what is queued and stop
SHUTDOWN_GRACE_S = 5.0    # how long a worker may take to exit after Shutdown before SIGTERM
UNCLAIMED_S = 60.0        # how long a reply about no request waits for its caller; then it is stale


_RESTART = object()  # recv(): a message that starts the timeout over


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
        self._cv = threading.Condition()     # the mailboxes and the outbox below
        self._mail: dict[int, deque] = {-1: deque()}  # replies by request id (-1: errors about none)
        self._untagged: deque[tuple[float, object]] = deque()  # (arrival, reply) about no request
        self._outbox: deque[list[bytes]] = deque()    # encoded messages for the I/O thread to send
        self._stopping = False
        self._linger_ms = 0
        self._io_error: BaseException | None = None
        self.keys = keys  # the heartbeat monitor opens its own socket to the same worker
        # Set by the heartbeat monitor (dovetail/runtime/liveness.py, another thread) while the worker
        # misses heartbeats; cleared when it answers again. A str is set and read atomically.
        self.unresponsive: str | None = None
        # The socket belongs to one I/O thread (zmq sockets are not thread-safe): request
        # threads queue what they send and wait on their mailbox, so no request's send waits
        # for another's wait, and a pipe wakes the thread at once.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._io = threading.Thread(target=self._run_io, name=f"dovetail-{role}-io", daemon=True)
        self._io.start()

    def send(self, msg) -> None:
        """Queue ``msg`` for the I/O thread, which sends it at once; while the socket has no
        peer to queue it for (a remote target whose connection dropped), it tries again every
        SEND_RETRY_S, and the request's wait finds out when the worker is dead or silent."""
        frames = encode(msg)
        req_id = getattr(msg, "req_id", -1)
        with self._cv:  # the reply must find a mailbox, however soon the I/O thread reads it
            if self._stopping:
                raise WorkerError(self.role, "closed", "this client to the worker is closed")
            self._mail.setdefault(req_id, deque())
            self._outbox.append(frames)
            self._wake()

    def close_mailbox(self, req_id: int) -> None:
        """The request is over: later replies for it are stale and dropped on arrival."""
        with self._cv:
            if req_id != -1:
                self._mail.pop(req_id, None)

    @property
    def open_mailboxes(self) -> list[int]:
        with self._cv:
            return sorted(r for r in self._mail if r != -1)

    def recv(self, match: Callable[[object], bool], timeout_s: float, knob: str, req_id: int = -1,
             restart: Callable[[object], bool] | None = None, cancel: threading.Event | None = None):
        """Wait for the first message for ``req_id`` that ``match`` accepts; stale ones are
        dropped. The I/O thread sorts what arrives into per-request mailboxes. A message that
        ``restart`` accepts (the target's Taken: it took the request up only now) starts the
        timeout over. Returns None once ``cancel`` is set."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cv:
                msg = self._take(req_id, match, restart)
                if msg is _RESTART:
                    deadline = time.monotonic() + timeout_s
                    continue
                if msg is not None:
                    return msg
                if cancel is not None and cancel.is_set():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerTimeout(self.role, "timeout", f"no reply within {timeout_s:g} s (raise {knob} if the model is just slow)")
                # _take found nothing under this hold of _cv: whatever arrives next notifies it
                self._cv.wait(min(left, POLL_SLICE_S))
            self.check_alive()

    def call(self, msg, reply_type: type, timeout_s: float, knob: str):
        req_id = getattr(msg, "req_id", -1)
        self.send(msg)
        return self.recv(lambda m: isinstance(m, reply_type) and getattr(m, "req_id", -1) == req_id,
                         timeout_s, knob, req_id)

    # ---- the I/O thread ------------------------------------------------------------------
    def _wake(self) -> None:
        """Wake the I/O thread (caller holds ``_cv``, so the pipe is still open)."""
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # a full pipe wakes it as well
            pass

    def _run_io(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                with self._cv:
                    stopping = self._stopping  # read first: what was queued before it goes out
                waiting = self._flush()
                if stopping:
                    break
                events = dict(poller.poll(int(1000 * SEND_RETRY_S) if waiting else IO_POLL_MS))
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if self.sock in events:
                    self._sort_incoming()
        except BaseException as e:  # a bug here must not leave requests waiting for nothing
            log.exception("%s: the client's I/O thread failed", self.role)
            self._io_error = e
        finally:
            self.sock.close(linger=self._linger_ms)

    def _flush(self) -> bool:
        """Send what is queued, in order; True if some of it found no peer and waits."""
        while True:
            with self._cv:
                if not self._outbox:
                    return False
                frames = self._outbox[0]
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)  # multipart: all frames or none
            except zmq.Again:
                with self._cv:
                    if self._stopping:  # a worker gone or unreachable gets no goodbye
                        self._outbox.clear()
                        return False
                return True
            with self._cv:
                self._outbox.popleft()

    def _stop_io(self, linger_ms: int) -> None:
        """Stop the I/O thread after it sent what is queued (if a peer takes it), then close
        the socket; the pipe closes once the thread is gone."""
        with self._cv:
            if self._stopping:
                return
            self._stopping, self._linger_ms = True, linger_ms
            self._wake()
            self._cv.notify_all()
        self._io.join(IO_JOIN_S)
        with self._cv:
            if not self._io.is_alive():
                os.close(self._wake_r)
                os.close(self._wake_w)

    def discard(self) -> None:
        """Close this client's socket without a word to the worker (tests of abrupt clients)."""
        self._stop_io(linger_ms=0)

    def _sort_incoming(self) -> None:
        """Read whatever has arrived into the mailboxes (the I/O thread)."""
        got = []
        while self.sock.poll(0):
            try:
                got.append(self._read())
            except WorkerError as e:
                got.append(e)  # a bad frame: raised to whoever waits (it has no request id)
        with self._cv:
            for msg in got:
                req_id = -1 if isinstance(msg, WorkerError) else getattr(msg, "req_id", -1)
                if req_id == -1 and not isinstance(msg, (Error, WorkerError)):
                    self._untagged.append((time.monotonic(), msg))  # for whichever caller matches it
                    continue
                box = self._mail.get(req_id)
                if box is None:
                    log.debug("%s: dropped a late %s", self.role, type(msg).__name__)
                else:
                    box.append(msg)
            self._cv.notify_all()

    def _take(self, req_id: int, match, restart=None):
        """Pop this request's messages until one matches, or _RESTART for one that ``restart``
        accepts (caller holds ``_cv``)."""
        shared = self._mail[-1]
        for m in list(shared):
            if isinstance(m, WorkerError):
                shared.remove(m)
                raise m
            if isinstance(m, Error):
                shared.remove(m)
                raise WorkerError(self.role, m.code, m.message)
        if req_id == -1:
            return self._claim(match)
        box = self._mail.get(req_id)
        while box:
            msg = box.popleft()
            if isinstance(msg, Error):
                raise WorkerError(self.role, msg.code, msg.message)
            if match(msg):
                return msg
            if restart is not None and restart(msg):
                return _RESTART
            log.debug("%s: dropped stale %s", self.role, type(msg).__name__)
        return None

    def _claim(self, match):
        """The first reply about no request that ``match`` accepts (caller holds ``_cv``). The
        others stay for the callers they answer, who may be waiting at the same time (the draft
        probe's heartbeat and /metrics' handshake): taking one is never dropping another's.
        Replies no one claimed within UNCLAIMED_S (their caller timed out) are dropped."""
        stale = time.monotonic() - UNCLAIMED_S
        while self._untagged and self._untagged[0][0] < stale:
            log.debug("%s: dropped stale %s", self.role, type(self._untagged.popleft()[1]).__name__)
        for i, (_, msg) in enumerate(self._untagged):
            if match(msg):
                del self._untagged[i]
                return msg
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
        if self._io_error is not None:
            raise WorkerError(self.role, "internal", f"the client's I/O thread failed: {self._io_error!r}")
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
        """Send Shutdown once, never blocking (a worker gone or unreachable gets no goodbye),
        and close the socket."""
        if self.proc is None or self.proc.poll() is None:
            with self._cv:
                if not self._stopping:
                    self._outbox.append(encode(Shutdown()))
        self._stop_io(linger_ms=200)

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
