"""configure_socket against real libzmq sockets.

libzmq enforces MAXMSGSIZE in its stream decoder only, so this uses tcp on
loopback: over inproc:// an oversize message is delivered (decode's own
max_bytes check is the guard there).
"""
import pytest

zmq = pytest.importorskip("zmq")

from dovetail.protocol import Close, OpenRequest, configure_socket, decode, encode  # noqa: E402

LIMIT = 1024


@pytest.fixture
def pair():
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        for sock in (rx, tx):
            configure_socket(sock, max_bytes=LIMIT)
            sock.setsockopt(zmq.SNDTIMEO, 2000)
            sock.setsockopt(zmq.RCVTIMEO, 2000)
        rx.bind("tcp://127.0.0.1:*")
        tx.connect(rx.getsockopt(zmq.LAST_ENDPOINT).decode())
        yield rx, tx
    finally:
        rx.close(linger=0)
        tx.close(linger=0)
        ctx.term()


def test_configure_socket_sets_options(pair):
    rx, _ = pair
    assert rx.getsockopt(zmq.MAXMSGSIZE) == LIMIT
    assert rx.getsockopt(zmq.LINGER) == 0


def test_oversize_message_is_dropped_by_libzmq(pair):
    rx, tx = pair
    big = encode(OpenRequest(1, [100_000] * 2000))
    assert len(big[1]) > LIMIT
    tx.send_multipart(big)
    assert rx.poll(300) == 0  # dropped (and that connection reset) before reaching us
    # The peer reconnects, and frames under the limit still go through.
    tx.send_multipart(encode(Close(1)))
    assert rx.poll(10_000) == zmq.POLLIN  # reconnects take ms; a busy machine is slower
    assert decode(rx.recv_multipart(copy=False), max_bytes=LIMIT) == Close(1)  # zmq.Frame ok
