"""serve(sessions=True): one worker, many coordinators, one after another and at once.

The server runs in a process of its own (signals reach only a main thread) with a small
handler that keeps open requests per (peer, request id), as the target's does, and reports
them in its handshake. The clients are the coordinator's own WorkerClient and Liveness, so
the tie between a client's request socket and its heartbeat socket is the real one.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from dovetail.protocol import SESSION_ID_PREFIX, Close, Closed, Handshake, Opened, OpenRequest
from dovetail.runtime.client import WorkerClient
from dovetail.runtime.liveness import Liveness

pytestmark = pytest.mark.timeout(60)

REPLY_S = 10.0
SILENCE_S = 0.8   # the server's per-session --heartbeat-timeout

SERVER = textwrap.dedent("""
    import json, logging, sys
    from dovetail.protocol import Close, Closed, Handshake, Opened, OpenRequest
    from dovetail.workers.serve import serve

    class Handler:
        role, vocab_size, keys_by_peer = "target", 64, True

        def __init__(self):
            self.open = set()

        def handshake(self):  # the open requests, for the test to read
            return Handshake(role="target", vocab_size=64, tokenizer_hash="", hidden_size=0, dtype="",
                             feature_codec="fp16", model=json.dumps(sorted([p.hex(), r] for p, r in self.open)))

        def handle(self, msg, peer):
            if isinstance(msg, OpenRequest):
                self.open.add((peer, msg.req_id))
                return Opened(msg.req_id, len(msg.prompt))
            self.open.discard((peer, msg.req_id))
            return Closed(msg.req_id)

        def drop_peer(self, peer):
            mine = {k for k in self.open if k[0] == peer}
            self.open -= mine
            return len(mine)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(sys.argv[1], Handler(), heartbeat_timeout=float(sys.argv[2]), sessions=True,
          release=lambda: print("released", flush=True))
    print("stopped", flush=True)
""")


@pytest.fixture
def server(tmp_path):
    address = f"ipc://{tmp_path}/w.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, address, str(SILENCE_S)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    ctx = zmq.Context()
    clients = []

    def client():
        c = WorkerClient(ctx, "target", address, None)
        clients.append(c)
        return c

    try:
        yield proc, address, client, ctx
    finally:
        for c in clients:
            c.discard()
        ctx.term()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def open_request(c: WorkerClient, req_id: int) -> None:
    c.call(OpenRequest(req_id, [1, 2, 3]), Opened, REPLY_S, "test")


def open_requests(c: WorkerClient) -> set[tuple[bytes, int]]:
    """(session, request id) of every request the server keeps, asked through ``c``."""
    hello = Handshake(role="coordinator", vocab_size=0, tokenizer_hash="", hidden_size=0, dtype="", feature_codec="fp16")
    reply = c.call(hello, Handshake, REPLY_S, "test")
    return {(bytes.fromhex(p).removeprefix(SESSION_ID_PREFIX), r) for p, r in json.loads(reply.model)}


def wait_for(check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (ok := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ok


def test_a_clients_shutdown_ends_its_session_and_the_server_serves_the_next(server):
    proc, _, client, _ = server
    a, b = client(), client()
    open_request(a, 1)
    open_request(b, 1)  # the same id from another client: its own request
    assert open_requests(b) == {(a.session, 1), (b.session, 1)}
    a.request_shutdown()  # what Coordinator.close() sends a remote target
    assert wait_for(lambda: open_requests(b) == {(b.session, 1)}, REPLY_S), open_requests(b)
    c = client()  # a later coordinator
    open_request(c, 1)
    assert open_requests(c) == {(b.session, 1), (c.session, 1)}
    b.call(Close(1), Closed, REPLY_S, "test")  # b closes its own request, and only that
    assert open_requests(c) == {(c.session, 1)}
    assert proc.poll() is None


def test_a_silent_client_loses_its_session_while_one_that_heartbeats_keeps_it(server):
    proc, _, client, ctx = server
    quiet, alive = client(), client()
    live = Liveness(ctx, interval_s=0.1, liveness=100).start()
    try:
        live.watch(alive)  # only its heartbeat socket speaks from here on
        open_request(quiet, 7)
        open_request(alive, 7)
        time.sleep(3 * SILENCE_S)
        observer = client()
        assert open_requests(observer) == {(alive.session, 7)}
        alive.call(Close(7), Closed, REPLY_S, "test")
        assert open_requests(observer) == set()
    finally:
        live.stop()
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=REPLY_S)
    assert f"sent nothing for {SILENCE_S:g} s" in err and "closed its 1 open request(s)" in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_server_cleanly(server, tmp_path, sig):
    proc, address, client, _ = server
    open_request(client(), 1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=REPLY_S)
    assert proc.returncode == 0, err
    assert out.split() == ["released", "stopped"], (out, err)  # the model freed, then serve() returned
    assert not (tmp_path / "w.sock").exists()
    assert "Traceback" not in err, err
