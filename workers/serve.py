"""The worker loop shared by both roles: one ROUTER socket, decode, dispatch, reply.

Compute happens on this thread; ZeroMQ's own I/O thread keeps receiving meanwhile. Bad
frames and failing requests are answered with an Error and the loop goes on serving.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
import time

import zmq

from dovetail.protocol import (
    MAX_STRING, Error, Handshake, Heartbeat, MAX_FRAME_BYTES, ProtocolError, Shutdown,
    configure_socket, decode, encode,
)
from dovetail.security import KEYS_COMMAND, ServerKeys, curve_server, start_authenticator

log = logging.getLogger(__name__)

POLL_MS = 100             # how often the loop wakes to check for a stop request
PARENT_POLL_S = 0.5       # how often a worker checks that its coordinator still lives
LOOPBACK_NAMES = ("localhost",)  # besides 127.0.0.0/8 and ::1


class RequestError(Exception):
    """A request the worker refuses; ``code`` goes on the wire with the message."""

    def __init__(self, req_id: int, code: str, message: str):
        super().__init__(message)
        self.req_id, self.code = req_id, code


def watch_parent(parent_pid: int, on_orphaned) -> None:
    """Exit when the coordinator that started us is gone (we get re-parented)."""
    if parent_pid <= 0:
        return

    def loop():
        while True:
            if os.getppid() != parent_pid:
                log.warning("coordinator (pid %d) is gone; exiting", parent_pid)
                on_orphaned()
                os._exit(0)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def serve(bind: str, handler, *, parent_pid: int = 0, max_bytes: int = MAX_FRAME_BYTES,
          keys: ServerKeys | None = None) -> None:
    """Serve ``handler`` on ``bind`` until a Shutdown arrives.

    With ``keys`` the socket is a CURVE server and a ZAP authenticator on this context
    lets in only the allowlisted client keys.
    """
    check_bind(bind, keys)
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
    watch_parent(parent_pid, on_orphaned=lambda: ipc_path and _unlink(ipc_path))
    curve = f" with CurveZMQ, {len(keys.allowed)} allowed client key(s)" if keys else ""
    log.info("%s worker serving on %s%s (pid %d)", handler.role, bind, curve, os.getpid())
    try:
        while True:
            if not sock.poll(POLL_MS):
                continue
            frames = sock.recv_multipart(copy=True)
            peer, body = frames[0], frames[1:]
            reply = _dispatch(handler, body, max_bytes)
            if reply is _STOP:
                log.info("%s worker: shutdown requested", handler.role)
                return
            if reply is not None:
                sock.send_multipart([peer, *_encode_reply(reply)])
    finally:
        _close(ctx, sock, auth)
        if ipc_path:
            _unlink(ipc_path)


_STOP = object()


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


def _dispatch(handler, frames: list[bytes], max_bytes: int):
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
    req_id = getattr(msg, "req_id", -1)
    try:
        return handler.handle(msg)
    except RequestError as e:
        log.warning("request %d refused: %s", e.req_id, e)
        return Error(req_id=e.req_id, code=e.code, message=str(e))
    except Exception as e:  # keep serving: one bad request must not take the worker down
        log.exception("request %d failed", req_id)
        return Error(req_id=req_id, code="internal", message=f"{type(e).__name__}: {e}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def worker_parser(role: str, description: str) -> argparse.ArgumentParser:
    """The flags every worker takes; each role adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m dovetail.workers.{role}", description=description)
    p.add_argument("--bind", required=True, help="address to serve on (ipc://PATH or tcp://HOST:PORT)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 | float64 (auto: bf16 where the device has it)")
    p.add_argument("--cpus", default=None, help="CPUs to pin to, e.g. '0-31' or '0,2,4' (default: all)")
    p.add_argument("--max-requests", type=int, default=256, help="most requests open at once")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    p.add_argument("--log-level", default="info", help="debug | info | warning")
    p.add_argument("--curve-secret", default=None, metavar="FILE",
                   help=f"this worker's CurveZMQ secret key file (needed for tcp:// off loopback; {KEYS_COMMAND} writes it)")
    p.add_argument("--curve-allow", default=None, metavar="DIR",
                   help="folder of client public keys (*.key) allowed to connect; goes with --curve-secret")
    return p


def parse_config(config_cls, parser: argparse.ArgumentParser, argv=None):
    """Parse the command line straight into the role's config dataclass (validated there)."""
    args = vars(parser.parse_args(argv))
    try:
        return config_cls(**{k.replace("-", "_"): v for k, v in args.items()})
    except ValueError as e:
        parser.error(str(e))  # usage and the reason, exit code 2: a bad flag needs no traceback


def check_bind(bind: str, keys: ServerKeys | None = None) -> None:
    """Refuse addresses we cannot serve on, and tcp:// off loopback without CURVE keys."""
    if not bind.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"--bind must be an ipc:// or tcp:// address, got {bind!r}")
    if bind.startswith("tcp://") and keys is None and not is_loopback(bind):
        raise ValueError(
            f"--bind {bind} is reachable from other machines, and without keys anyone there could "
            f"drive this worker. Create keys with `{KEYS_COMMAND}` and pass --curve-secret "
            f"DIR/worker/server.key_secret --curve-allow DIR/worker/allow (or bind to 127.0.0.1)")


def is_loopback(tcp_address: str) -> bool:
    """True for tcp://127.x.x.x:PORT, tcp://[::1]:PORT and tcp://localhost:PORT only.

    Wildcards (*, 0.0.0.0), interface names and every other host count as reachable.
    """
    host = tcp_address[len("tcp://"):].rsplit(":", 1)[0]
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
