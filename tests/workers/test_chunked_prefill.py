"""Chunked prefill: a long prompt goes into the target's KV cache a chunk at a time, and
serve()'s compute thread runs the other requests' verifications between chunks.

In-process (serve() on a thread, a raw DEALER), on a tiny float64 model. A backend whose
prefill sleeps per chunk stands for a big model on a slow CPU: what is tested is the order
in which the worker does things, which the sleep makes visible.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from dovetail.protocol import (
    Close, Closed, Handshake, OpenRequest, Opened, Taken, VerifyRequest, VerifyResult, decode, decode_features, encode,
)
from dovetail.workers.backend import HFBackend
from dovetail.workers.target import (
    DEFAULT_PREFILL_CHUNK, MIN_PREFILL_CHUNK, PREFILL_CHUNK_S, SOLO_CHUNK_S, TargetConfig, TargetHandler,
)
from tests.workers.test_lifeline import dealer, free_address, stop
from tests.workers.test_target_handler import VOCAB, sharpened_tiny_model

pytestmark = pytest.mark.timeout(60)

CHUNK = 8           # tokens a chunk
CHUNK_SLEEP_S = 0.05  # what each chunk costs on top of the tiny model
LONG = [(7 * i + 3) % VOCAB for i in range(160)]  # 20 chunks: about a second
SHORT = [1, 5, 9, 3, 7, 11, 2]


class SlowPrefill(HFBackend):
    """The tiny model, with every prefill call (one chunk) costing CHUNK_SLEEP_S more; one
    verification may be made slow too (``slow_verify_s``)."""
    chunk_sleep_s = CHUNK_SLEEP_S
    slow_verify_s = 0.0

    def prefill(self, seq, tokens, hidden=True):
        time.sleep(self.chunk_sleep_s)
        return super().prefill(seq, tokens, hidden)

    def verify(self, seq, root, tokens, parents, hidden=True):
        time.sleep(self.slow_verify_s)
        return super().verify(seq, root, tokens, parents, hidden)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return sharpened_tiny_model(tmp_path_factory.mktemp("chunked") / "model", seed=3)


def make_handler(model_path, chunk=CHUNK, backend_cls=SlowPrefill) -> TargetHandler:
    backend = backend_cls(str(model_path), dtype=torch.float64)
    return TargetHandler(backend, TargetConfig(bind="inproc://t", model=str(model_path), prefill_chunk=chunk))


@pytest.fixture
def served(model_path):
    handler = make_handler(model_path)
    address = free_address()
    thread = threading.Thread(target=serve_it, args=(address, handler), daemon=True)
    thread.start()
    ctx = zmq.Context()
    sock = dealer(ctx, address)
    try:
        yield handler, sock
    finally:
        sock.close(0)
        stop(ctx, address, thread)
        ctx.term()


def serve_it(address, handler):
    from dovetail.workers.serve import serve
    serve(address, handler)


def recv(sock, timeout_s: float = 10.0):
    assert sock.poll(int(timeout_s * 1000)), f"no reply within {timeout_s} s"
    return decode(sock.recv_multipart())


def test_verifications_of_a_stream_go_on_between_the_chunks_of_a_long_prefill(served):
    handler, sock = served
    sock.send_multipart(encode(OpenRequest(1, SHORT)))
    assert isinstance(recv(sock), Opened)
    sock.send_multipart(encode(OpenRequest(2, LONG)))  # about 20 chunks of CHUNK_SLEEP_S
    time.sleep(0.1)
    pending, step, rounds_during, gaps, last = SHORT[-1], 0, 0, [], time.monotonic()
    opened_long = None
    while opened_long is None:
        sock.send_multipart(encode(VerifyRequest(1, step, pending, [], [])))
        reply = recv(sock)
        while isinstance(reply, Opened):  # request 2's prefill ended meanwhile
            opened_long = reply
            reply = recv(sock)
        assert isinstance(reply, VerifyResult), reply
        now = time.monotonic()
        gaps.append(now - last)
        last, pending, step = now, reply.tokens[-1], step + 1
        rounds_during += opened_long is None
    # Before chunking, request 1's first verification waited for the whole prefill (~1 s).
    assert rounds_during >= 5, f"only {rounds_during} rounds of request 1 during request 2's prefill"
    assert max(gaps) < 6 * CHUNK_SLEEP_S, f"request 1 waited {max(gaps):.3f} s for a round"
    assert opened_long.cache_len == len(LONG) - 1


def test_a_close_during_the_prefill_stops_it_and_frees_the_request(served):
    handler, sock = served
    sock.send_multipart(encode(OpenRequest(3, LONG)))
    time.sleep(0.2)
    sock.send_multipart(encode(Close(3)))
    assert recv(sock) == Closed(3)  # no Opened before it: the prefill was not done
    assert not sock.poll(300), "an Opened came after the Close"
    assert not handler.prefilling and 3 not in {req for _, req in handler.sequences}
    sock.send_multipart(encode(Handshake(role="coordinator", vocab_size=0, tokenizer_hash="", hidden_size=0,
                                         dtype="", feature_codec="fp16")))
    assert recv(sock).open_requests == 0


def test_several_prefills_take_turns(served):
    """A short prompt sent after a long one is in first: the prefills share the chunks."""
    handler, sock = served
    sock.send_multipart(encode(OpenRequest(4, LONG)))
    time.sleep(0.1)
    sock.send_multipart(encode(OpenRequest(5, SHORT * 3)))  # 3 chunks
    first, second = recv(sock), recv(sock)
    assert (first.req_id, second.req_id) == (5, 4)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_a_prompt_prefilled_in_chunks_decodes_exactly_as_one_prefilled_whole(model_path, chunk):
    whole, pieces = make_handler(model_path, chunk=0, backend_cls=HFBackend), make_handler(
        model_path, chunk=chunk, backend_cls=HFBackend)
    prompt = LONG[:61]
    outs = []
    for h in (whole, pieces):
        opened = h.handle(OpenRequest(1, prompt))
        feats = decode_features(opened.features)
        pending, tokens = prompt[-1], []
        for step in range(12):
            res = h.handle(VerifyRequest(1, step, pending, [], []))
            pending = res.tokens[-1]
            tokens.append(pending)
        outs.append((opened.cache_len, feats, tokens))
    assert outs[0][0] == outs[1][0] == len(prompt) - 1
    assert torch.allclose(torch.as_tensor(outs[0][1]).double(), torch.as_tensor(outs[1][1]).double(), atol=1e-3)
    assert outs[0][2] == outs[1][2]


def test_a_verification_taken_up_late_is_acknowledged(served, monkeypatch):
    """A verification that waited behind a chunk longer than TAKEN_ACK_S gets a Taken first:
    the coordinator's verify timeout counts from there."""
    import dovetail.workers.serve as serve_mod
    handler, sock = served
    monkeypatch.setattr(serve_mod, "TAKEN_ACK_S", 0.02)
    handler.backend.chunk_sleep_s = 0.3
    sock.send_multipart(encode(OpenRequest(6, SHORT)))
    assert isinstance(recv(sock), Opened)
    sock.send_multipart(encode(OpenRequest(7, LONG)))
    time.sleep(0.05)  # request 7's first chunk is running
    sock.send_multipart(encode(VerifyRequest(6, 0, SHORT[-1], [], [])))
    got = [recv(sock), recv(sock)]
    assert got[0] == Taken(6, 0) and isinstance(got[1], VerifyResult)
    sock.send_multipart(encode(Close(7)))
    while not isinstance(recv(sock), Closed):
        pass


def test_a_verification_taken_up_at_once_is_not_acknowledged(served):
    handler, sock = served
    sock.send_multipart(encode(OpenRequest(8, SHORT)))
    assert isinstance(recv(sock), Opened)
    sock.send_multipart(encode(VerifyRequest(8, 0, SHORT[-1], [], [])))
    assert isinstance(recv(sock), VerifyResult)


def test_the_coordinators_verify_timeout_counts_from_the_take_up(model_path, monkeypatch):
    """A verification that waits 0.55 s behind a chunk, then takes 0.5 s itself, passes a 0.8 s
    verify timeout: the Taken restarts it. Without the restart it times out."""
    import dovetail.workers.serve as serve_mod
    from dovetail.runtime.client import WorkerClient, WorkerTimeout
    monkeypatch.setattr(serve_mod, "TAKEN_ACK_S", 0.05)
    handler = make_handler(model_path)
    address = free_address()
    thread = threading.Thread(target=serve_it, args=(address, handler), daemon=True)
    thread.start()
    ctx = zmq.Context()
    client = WorkerClient(ctx, "target", address, None)
    try:
        def verify_a(step, pending, restart):
            handler.backend.chunk_sleep_s, handler.backend.slow_verify_s = 0.0, 0.0
            client.send(OpenRequest(20 + step, LONG))
            handler.backend.chunk_sleep_s = 0.6
            time.sleep(0.2)  # the long prompt's chunk in progress: 0.6 s
            handler.backend.slow_verify_s = 0.5
            client.send(VerifyRequest(1, step, pending, [], []))
            return client.recv(lambda m: isinstance(m, VerifyResult) and m.req_id == 1 and m.step == step, 0.8,
                               "verify_timeout_s", 1,
                               restart=(lambda m: isinstance(m, Taken) and m.req_id == 1) if restart else None)

        assert isinstance(client.call(OpenRequest(1, SHORT), Opened, 10, "prefill_timeout_s"), Opened)
        res = verify_a(0, SHORT[-1], restart=True)
        assert res.step == 0
        with pytest.raises(WorkerTimeout, match="verify_timeout_s"):
            verify_a(1, res.tokens[-1], restart=False)
    finally:
        handler.backend.chunk_sleep_s, handler.backend.slow_verify_s = 0.0, 0.0
        client.discard()
        stop(ctx, address, thread)
        ctx.term()


def test_chunks_are_sized_by_time_and_grow_while_nobody_else_is_open(model_path):
    h = make_handler(model_path, chunk=0, backend_cls=HFBackend)
    assert h.chunk_tokens() == DEFAULT_PREFILL_CHUNK  # nothing measured yet
    h.verify_us = [10_000 * k for k in range(1, 65)]  # 10 ms a row
    h.prefilling[(b"", 1)] = object()  # one prefill, nothing else open: solo
    assert h.chunk_tokens() == int(SOLO_CHUNK_S / 0.010)
    h.sequences[(b"", 2)] = object()  # a stream is open: its rounds wait on each chunk
    assert h.chunk_tokens() == int(PREFILL_CHUNK_S / 0.010)
    h.prefill_us_per_token = 20_000  # chunks deep in the prompt cost more: they shrink
    assert h.chunk_tokens() == int(PREFILL_CHUNK_S / 0.020)
    h.prefill_us_per_token = 1e6
    assert h.chunk_tokens() == MIN_PREFILL_CHUNK


def test_after_a_chunk_the_next_waits_briefly_for_the_round_it_held_up(served):
    """A coordinator that sends its next verification only 20 ms after a chunk ended (it had no
    core during the chunk) still gets it in before the next chunk: the compute thread waits up
    to NEXT_ROUND_WAIT_S for it, so a round costs one chunk, not two."""
    import dovetail.workers.serve as serve_mod
    handler, sock = served
    chunk_s = 0.15
    assert serve_mod.NEXT_ROUND_WAIT_S > 0.02
    handler.backend.chunk_sleep_s = chunk_s
    sock.send_multipart(encode(OpenRequest(30, SHORT)))
    assert isinstance(recv(sock), Opened)
    sock.send_multipart(encode(OpenRequest(31, LONG)))
    time.sleep(0.05)
    pending, gaps, last = SHORT[-1], [], time.monotonic()
    for step in range(8):
        time.sleep(chunk_s + 0.02)  # the chunk that started after the last round, and 20 ms more
        sock.send_multipart(encode(VerifyRequest(30, step, pending, [], [])))
        reply = recv(sock)
        assert isinstance(reply, VerifyResult), reply
        now = time.monotonic()
        gaps.append(now - last)
        last, pending = now, reply.tokens[-1]
    # Without the wait a second chunk starts before the verification comes: rounds 0.3 s apart.
    assert sorted(gaps)[len(gaps) // 2] < chunk_s + 0.09, gaps
    handler.backend.chunk_sleep_s = CHUNK_SLEEP_S
    sock.send_multipart(encode(Close(31)))
    while not isinstance(recv(sock), Closed):
        pass
