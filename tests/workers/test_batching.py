"""serve()'s compute thread gathers the verifications waiting in its inbox into one
verify_batch() call, and keeps every request's messages in order (in-process, no model)."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from dovetail.protocol import Close, Closed, Handshake, VerifyRequest, VerifyResult, decode, encode
from tests.workers.test_lifeline import dealer, free_address, stop

pytestmark = pytest.mark.timeout(30)


class Recording:
    """A handler whose first verification blocks until released; it records every call."""
    role, vocab_size, keys_by_peer, max_batch_rows = "target", 64, True, 8

    def __init__(self):
        self.calls: list[tuple[str, list[int]]] = []
        self.release = threading.Event()

    def handshake(self):
        return Handshake(role="target", vocab_size=64, tokenizer_hash="", hidden_size=0, dtype="", feature_codec="fp16")

    def handle(self, msg, peer=b""):
        if isinstance(msg, Close):
            self.calls.append(("close", [msg.req_id]))
            return Closed(msg.req_id)
        if not self.calls:
            self.release.wait(10)
        self.calls.append(("alone", [msg.req_id]))
        return VerifyResult(msg.req_id, msg.step, [], [5], 0)

    def verify_batch(self, items):
        self.calls.append(("batch", [m.req_id for _, m in items]))
        return [VerifyResult(m.req_id, m.step, [], [5], 0) for _, m in items]


def verify(req: int, n: int = 0) -> VerifyRequest:
    return VerifyRequest(req, 0, 1, list(range(2, 2 + n)), list(range(-1, n - 1)))


def test_waiting_verifications_go_in_one_batch_and_order_is_kept():
    from dovetail.workers.serve import serve
    handler = Recording()
    address = free_address()
    thread = threading.Thread(target=serve, args=(address, handler), daemon=True)
    thread.start()
    ctx = zmq.Context()
    try:
        with dealer(ctx, address) as s:
            s.send_multipart(encode(verify(1)))  # busy until released: the rest queue behind it
            time.sleep(0.3)
            for msg in (verify(2), verify(3, 2), verify(4, 3), Close(5), verify(6), verify(6), verify(7, 7)):
                s.send_multipart(encode(msg))
            time.sleep(0.3)
            handler.release.set()
            replies = [decode(s.recv_multipart()) for _ in range(8)]
        # 2, 3, 4 were waiting together (1 + 3 + 4 rows); the Close breaks the batch and keeps its
        # place; a second verification of request 6 waits for the first; 7 (8 rows) is past the bound.
        assert handler.calls == [("alone", [1]), ("batch", [2, 3, 4]), ("close", [5]), ("alone", [6]),
                                 ("alone", [6]), ("alone", [7])]
        assert [r.req_id for r in replies] == [1, 2, 3, 4, 5, 6, 6, 7]
        stop(ctx, address, thread)
    finally:
        ctx.term()


class Closing(Recording):
    """Knows which requests are still open and which verification needs no forward; request
    9's verification blocks until ``release`` is set (then it is cleared again)."""

    def __init__(self):
        super().__init__()
        self.closed: set[int] = set()
        self.free: set[int] = set()

    def handle(self, msg, peer=b""):
        if isinstance(msg, Close):
            self.closed.add(msg.req_id)
        elif msg.req_id == 9:
            self.release.wait(10)
            self.release.clear()
        self.calls.append(("close" if isinstance(msg, Close) else "alone", [msg.req_id]))
        return Closed(msg.req_id) if isinstance(msg, Close) else VerifyResult(msg.req_id, msg.step, [], [5], 0)

    def is_open(self, key):
        return key[1] not in self.closed

    def worth_waiting(self, key, msg):
        return key[1] not in self.free


def test_a_verification_waits_only_for_open_requests_that_need_a_forward(monkeypatch):
    """After a batch, a request's next verification waits a little for the batch's other
    requests; not for one that has closed since, and not at all when it needs no forward."""
    from dovetail.workers import serve as serve_mod
    monkeypatch.setattr(serve_mod, "BATCH_WAIT_MAX_S", 0.6)
    monkeypatch.setattr(serve_mod, "BATCH_WAIT_FRACTION", 1e9)  # any forward time: the whole 0.6 s
    handler = Closing()
    handler.closed.add(9)  # nobody waits for the blocker,
    handler.free.add(9)    # nor does it wait for anyone
    address = free_address()
    thread = threading.Thread(target=serve_mod.serve, args=(address, handler), daemon=True)
    thread.start()
    ctx = zmq.Context()

    def batch_2_and_3(s) -> None:
        s.send_multipart(encode(verify(9)))  # busy until released: 2 and 3 queue behind it
        time.sleep(0.1)
        s.send_multipart(encode(verify(2)))
        s.send_multipart(encode(verify(3)))
        time.sleep(0.1)
        handler.release.set()
        results = set()
        while len(results) < 3:  # (and a Taken for a verification that waited long)
            reply = decode(s.recv_multipart())
            results |= {reply.req_id} if isinstance(reply, VerifyResult) else set()
        assert handler.calls[-1] == ("batch", [2, 3])

    def answer_time(s, msg) -> float:
        t0 = time.monotonic()
        s.send_multipart(encode(msg))
        decode(s.recv_multipart())
        return time.monotonic() - t0

    try:
        with dealer(ctx, address) as s:
            batch_2_and_3(s)
            assert answer_time(s, verify(2)) >= 0.5  # 3 is open: its next verification is waited for
            batch_2_and_3(s)
            handler.free.add(2)
            assert answer_time(s, verify(2)) < 0.3  # no forward needed: no wait
            handler.free.discard(2)
            batch_2_and_3(s)
            s.send_multipart(encode(Close(3)))
            decode(s.recv_multipart())
            assert answer_time(s, verify(2)) < 0.3  # 3 closed: nobody to wait for
        stop(ctx, address, thread)
    finally:
        ctx.term()
