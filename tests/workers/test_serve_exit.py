"""serve() frees the model only once its compute thread has stopped: a llama.cpp context
freed under a running llama_decode crashes the process on its way out."""
import threading
import time

import pytest
import zmq

from dovetail.protocol import Close, Closed, Handshake, configure_socket, encode
from dovetail.workers import serve as serve_mod

pytestmark = pytest.mark.timeout(60)


class BlockingHandler:
    """Each request blocks until ``release`` is set, like a long decode."""
    role, vocab_size = "target", 64

    def __init__(self, block: bool):
        self.block = block
        self.entered, self.release = threading.Event(), threading.Event()

    def handshake(self):
        return Handshake(role="target", vocab_size=64, tokenizer_hash="x", hidden_size=8)

    def handle(self, msg):
        self.entered.set()
        if self.block:
            self.release.wait(30)
        return Closed(msg.req_id)


def serve_until_silent(tmp_path, handler, freed: list) -> None:
    """serve() on its own thread; one request, then silence past --heartbeat-timeout."""
    address = f"ipc://{tmp_path}/w.sock"
    server = threading.Thread(target=serve_mod.serve, args=(address, handler), daemon=True,
                              kwargs={"heartbeat_timeout": 0.5, "release": lambda: freed.append(time.monotonic())})
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    configure_socket(sock)
    sock.connect(address)
    try:
        sock.send_multipart(encode(Close(7)))
        assert handler.entered.wait(10)
        server.join(20)  # silence ends the I/O loop; the compute thread gets COMPUTE_JOIN_S
        assert not server.is_alive()
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_model_busy_past_the_join_is_not_freed(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_mod, "COMPUTE_JOIN_S", 0.2)
    handler, freed = BlockingHandler(block=True), []
    try:
        serve_until_silent(tmp_path, handler, freed)
        assert freed == []  # the compute thread is still inside the request: left to the process exit
    finally:
        handler.release.set()


def test_an_idle_model_is_freed_on_exit(tmp_path):
    handler, freed = BlockingHandler(block=False), []
    serve_until_silent(tmp_path, handler, freed)
    assert len(freed) == 1
