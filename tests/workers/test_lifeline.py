"""serve()'s I/O thread and the coordinator's heartbeats, in-process (no model, no root).

A busy handler must not look hung: liveness heartbeats (from dovetail/runtime/liveness.py's sockets)
are answered at once, while everything else keeps its order behind the model's work. A
worker with --heartbeat-timeout leaves after that much silence, counted from the first
message. A Liveness monitor marks a silent worker unresponsive and clears it again.
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import pytest
import zmq

from dovetail.runtime.client import WorkerClient, WorkerUnresponsive
from dovetail.runtime.liveness import Liveness
from dovetail.protocol import Close, Closed, Handshake, Heartbeat, Shutdown, configure_socket, decode, encode
from dovetail.workers.serve import HEARTBEAT_ID_PREFIX, serve

pytestmark = pytest.mark.timeout(30)

BUSY_S = 3.0  # a heartbeat answered "at once" takes under BUSY_S / 2 even on a busy 2-core box
_req = itertools.count(1)


class SlowHandler:
    """Each Close takes BUSY_S (a long prefill, say) unless ``fast`` is set."""
    role = "test"
    vocab_size = 64

    def __init__(self):
        self.fast = False

    def handshake(self):
        return Handshake(role="target", vocab_size=64, tokenizer_hash="", hidden_size=0, dtype="", feature_codec="fp16")

    def handle(self, msg):
        if not self.fast:
            time.sleep(BUSY_S)
        return Closed(msg.req_id)


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start(handler, **kw):
    address = free_address()
    thread = threading.Thread(target=serve, args=(address, handler), kwargs=kw, daemon=True)
    thread.start()
    return address, thread


def dealer(ctx, address: str, liveness: bool = False):
    sock = ctx.socket(zmq.DEALER)
    configure_socket(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if liveness:
        sock.setsockopt(zmq.ROUTING_ID, HEARTBEAT_ID_PREFIX + os.urandom(4).hex().encode())
    sock.connect(address)
    return sock


def ask(sock, msg, timeout_s: float):
    sock.send_multipart(encode(msg))
    t0 = time.monotonic()
    assert sock.poll(int(timeout_s * 1000)), f"no reply to {msg} within {timeout_s} s"
    return decode(sock.recv_multipart()), time.monotonic() - t0


def stop(ctx, address, thread):
    with dealer(ctx, address) as s:  # open until the worker is gone: linger 0 would drop the message
        s.send_multipart(encode(Shutdown()))
        thread.join(10)
    assert not thread.is_alive()


def test_liveness_heartbeats_are_answered_during_long_work_others_wait_their_turn():
    ctx = zmq.Context()
    handler = SlowHandler()
    address, thread = start(handler)
    try:
        work, beat = dealer(ctx, address), dealer(ctx, address, liveness=True)
        handler.fast = True
        ask(work, Close(next(_req)), 10)  # connected and serving
        handler.fast = False
        work.send_multipart(encode(Close(next(_req))))  # the handler is busy for BUSY_S
        time.sleep(0.1)
        reply, took = ask(beat, Heartbeat(seq=5, time=0.0), BUSY_S)
        assert isinstance(reply, Heartbeat) and reply.seq == 5 and took < BUSY_S / 2, took
        # On the request socket a Heartbeat stays in order: after the Closed it follows.
        work.send_multipart(encode(Heartbeat(seq=6, time=0.0)))
        got = [decode(work.recv_multipart()) for _ in range(2)]
        assert [type(m) for m in got] == [Closed, Heartbeat]
        handler.fast = True
        for s in (work, beat):
            s.close()
    finally:
        stop(ctx, address, thread)
        ctx.term()


def test_worker_leaves_after_heartbeat_timeout_of_silence_from_the_first_message():
    ctx = zmq.Context()
    handler = SlowHandler()
    handler.fast = True
    address, thread = start(handler, heartbeat_timeout=0.3)
    try:
        time.sleep(0.8)
        assert thread.is_alive()  # nobody has spoken yet: it waits for its first coordinator
        with dealer(ctx, address) as s:
            ask(s, Close(next(_req)), 10)
            t0 = time.monotonic()
            thread.join(5)
        assert not thread.is_alive()
        assert 0.25 < time.monotonic() - t0 < 3.0  # 0.3 s of silence, and slack for a busy machine
    finally:
        if thread.is_alive():
            stop(ctx, address, thread)
        ctx.term()


def test_liveness_marks_a_silent_worker_and_clears_it_when_it_answers():
    """A ROUTER that answers heartbeats only while ``answering`` is set."""
    ctx = zmq.Context()
    address = free_address()
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    answering, done = threading.Event(), threading.Event()
    answering.set()

    def fake_worker():
        while not done.is_set():
            if router.poll(20) and answering.is_set():
                peer, *body = router.recv_multipart()
                router.send_multipart([peer, *encode(decode(body))])
            elif not answering.is_set():
                while router.poll(0):
                    router.recv_multipart()  # swallowed: a hung worker

    t = threading.Thread(target=fake_worker, daemon=True)
    t.start()
    client = WorkerClient(ctx, "target", address, None)
    live = Liveness(ctx, interval_s=0.1, liveness=3).start()
    try:
        live.watch(client)
        time.sleep(0.5)
        client.check_alive()  # answering: fine
        answering.clear()
        t0 = time.monotonic()
        while client.unresponsive is None and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        # window + one interval + slack for a busy 2-core box (3-5x slower); never marked: 5 s
        assert 0.25 < time.monotonic() - t0 < 0.3 + 0.1 + 1.5
        with pytest.raises(WorkerUnresponsive, match="heartbeat_interval_s=0.1 x heartbeat_liveness=3"):
            client.check_alive()
        answering.set()
        t0 = time.monotonic()
        while client.unresponsive is not None and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        client.check_alive()
    finally:
        live.stop()
        done.set()
        t.join(5)
        client.discard()
        router.close(linger=0)
        ctx.term()
