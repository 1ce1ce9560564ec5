"""The coordinator's end of one worker: its process, its socket, calls with timeouts.

Every wait polls in short slices so that a dead worker is noticed at once, and every
timeout error names the setting that controls it.
"""
from __future__ import annotations

import logging
import subprocess
import time
from typing import Callable

import zmq

from dovetail.protocol import Error, MAX_FRAME_BYTES, ProtocolError, Shutdown, configure_socket, decode, encode
from dovetail.security import ClientKeys, curve_client

log = logging.getLogger("dovetail")

POLL_SLICE_S = 0.05       # how often a wait checks that the worker process still lives
SHUTDOWN_GRACE_S = 5.0    # how long a worker may take to exit after Shutdown before SIGTERM
SEND_RETRY_S = 0.01       # how often a send with nowhere to go tries again


class WorkerError(RuntimeError):
    """A worker refused a request or failed; ``code`` is the worker's error code."""

    def __init__(self, role: str, code: str, message: str):
        super().__init__(f"{role} worker: {message} [{code}]")
        self.role, self.code = role, code


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
    """``keys``: CurveZMQ keys for a worker started with --curve-secret (None: plain)."""

    def __init__(self, ctx: zmq.Context, role: str, address: str, proc: subprocess.Popen | None,
                 max_bytes: int = MAX_FRAME_BYTES, keys: ClientKeys | None = None):
        self.role, self.address, self.proc = role, address, proc
        self.sock = ctx.socket(zmq.DEALER)
        configure_socket(self.sock, max_bytes)
        if keys is not None:
            curve_client(self.sock, keys)  # before connect: the handshake starts at connect
        self.sock.connect(address)
        self.max_bytes = max_bytes
        self.vocab_size: int | None = None
        self.pid = proc.pid if proc else None
        self.keys = keys  # the heartbeat monitor opens its own socket to the same worker
        # Set by the heartbeat monitor (dovetail/liveness.py, another thread) while the worker
        # misses heartbeats; cleared when it answers again. A str is set and read atomically.
        self.unresponsive: str | None = None

    def send(self, msg) -> None:
        """Queue ``msg``; while the socket has no peer to queue it for (a remote target whose
        connection dropped), retry until check_alive says the worker is dead or silent."""
        frames = encode(msg)
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)  # multipart: all frames or none
                return
            except zmq.Again:
                self.check_alive()
                time.sleep(SEND_RETRY_S)

    def recv(self, match: Callable[[object], bool], timeout_s: float, knob: str, req_id: int = -1):
        """Wait for the first message ``match`` accepts; stale replies are dropped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout(self.role, "timeout", f"no reply within {timeout_s:g} s (raise {knob} if the model is just slow)")
            if self.sock.poll(int(1000 * min(left, POLL_SLICE_S))):
                msg = self._read()
                if isinstance(msg, Error) and msg.req_id in (-1, req_id):
                    raise WorkerError(self.role, msg.code, msg.message)
                if match(msg):
                    return msg
                log.debug("%s: dropped stale %s", self.role, type(msg).__name__)
            self.check_alive()

    def call(self, msg, reply_type: type, timeout_s: float, knob: str):
        req_id = getattr(msg, "req_id", -1)
        self.send(msg)
        return self.recv(lambda m: isinstance(m, reply_type) and getattr(m, "req_id", -1) == req_id,
                         timeout_s, knob, req_id)

    def _read(self):
        frames = self.sock.recv_multipart()
        try:
            return decode(frames, max_bytes=self.max_bytes, vocab_size=self.vocab_size)
        except ProtocolError as e:
            raise WorkerError(self.role, e.code, f"sent a bad frame: {e}") from e

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise WorkerDied(self.role, "died", f"process {self.proc.pid} exited with code {self.proc.returncode} (see its log above)")
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
