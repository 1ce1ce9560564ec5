"""A real target worker process against hostile and broken peers.

One worker (``python -m dovetail.workers.target``) serves the whole module; a raw ZeroMQ
DEALER sends it bad frames and bad messages. Each must be answered with an Error carrying
a sensible code, and the worker must go on serving. Every wait polls with a timeout and
watches the process, so a crash fails fast with the worker's log.

The oversize test sends a real frame one byte over MAX_FRAME_BYTES (64 MiB; the worker has
no CLI flag to lower its cap): libzmq's MAXMSGSIZE drops the connection before the worker
sees anything, so there is no Error reply; the worker must survive and serve the peer once
it reconnects. decode()'s own "oversize" check is covered by the protocol unit tests.

The Shutdown test runs last: it ends the worker.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

zmq = pytest.importorskip("zmq")

from dovetail.protocol import (  # noqa: E402
    HEADER, MAX_FRAME_BYTES, PROTOCOL_TAG, PROTOCOL_VERSION, Close, Closed, DraftRequest, Error,
    Handshake, Heartbeat, OpenRequest, Opened, Shutdown, VerifyRequest, VerifyResult,
    configure_socket, decode, decode_features, encode,
)

pytestmark = pytest.mark.timeout(60)

VOCAB = 64
HIDDEN = 32
REPLY_TIMEOUT_S = 15.0  # replies take ms; a 2-core box that other processes keep busy is slower
STARTUP_TIMEOUT_S = 60.0
_seq = itertools.count(1)
_req = itertools.count(1000)


class Worker:
    """One target worker process on an ipc socket, restartable if a test kills it."""

    def __init__(self, model: Path, on_start=lambda pid: None):
        self.model = model
        self.on_start = on_start
        self.dir = Path(tempfile.mkdtemp(prefix="dvt-serve-"))  # short: ipc paths are limited
        self.sock_path = self.dir / "t.sock"
        self.address = f"ipc://{self.sock_path}"
        self.log_path = self.dir / "worker.log"
        self.ctx = zmq.Context()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dovetail.workers.target", "--bind", self.address,
                 "--model", str(self.model), "--dtype", "float64", "--log-level", "warning",
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        self.starts += 1
        self.on_start(self.proc.pid)
        with self.dealer() as sock:
            hs = exchange(self, sock, encode(HELLO), timeout=STARTUP_TIMEOUT_S)
        assert isinstance(hs, Handshake), hs

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def dealer(self):
        sock = self.ctx.socket(zmq.DEALER)
        configure_socket(sock)
        sock.connect(self.address)
        return sock

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


HELLO = Handshake(role="coordinator", vocab_size=0, tokenizer_hash="", hidden_size=0, dtype="",
                  feature_codec="fp16", pid=os.getpid())


def receive(worker: Worker, sock, timeout: float = REPLY_TIMEOUT_S):
    """The next reply, decoded; fails (with the worker's log) on timeout or worker exit."""
    deadline = time.monotonic() + timeout
    while True:
        if sock.poll(50):
            return decode(sock.recv_multipart(), vocab_size=VOCAB)
        rc = worker.proc.poll()
        if rc is not None:
            pytest.fail(f"the worker exited with code {rc}; its log:\n{worker.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no reply within {timeout} s; worker log:\n{worker.log()}")


def exchange(worker: Worker, sock, frames, timeout: float = REPLY_TIMEOUT_S):
    sock.send_multipart(frames)
    return receive(worker, sock, timeout)


def assert_serving(worker: Worker, sock) -> None:
    seq = next(_seq)
    reply = exchange(worker, sock, encode(Heartbeat(seq=seq, time=0.0)))
    assert reply == Heartbeat(seq=seq, time=reply.time), reply
    assert abs(reply.time - time.time()) < 60


@pytest.fixture(scope="module")
def worker(tiny_target, pids):
    w = Worker(tiny_target, on_start=pids.track)
    try:
        w.start()
        yield w
    finally:
        w.stop()


@pytest.fixture
def sock(worker):
    s = worker.dealer()
    try:
        yield s
    finally:
        s.close(linger=0)


# ---- frames --------------------------------------------------------------------------------
def header(type_code: int, version: int = PROTOCOL_VERSION, tag: bytes = PROTOCOL_TAG) -> bytes:
    return HEADER.pack(tag, version, type_code)


def packed(type_code: int, body) -> list[bytes]:
    return [header(type_code), msgpack.packb(body, use_bin_type=True)]


_rng = random.Random(20240611)


def _random_bytes(n: int) -> bytes:
    return bytes(_rng.getrandbits(8) for _ in range(n))


HB_HEADER, HB_BODY = encode(Heartbeat(seq=1, time=1.5))
OPEN_HEADER, OPEN_BODY = encode(OpenRequest(req_id=1, prompt=[1, 2, 3]))
OPEN = dict(req_id=1, prompt=[1, 2, 3], temperature=0.0, top_p=1.0, seed=0)
VERIFY = dict(req_id=1, step=0, root=3, tokens=[4, 5], parents=[-1, 0])
DRAFT = dict(req_id=1, step=1, base_len=0, new_tokens=[1], depth=1, top_k=1, max_nodes=1,
             guess_root=False, features=None)
FEATURE = dict(codec="fp16", dtype="float16", shape=[2, 4], data=b"\0" * 16, scales=b"")

BAD_FRAMES = {
    # framing
    "random-bytes-two-frames": ([b"\x00" + _random_bytes(6), _random_bytes(64)], "bad_header"),
    "random-bytes-one-frame": ([_random_bytes(100)], "malformed"),
    "single-frame-header-only": ([HB_HEADER], "malformed"),
    "single-frame-body-only": ([HB_BODY], "malformed"),
    "empty-frame": ([b""], "malformed"),
    "three-frames": ([HB_HEADER, HB_BODY, b""], "malformed"),
    # header
    "header-truncated": ([HB_HEADER[:-1], HB_BODY], "bad_header"),
    "header-too-long": ([HB_HEADER + b"\0", HB_BODY], "bad_header"),
    "header-empty": ([b"", HB_BODY], "bad_header"),
    "wrong-tag": ([header(Heartbeat.TYPE, tag=b"DVTX"), HB_BODY], "bad_header"),
    "wrong-version-99": ([header(Heartbeat.TYPE, version=99), HB_BODY], "wrong_version"),
    "wrong-version-0": ([header(Heartbeat.TYPE, version=0), HB_BODY], "wrong_version"),
    "unknown-type-0": ([header(0), HB_BODY], "unknown_type"),
    "unknown-type-200": ([header(200), HB_BODY], "unknown_type"),
    # msgpack body
    "body-truncated": ([OPEN_HEADER, OPEN_BODY[:-2]], "malformed"),
    "body-empty": ([HB_HEADER, b""], "malformed"),
    "body-garbage": ([HB_HEADER, b"\xc1\xc1 this is not msgpack"], "malformed"),
    "body-random": ([OPEN_HEADER, b"\xc1" + _random_bytes(40)], "malformed"),
    "body-not-a-map": ([HB_HEADER, msgpack.packb([1, 2, 3])], "malformed"),
    "extra-data-after-body": ([HB_HEADER, HB_BODY + b"\xc0"], "malformed"),
    "deeply-nested-arrays": ([HB_HEADER, b"\x91" * 100_000 + b"\xc0"], "malformed"),
    "deeply-nested-maps": ([OPEN_HEADER, b"\x81\xa1a" * 5_000 + b"\xc0"], "malformed"),
    "array-claims-4G-items": ([OPEN_HEADER, b"\x81\xa6prompt\xdd\xff\xff\xff\xff"], "malformed"),
    "msgpack-ext-type": ([HB_HEADER, msgpack.packb(msgpack.ExtType(5, b"abc"))], "malformed"),
    # fields
    "unknown-field": (packed(OpenRequest.TYPE, {**OPEN, "evil": 1}), "bad_field"),
    "missing-field": (packed(OpenRequest.TYPE, {k: v for k, v in OPEN.items() if k != "prompt"}), "bad_field"),
    "wrong-field-type": (packed(OpenRequest.TYPE, {**OPEN, "prompt": "1 2 3"}), "bad_field"),
    "bool-for-int": (packed(OpenRequest.TYPE, {**OPEN, "req_id": True}), "bad_field"),
    "int-over-64-bits": (packed(OpenRequest.TYPE, {**OPEN, "seed": 2**64 - 1}), "bad_field"),
    "nan-float": (packed(Heartbeat.TYPE, {"seq": 1, "time": float("nan")}), "bad_field"),
    "negative-req-id": (packed(Close.TYPE, {"req_id": -5}), "bad_field"),
    # token ids and trees
    "open-empty-prompt": (packed(OpenRequest.TYPE, {**OPEN, "prompt": []}), "bad_field"),
    "open-token-past-vocab": (packed(OpenRequest.TYPE, {**OPEN, "prompt": [1, VOCAB]}), "bad_field"),
    "open-negative-token": (packed(OpenRequest.TYPE, {**OPEN, "prompt": [1, -1]}), "bad_field"),
    "verify-root-past-vocab": (packed(VerifyRequest.TYPE, {**VERIFY, "root": VOCAB}), "bad_field"),
    "verify-tree-token-past-vocab": (packed(VerifyRequest.TYPE, {**VERIFY, "tokens": [4, 10_000]}), "bad_field"),
    "verify-child-before-parent": (packed(VerifyRequest.TYPE, {**VERIFY, "parents": [1, -1]}), "bad_field"),
    "verify-parents-not-parallel": (packed(VerifyRequest.TYPE, {**VERIFY, "parents": [-1]}), "bad_field"),
    "verify-tree-over-1024-nodes": (packed(VerifyRequest.TYPE, {**VERIFY, "tokens": [1] * 1025,
                                                                "parents": [-1] * 1025}), "bad_field"),
    # features
    "feature-wrong-byte-length": (packed(DraftRequest.TYPE, {**DRAFT, "features": {**FEATURE, "data": b"\0" * 10}}),
                                  "bad_field"),
    "feature-int8-without-scales": (packed(DraftRequest.TYPE, {**DRAFT, "features": {
        **FEATURE, "codec": "int8", "dtype": "int8", "data": b"\0" * 8}}), "bad_field"),
    "feature-dtype-mismatch": (packed(DraftRequest.TYPE, {**DRAFT, "features": {**FEATURE, "dtype": "float32"}}),
                               "bad_field"),
    "feature-huge-shape": (packed(DraftRequest.TYPE, {**DRAFT, "features": {**FEATURE, "shape": [2**40, 2**40]}}),
                           "bad_field"),
    "feature-not-a-map": (packed(DraftRequest.TYPE, {**DRAFT, "features": [1, 2]}), "bad_field"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_gets_an_error_and_the_worker_keeps_serving(worker, sock, case):
    frames, code = BAD_FRAMES[case]
    reply = exchange(worker, sock, frames)
    assert isinstance(reply, Error), reply
    assert (reply.req_id, reply.code) == (-1, code), reply
    assert reply.message
    assert_serving(worker, sock)


def test_mutated_messages_each_get_one_reply(worker, sock):
    """Random byte flips in valid bodies: whatever they decode to, one reply each, no crash."""
    rng = random.Random(7)
    valid = [encode(Heartbeat(seq=3, time=2.0)), encode(Close(req_id=99)),
             encode(VerifyRequest(req_id=98, step=0, root=1, tokens=[2, 3], parents=[-1, 0])),
             encode(DraftRequest(req_id=97, step=1, base_len=0, new_tokens=[1], depth=2, top_k=1, max_nodes=2)),
             encode(OpenRequest(req_id=96, prompt=[1, 2, 3], temperature=0.5, seed=4)), encode(HELLO)]
    codes = set()
    for i in range(150):
        head, body = rng.choice(valid)
        body = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.getrandbits(8)
        reply = exchange(worker, sock, [head, bytes(body)])
        if isinstance(reply, Error):
            codes.add(reply.code)
        elif isinstance(reply, Opened):  # a mutation that still opens a request: close it
            assert isinstance(exchange(worker, sock, encode(Close(reply.req_id))), Closed)
    assert codes  # most mutations are refused
    assert_serving(worker, sock)


def malformed_frames(n: int, seed: int = 11):
    """n bad frames: every BAD_FRAMES kind in turn, with random bytes and mutations between."""
    rng, kinds = random.Random(seed), list(BAD_FRAMES.values())
    valid = [encode(OpenRequest(req_id=95, prompt=[1, 2, 3])),
             encode(VerifyRequest(req_id=94, step=0, root=1, tokens=[2, 3], parents=[-1, 0]))]
    for i in range(n):
        if i % 3 == 0:
            yield kinds[(i // 3) % len(kinds)][0]
        elif i % 3 == 1:
            yield [header(rng.choice([1, 2, 4, 6, 8])), _random_bytes(rng.randrange(0, 200))]
        else:  # a valid message cut short, or with junk appended: never decodes cleanly
            head, body = rng.choice(valid)
            yield [head, body[:rng.randrange(len(body))] if rng.random() < 0.5 else body + b"\xc1"]


def test_a_thousand_malformed_frames_each_rejected_in_bounded_memory(worker, sock):
    import psutil
    proc = psutil.Process(worker.proc.pid)
    for frames in malformed_frames(50):  # warm up allocator pools before the baseline
        exchange(worker, sock, frames)
    rss0 = proc.memory_info().rss
    codes = {}
    for frames in malformed_frames(1000, seed=12):
        reply = exchange(worker, sock, frames)
        assert isinstance(reply, Error), reply
        codes[reply.code] = codes.get(reply.code, 0) + 1
    grown = proc.memory_info().rss - rss0
    assert grown < 32 << 20, f"worker RSS grew by {grown >> 20} MiB over 1000 bad frames"
    assert {"malformed", "bad_header", "wrong_version", "bad_field"} <= set(codes), codes
    assert_serving(worker, sock)


# ---- well-formed requests the worker refuses -----------------------------------------------
def test_requests_the_worker_refuses_name_the_request(worker, sock):
    req = next(_req)

    def refused(msg, code):
        reply = exchange(worker, sock, encode(msg))
        assert isinstance(reply, Error) and (reply.req_id, reply.code) == (req, code), reply

    refused(VerifyRequest(req_id=req, step=0, root=1, tokens=[], parents=[]), "unknown_request")
    refused(DraftRequest(req_id=req, step=1, base_len=0, new_tokens=[1], depth=1, top_k=1, max_nodes=1), "unexpected")
    refused(Opened(req_id=req, cache_len=0), "unexpected")
    refused(VerifyResult(req_id=req, step=0, accepted=[], tokens=[1], cache_len=1), "unexpected")

    assert isinstance(exchange(worker, sock, encode(OpenRequest(req_id=req, prompt=[1, 2]))), Opened)
    refused(OpenRequest(req_id=req, prompt=[1, 2]), "duplicate")
    refused(VerifyRequest(req_id=req, step=1, root=2, tokens=[], parents=[]), "stale_step")
    refused(VerifyRequest(req_id=req, step=0, root=3, tokens=[], parents=[]), "bad_root")
    # None of these moved the request on: step 0 with the right root still works.
    ok = exchange(worker, sock, encode(VerifyRequest(req_id=req, step=0, root=2, tokens=[], parents=[])))
    assert isinstance(ok, VerifyResult) and ok.step == 0 and ok.cache_len == 2
    assert exchange(worker, sock, encode(Close(req))) == Closed(req)
    assert_serving(worker, sock)


# ---- a valid session after all that ---------------------------------------------------------
def greedy_continuation(model_path: Path, prompt: list[int], n: int) -> list[int]:
    """Reference greedy tokens computed in this process with plain transformers (no cache)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float64).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_valid_session_works(worker, sock, tiny_target):
    prompt = [1, 5, 9, 13]
    g = greedy_continuation(tiny_target, prompt, 8)

    hs = exchange(worker, sock, encode(HELLO))
    assert isinstance(hs, Handshake)
    assert (hs.role, hs.vocab_size, hs.hidden_size, hs.dtype, hs.feature_codec) == (
        "target", VOCAB, HIDDEN, "float64", "fp16")
    assert hs.pid == worker.proc.pid and hs.model == tiny_target.name

    req = next(_req)
    opened = exchange(worker, sock, encode(OpenRequest(req_id=req, prompt=prompt)))
    assert isinstance(opened, Opened) and opened.req_id == req
    assert opened.cache_len == len(prompt) - 1  # the last prompt token is the first root
    assert decode_features(opened.features).shape == (len(prompt) - 1, HIDDEN)

    def verify(step, root, tokens, parents):
        res = exchange(worker, sock, encode(VerifyRequest(req, step, root, tokens, parents)))
        assert isinstance(res, VerifyResult) and (res.req_id, res.step) == (req, step), res
        assert decode_features(res.features).shape == (len(res.accepted) + 1, HIDDEN)
        return res

    n = len(prompt)
    res = verify(0, prompt[-1], [], [])  # no draft: one token
    assert (res.accepted, res.tokens, res.cache_len) == ([], [g[0]], n)
    wrong = (g[3] + 1) % VOCAB
    res = verify(1, g[0], [g[1], g[2], wrong], [-1, 0, 1])  # a chain, rejected at its third token
    assert (res.accepted, res.tokens, res.cache_len) == ([0, 1], [g[1], g[2], g[3]], n + 3)
    # A tree: the root's first child is wrong, its second is right, and so on down.
    res = verify(2, g[3], [(g[4] + 1) % VOCAB, g[4], (g[5] + 1) % VOCAB, g[5]], [-1, -1, 1, 1])
    assert (res.accepted, res.tokens, res.cache_len) == ([1, 3], [g[4], g[5], g[6]], n + 6)
    res = verify(3, g[6], [g[7]], [-1])  # after keeping a tree path, the cache still agrees
    assert res.tokens[0] == g[7] and res.cache_len == n + 8

    assert exchange(worker, sock, encode(Close(req))) == Closed(req)
    reply = exchange(worker, sock, encode(VerifyRequest(req, 4, res.tokens[-1], [], [])))
    assert isinstance(reply, Error) and reply.code == "unknown_request"


def test_two_peers_each_get_their_own_replies(worker):
    a, b = worker.dealer(), worker.dealer()
    try:
        seqs = {}
        for s in (a, b, a, b):
            seqs.setdefault(s, []).append(next(_seq))
            s.send_multipart(encode(Heartbeat(seq=seqs[s][-1], time=0.0)))
        for s in (a, b):
            got = [receive(worker, s).seq for _ in seqs[s]]
            assert got == seqs[s]
    finally:
        a.close(linger=0)
        b.close(linger=0)


@pytest.mark.timeout(120)
def test_oversize_frame_is_dropped_and_the_worker_survives(worker, sock):
    big = [HB_HEADER, bytes(MAX_FRAME_BYTES + 1)]
    sock.send_multipart(big, copy=False)
    del big
    assert sock.poll(1500) == 0  # libzmq dropped the connection: no reply at all
    assert worker.proc.poll() is None
    # The DEALER reconnects by itself; keep asking until the worker answers.
    deadline = time.monotonic() + 60  # reconnecting takes ms; a busy 2-core box is slower
    seq = next(_seq)
    while True:
        sock.send_multipart(encode(Heartbeat(seq=seq, time=0.0)))
        if sock.poll(500):
            reply = decode(sock.recv_multipart())
            assert isinstance(reply, Heartbeat) and reply.seq == seq, reply
            break
        assert worker.proc.poll() is None, worker.log()
        assert time.monotonic() < deadline, "the worker never answered again after the oversize frame"
    while sock.poll(300):  # answers to retries that were queued while reconnecting
        extra = decode(sock.recv_multipart())
        assert isinstance(extra, Heartbeat) and extra.seq == seq, extra
    assert_serving(worker, sock)


def test_error_about_a_long_field_name_does_not_kill_the_worker(worker, sock):
    reply = exchange(worker, sock, packed(OpenRequest.TYPE, {**OPEN, "x" * 5000: 1}))
    assert isinstance(reply, Error) and reply.code == "bad_field", reply
    assert_serving(worker, sock)


def test_two_coordinators_with_the_same_request_id_keep_their_own_requests(worker, tiny_target):
    """A target serving two coordinators (two hosts) keys requests by peer: the same id from
    both opens two requests, each verifies against its own prompt, and one's Close leaves the
    other's request open."""
    a, b = worker.dealer(), worker.dealer()
    prompts = {a: [1, 5, 9, 13], b: [2, 4, 8, 16, 32]}
    try:
        for s in (a, b):
            opened = exchange(worker, s, encode(OpenRequest(req_id=77, prompt=prompts[s])))
            assert isinstance(opened, Opened) and opened.cache_len == len(prompts[s]) - 1, opened
        assert exchange(worker, b, encode(Close(77))) == Closed(77)
        res = exchange(worker, a, encode(VerifyRequest(77, 0, prompts[a][-1], [], [])))
        assert isinstance(res, VerifyResult) and res.tokens == greedy_continuation(tiny_target, prompts[a], 1)
        reply = exchange(worker, b, encode(VerifyRequest(77, 0, prompts[b][-1], [], [])))
        assert isinstance(reply, Error) and reply.code == "unknown_request"  # b's own request is closed
        assert exchange(worker, a, encode(Close(77))) == Closed(77)
    finally:
        a.close(linger=0)
        b.close(linger=0)


# Last: ends the worker.
def test_shutdown_exits_with_code_zero(worker):
    worker.ensure_running()  # the test above kills it while that bug stands
    s = worker.dealer()
    try:
        assert_serving(worker, s)
        s.send_multipart(encode(Shutdown()))
        assert worker.proc.wait(10) == 0
        assert s.poll(200) == 0  # no reply to a Shutdown
    finally:
        s.close(linger=0)
    assert not worker.sock_path.exists()  # the worker removed its ipc socket file
