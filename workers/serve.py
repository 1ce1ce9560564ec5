"""The worker loop shared by every role: one ROUTER socket, decode, dispatch, reply.

The main thread does the socket I/O; the handler (the model) runs on a compute thread,
one message at a time in arrival order, and hands its replies back through a queue and
a wake-up pipe. So a worker deep in a long prefill still answers the coordinator's
liveness heartbeats (sent from sockets whose routing id starts with HEARTBEAT_ID_PREFIX)
at once: busy is not hung. A SIGSTOPped or dead worker answers nothing. Every other
message, a Heartbeat on a request socket included, is handled in order. Bad frames and
failing requests are answered with an Error and the loop goes on serving.

By default a worker serves its one coordinator: Shutdown ends it. With ``sessions`` it is a
server (dovetail-launch --role target): a client's Shutdown or silence closes that client's
requests only (workers/sessions.py), and SIGTERM or SIGINT ends the worker.
"""
from __future__ import annotations

import logging
import os
import queue
from collections import deque
import threading
import time
from dataclasses import dataclass, field

import zmq

from dovetail.protocol import (
    HEARTBEAT_ID_PREFIX, MAX_STRING, Error, Handshake, Heartbeat, MAX_FRAME_BYTES, OpenRequest, ProtocolError,
    Shutdown, Taken, VerifyRequest, configure_socket, decode, encode,
)
from dovetail.system.cpus import parse_cpus
from dovetail.system.security import (
    ServerKeys, check_bind, curve_server, server_keys, start_authenticator,
)
from dovetail.workers.args import parse_config, setup_logging, worker_parser  # noqa: F401 (the roles import them from here)
from dovetail.workers.lifeline import (
    SilenceClock, check_heartbeat_timeout, exit_on_sigterm, stop_on_signals, watch_parent,
)
from dovetail.workers.sessions import Sessions, describe, session_key

log = logging.getLogger(__name__)

POLL_MS = 100             # how often the loop wakes to check for a stop request or silence
COMPUTE_JOIN_S = 3.0      # on exit, how long the request in progress may take to finish
BATCH_WAIT_FRACTION = 0.1  # of the last batch's forward time, waited for its requests' next verifications
BATCH_WAIT_MAX_S = 0.005   # and never longer than this
MAX_BACKLOG = 1000        # messages queued for the compute thread before reading pauses (ZeroMQ's own HWM)
# After a prefill chunk, the next one waits this long (at most) for the next verifications of
# the requests answered before it. Their coordinators send them within milliseconds if they
# get a core, but a chunk keeps llama.cpp's threads on every core of a small machine: without
# the wait a stream whose coordinator could not send during the chunk waited for two chunks
# (1.5B, 2 cores, a 6,000-token prompt: rounds up to 2.0 s apart).
NEXT_ROUND_WAIT_S = 0.03
TAKEN_ACK_S = 0.5         # a verification taken up later than this after it arrived is acknowledged (Taken):
                          # the coordinator's verify_timeout_s then counts from its take-up, not its send


@dataclass(kw_only=True)
class WorkerConfig:
    """What every worker role takes (the flags of worker_parser), checked once here; each
    role's config adds its own fields and checks."""
    bind: str
    dtype: str = "auto"
    cpus: list[int] | None = None
    max_requests: int = 256
    parent_pid: int = 0
    parent_death_signal: bool = False  # also prctl(PR_SET_PDEATHSIG) (workers/lifeline.py)
    heartbeat_timeout: float = 0.0     # exit after this long without a coordinator's message (0: never)
    log_level: str = "info"
    curve_secret: str | None = None  # CurveZMQ: this worker's secret key file
    curve_allow: str | None = None   # CurveZMQ: folder of allowed client public keys
    keys: ServerKeys | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.keys = server_keys(self.curve_secret, self.curve_allow)
        check_heartbeat_timeout(self.heartbeat_timeout)
        check_bind(self.bind, self.keys)
        self.cpus = parse_cpus(self.cpus)


class RequestError(Exception):
    """A request the worker refuses; ``code`` goes on the wire with the message."""

    def __init__(self, req_id: int, code: str, message: str):
        super().__init__(message)
        self.req_id, self.code = req_id, code


def serve(bind: str, handler, *, parent_pid: int = 0, max_bytes: int = MAX_FRAME_BYTES,
          keys: ServerKeys | None = None, heartbeat_timeout: float = 0.0,
          parent_death_signal: bool = False, warmup=None, release=None, sessions: bool = False) -> None:
    """Serve ``handler`` on ``bind`` until a Shutdown arrives (or the coordinator is gone);
    with ``sessions``, until SIGTERM or SIGINT, closing each client's requests when it sends
    Shutdown or is silent for ``heartbeat_timeout`` (the handler's ``drop_peer(peer)``).

    ``release()``, if given, frees the model on the way out, and only once the compute thread
    has stopped: freeing a llama.cpp context under a running llama_decode crashes the
    process. A request still running after COMPUTE_JOIN_S leaves the model to the exit.

    ``warmup()``, if given, runs on the compute thread before the first message: model work
    done before serving belongs there. OpenMP (libgomp) keeps one thread pool per thread
    that opens parallel regions and counts all their threads against the cores: after a
    pool on the main thread, the compute thread's pool oversubscribes two cores, and libgomp
    then sleeps at every barrier instead of spinning (a 1.5B llama.cpp step on 2 cores:
    36-45 ms -> 54-66 ms for the rest of the worker's life).

    With ``keys`` the socket is a CURVE server and a ZAP authenticator on this context
    lets in only the allowlisted client keys. ``heartbeat_timeout`` > 0: return after that
    many seconds without a message from any coordinator (workers/lifeline.py).
    """
    check_bind(bind, keys)
    if sessions and not (getattr(handler, "keys_by_peer", False) and hasattr(handler, "drop_peer")):
        raise ValueError(f"a {handler.role} worker cannot serve several clients (--sessions): its requests "
                         "are not kept per client")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    auth = None
    try:
        configure_socket(sock, max_bytes)
        if keys is not None:
            # before bind: libzmq accepts any client key while no ZAP handler is bound
            auth = start_authenticator(ctx, keys)
            curve_server(sock, keys)
        sock.bind(bind)
    except BaseException:
        _close(ctx, sock, auth)
        raise
    ipc_path = bind[len("ipc://"):] if bind.startswith("ipc://") else None
    stopping = threading.Event()
    if sessions:
        stop_on_signals(stopping)  # a clean stop through the finally below, exit status 0
    else:
        exit_on_sigterm()
    watch_parent(parent_pid, on_orphaned=lambda: ipc_path and _unlink(ipc_path),
                 death_signal=parent_death_signal)
    curve = f" with CurveZMQ, {len(keys.allowed)} allowed client key(s)" if keys else ""
    log.info("%s worker serving on %s%s (pid %d)", handler.role, bind, curve, os.getpid())
    if sessions:
        log.info("%s worker: serving client sessions until SIGTERM or SIGINT; a client silent for %s is "
                 "closed", handler.role, f"{heartbeat_timeout:g} s" if heartbeat_timeout else "ever")
    compute = Compute(handler, max_bytes, warmup, sessions)
    try:
        if sessions:
            _io_loop(sock, compute, handler.role, SilenceClock(0.0), Sessions(heartbeat_timeout, handler.role),
                     stopping)
        else:
            _io_loop(sock, compute, handler.role, SilenceClock(heartbeat_timeout))
        if compute.error is not None:
            raise compute.error
    finally:
        # The socket file goes first: nothing below (a compute thread that will not stop,
        # a context that will not terminate, a second signal) may leave it behind.
        if ipc_path:
            _unlink(ipc_path)
        stopped = compute.stop()
        _close(ctx, sock, auth)
        if release is not None and stopped:
            release()


_EMPTY = object()   # inbox: nothing waiting now
_STOP = object()    # a Shutdown: the worker stops (outbox), or the client's session ends (sessions)
_DROP = object()    # inbox: close the requests of this peer, whose session went silent
_ENDED = object()   # outbox: this peer's session ended by its Shutdown, its requests closed


class Compute:
    """The handler on its own thread: messages in arrival order, encoded replies out."""

    def __init__(self, handler, max_bytes: int, warmup=None, sessions: bool = False):
        self.handler, self.max_bytes, self.warmup, self.sessions = handler, max_bytes, warmup, sessions
        self.error: BaseException | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        # A pipe, not a zmq socket, wakes the I/O thread: a socket would belong to this
        # thread and block the context's term() if a request outlives COMPUTE_JOIN_S.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.thread = threading.Thread(target=self._run, name=f"{handler.role}-compute", daemon=True)
        self.thread.start()

    def submit(self, peer: bytes, body) -> None:
        """Queue a message's frames, or _DROP to close the peer's requests."""
        self.inbox.put((peer, body, time.monotonic()))

    def full(self) -> bool:
        return self.inbox.qsize() >= MAX_BACKLOG

    def replies(self):
        """(peer, frames or _STOP) for every reply ready now."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                yield self.outbox.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> bool:
        """Stop the thread after the message in progress; False if it is still running."""
        self.inbox.put(None)
        self.thread.join(COMPUTE_JOIN_S)
        if self.thread.is_alive():
            log.warning("the request in progress did not finish within %g s; leaving it (and the model) "
                        "to the process exit", COMPUTE_JOIN_S)
            return False  # the process is about to exit: the pipe goes with it
        os.close(self.wake_r)
        os.close(self.wake_w)
        return True

    def _run(self) -> None:
        try:
            if self.warmup is not None:
                self.warmup()
            self._loop()
        except BaseException as e:  # a bug outside _dispatch's net: the worker must not hang on
            log.exception("%s worker: the compute thread failed", self.handler.role)
            self.error = e
            self._post(b"", _STOP)

    def _post(self, peer: bytes, out) -> None:
        self.outbox.put((peer, out))
        os.write(self.wake_w, b"!")

    def _next(self, timeout: float | None):
        """The next message, waiting at most ``timeout`` seconds (None: until one comes, 0: not
        at all); _EMPTY when none came."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        try:
            return self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return _EMPTY

    def _loop(self) -> None:
        """Every message waiting is handled before the next prefill chunk: a long prompt's
        prefill (handler.begin_open) yields to the other requests' verifications after each
        chunk, and several prefills take turns, chunk by chunk."""
        self._held = None  # an item taken from the inbox while gathering a batch, not yet handled
        self._last_batch: set = set()  # (peer, request id) of the last batch's verifications
        self._last_forward_s = 0.0
        self._jobs: deque = deque()  # (peer, job) of the prefills in progress, in turn
        self._answered = False  # verifications answered, whose next ones have not come yet
        self._chunk_since = False  # a prefill chunk ran since then
        while True:
            item = self._next(0 if self._jobs else None)
            if item is _EMPTY and self._answered and self._chunk_since:  # one wait per round, after its chunk
                self._answered = False
                item = self._next(NEXT_ROUND_WAIT_S)
            if item is None:
                return
            if item is _EMPTY:
                self._step_job()
                continue
            peer, body, arrived = item
            if body is _DROP:
                self._drop(peer, "went silent")
                continue
            if getattr(self.handler, "verify_batch", None) is not None and self._run_batch(peer, body, arrived):
                continue
            reply = _dispatch(self.handler, body, self.max_bytes, peer)
            if isinstance(reply, _Job):
                self._jobs.append((peer, reply.job))
                continue
            if reply is _STOP and self.sessions:
                self._drop(peer, "closed its session")
                self._post(peer, _ENDED)
                continue
            out = reply if reply is _STOP or reply is None else _encode_reply(reply)
            if out is not None:
                self._post(peer, out)
            if reply is _STOP:
                return

    def _step_job(self) -> None:
        """One chunk of the prefill whose turn it is; its reply once it is done."""
        peer, job = self._jobs.popleft()
        self._chunk_since = True
        if job.aborted:  # closed meanwhile: its Closed went out already
            return
        try:
            reply = job.step()
        except Exception as e:  # this request's error; the worker goes on
            self._post(peer, _encode_reply(_error_reply(e, job.req_id)))
            return
        if reply is None:
            self._jobs.append((peer, job))
        else:
            self._post(peer, _encode_reply(reply))

    def _ack_late(self, batch: list, arrivals: list[float]) -> None:
        """Taken for each verification that waited past TAKEN_ACK_S (behind prefill chunks or
        other batches): its coordinator's verify timeout starts over now."""
        now = time.monotonic()
        for (p, m), t in zip(batch, arrivals):
            if now - t > TAKEN_ACK_S:
                self._post(p, _encode_reply(Taken(req_id=m.req_id, step=m.step)))

    def _run_batch(self, peer: bytes, body, arrived: float) -> bool:
        """A verification and those right behind it in the inbox, from other requests, in one
        handler.verify_batch() call (one forward); False when ``body`` is not a verification.

        What is already waiting joins. Beyond that, the requests of the previous batch, whose
        next verifications are on their way (a coordinator turns a reply round in about a
        millisecond), are waited for up to BATCH_WAIT_FRACTION of that batch's forward time:
        after a lone request's forward nobody is waited for. Every request's messages keep
        their order: the batch stops at the first message that is not a verification, at a
        second one for the same request, and at the row bound.
        """
        msg = _decode_quietly(self.handler, body, self.max_bytes)
        if not isinstance(msg, VerifyRequest):
            return False
        batch, rows, arrivals = [(peer, msg)], len(msg.tokens) + 1, [arrived]
        # Only requests still open are worth waiting for (one that finished never sends again),
        # and nothing is for a verification that needs no forward (the first token's).
        is_open = getattr(self.handler, "is_open", lambda key: True)
        worth = getattr(self.handler, "worth_waiting", lambda key, m: True)
        expected = ({k for k in self._last_batch if k != (peer, msg.req_id) and is_open(k)}
                    if worth((peer, msg.req_id), msg) else set())
        deadline = time.monotonic() + min(BATCH_WAIT_MAX_S, BATCH_WAIT_FRACTION * self._last_forward_s)
        while True:
            try:
                left = deadline - time.monotonic()
                item = self.inbox.get(timeout=left) if expected and left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            nxt = None if item is None or item[1] is _DROP else _decode_quietly(self.handler, item[1], self.max_bytes)
            if (not isinstance(nxt, VerifyRequest) or rows + len(nxt.tokens) + 1 > self.handler.max_batch_rows
                    or any(p == item[0] and m.req_id == nxt.req_id for p, m in batch)):
                self._held = item
                break
            batch.append((item[0], nxt))
            arrivals.append(item[2])
            expected.discard((item[0], nxt.req_id))
            rows += len(nxt.tokens) + 1
        if len(batch) > 1:
            log.debug("%s worker: %d verifications, %d rows, in one forward", self.handler.role, len(batch), rows)
        self._ack_late(batch, arrivals)
        t0 = time.monotonic()
        replies = (self.handler.verify_batch(batch) if len(batch) > 1
                   else [_call(self.handler, m, peer) for _, m in batch])
        self._last_forward_s = time.monotonic() - t0
        self._answered, self._chunk_since = True, False
        self._last_batch = {(p, m.req_id) for (p, m), r in zip(batch, replies) if not isinstance(r, BaseException)}
        for (p, m), reply in zip(batch, replies):
            if isinstance(reply, BaseException):
                reply = _error_reply(reply, m.req_id)
            self._post(p, _encode_reply(reply))
        return True

    def _drop(self, peer: bytes, why: str) -> None:
        """Close what a client left open; in order, after every message it sent before."""
        try:
            n = self.handler.drop_peer(peer)
        except Exception:  # the other clients' requests go on
            log.exception("%s worker: closing the requests of client %s failed", self.handler.role,
                          describe(session_key(peer)))
            return
        if n:
            log.info("%s worker: client %s %s; closed its %d open request(s)", self.handler.role,
                     describe(session_key(peer)), why, n)


def _io_loop(sock: zmq.Socket, compute: Compute, role: str, silence: SilenceClock,
             sessions: Sessions | None = None, stopping: threading.Event | None = None) -> None:
    poller, replies_only = zmq.Poller(), zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    for p in (poller, replies_only):
        p.register(compute.wake_r, zmq.POLLIN)
    while True:
        # A full backlog leaves messages in ZeroMQ's queue, which is bounded (its HWM): a
        # flood of requests must not grow this process's memory without limit.
        events = dict((replies_only if compute.full() else poller).poll(POLL_MS))
        if sock in events:
            for peer, body in _receive_all(sock, compute):
                silence.heard()
                if sessions is not None:
                    sessions.heard(peer)
                pong = _liveness_reply(peer, body)
                if pong is not None:
                    sock.send_multipart([peer, *pong])
                else:
                    compute.submit(peer, body)
        if compute.wake_r in events:
            for peer, frames in compute.replies():
                if frames is _ENDED:
                    sessions.end(peer, "closed its session")
                    continue
                if frames is _STOP:
                    if compute.error is None:
                        log.info("%s worker: shutdown requested", role)
                    return
                sock.send_multipart([peer, *frames])
        if sessions is not None:
            for peer in sessions.expire():
                compute.submit(peer, _DROP)
        if stopping is not None and stopping.is_set():
            return
        if silence.expired():
            log.warning("%s worker: no coordinator has sent anything for %g s (--heartbeat-timeout); exiting",
                        role, silence.timeout_s)
            return


def _receive_all(sock: zmq.Socket, compute: Compute):
    while not compute.full():
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        yield frames[0], frames[1:]


def _liveness_reply(peer: bytes, body: list[bytes]) -> list[bytes] | None:
    """The encoded answer to a heartbeat socket's Heartbeat; None for anything else."""
    if not peer.startswith(HEARTBEAT_ID_PREFIX):
        return None
    try:
        msg = decode(body)
    except ProtocolError:
        return None  # the compute thread answers it with the usual Error, in turn
    return encode(Heartbeat(seq=msg.seq, time=time.time())) if isinstance(msg, Heartbeat) else None


def _close(ctx: zmq.Context, sock: zmq.Socket, auth) -> None:
    sock.close(linger=0)
    if auth is not None:
        auth.stop()  # its sockets live on ctx: term() would wait for them forever
    ctx.term()


def _encode_reply(reply) -> list[bytes]:
    """Encode a reply; an unencodable one becomes a short Error rather than a crash."""
    if isinstance(reply, Error) and len(reply.message) > MAX_STRING:
        reply = Error(reply.req_id, reply.code, reply.message[:MAX_STRING - 3] + "...")
    try:
        return encode(reply)
    except Exception as e:
        log.exception("could not encode a %s reply", type(reply).__name__)
        return encode(Error(getattr(reply, "req_id", -1), "internal",
                            f"reply could not be encoded: {type(e).__name__}"[:MAX_STRING]))


def _dispatch(handler, frames: list[bytes], max_bytes: int, peer: bytes = b""):
    try:
        msg = decode(frames, max_bytes=max_bytes, vocab_size=handler.vocab_size)
    except ProtocolError as e:
        log.warning("rejected frame: %s", e)
        return Error(req_id=-1, code=e.code, message=str(e))
    if isinstance(msg, Shutdown):
        return _STOP
    if isinstance(msg, Heartbeat):
        return Heartbeat(seq=msg.seq, time=time.time())
    if isinstance(msg, Handshake):
        return handler.handshake()
    try:
        if isinstance(msg, OpenRequest) and hasattr(handler, "begin_open"):
            return _Job(handler.begin_open(msg, peer))
        return handler.handle(msg, peer) if getattr(handler, "keys_by_peer", False) else handler.handle(msg)
    except Exception as e:  # keep serving: one bad request must not take the worker down
        return _error_reply(e, getattr(msg, "req_id", -1))


@dataclass
class _Job:
    """_dispatch's answer to an OpenRequest the handler prefills chunk by chunk."""
    job: object


def _call(handler, msg, peer: bytes):
    """handler.handle(msg), or the exception it raised (turned into an Error by the caller)."""
    try:
        return handler.handle(msg, peer)
    except Exception as e:  # noqa: BLE001
        return e


def _error_reply(e: BaseException, req_id: int) -> Error:
    if isinstance(e, RequestError):
        log.warning("request %d refused: %s", e.req_id, e)
        return Error(req_id=e.req_id, code=e.code, message=str(e))
    log.error("request %d failed", req_id, exc_info=e)
    return Error(req_id=req_id, code="internal", message=f"{type(e).__name__}: {e}")


def _decode_quietly(handler, body, max_bytes: int):
    """The message, or None for a frame that does not decode (dispatch answers it in turn)."""
    try:
        return decode(body, max_bytes=max_bytes, vocab_size=handler.vocab_size)
    except ProtocolError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
