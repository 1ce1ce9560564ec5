"""DraftHealth on its own: how a failed draft call moves it, and the probe that brings it back."""
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from dovetail.protocol import Handshake, Heartbeat
from dovetail.runtime.client import WorkerClient, WorkerDied, WorkerError, WorkerTimeout, WorkerUnresponsive
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.coordinator import Coordinator
from dovetail.runtime.draft_health import DEAD, OK, SUSPECT, DraftHealth
from dovetail.workers.serve import serve

pytestmark = pytest.mark.timeout(30)

REPLY_S = 5.0      # how long each caller waits for its reply (they come in milliseconds)
ROUNDS = 40        # /metrics and the probe at once, this many times
OPEN_REQUESTS = 3  # what the worker's handshake reports


class ProbedClient:
    """Answers each heartbeat probe with the next of ``answers``: True echoes it, an exception raises."""

    def __init__(self, *answers):
        self.answers, self.sent, self.timeouts = list(answers), [], []

    def send(self, msg):
        self.sent.append(msg)

    def recv(self, match, timeout, knob):
        self.timeouts.append((timeout, knob))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert match(self.sent[-1])  # the probe's own echo is what it waits for
        return self.sent[-1]


def test_no_draft_is_dead_and_never_probed():
    health = DraftHealth(None, 1.0)
    assert health.state == DEAD and not health.usable()


def test_failures_mark_timeouts_suspect_and_deaths_dead():
    health = DraftHealth(ProbedClient(), 1.0)
    assert health.usable() and health.state == OK
    health.failed(WorkerError("draft", "bad", "refused one request"))  # the worker lives on
    assert health.state == OK
    health.failed(WorkerUnresponsive("draft", "timeout", "missed heartbeats"))
    assert health.state == SUSPECT
    health.failed(WorkerDied("draft", "died", "exit 1"))
    assert health.state == DEAD


def test_a_suspect_draft_is_probed_before_each_request_until_it_answers():
    client = ProbedClient(WorkerTimeout("draft", "timeout", "no echo"), True)
    health = DraftHealth(client, 0.25)
    health.failed(WorkerTimeout("draft", "timeout", "draft_timeout_s"))
    assert not health.usable() and health.state == SUSPECT  # first probe: still silent
    assert health.usable() and health.state == OK            # second probe answered
    assert [type(m) for m in client.sent] == [Heartbeat, Heartbeat]
    assert client.timeouts == [(0.25, "draft_probe_timeout_s")] * 2
    assert health.usable() and len(client.sent) == 2          # healthy: no more probes


def test_a_probe_that_finds_the_draft_dead_stops_probing():
    client = ProbedClient(WorkerDied("draft", "died", "gone"))
    health = DraftHealth(client, 0.25)
    health.failed(WorkerTimeout("draft", "timeout", "draft_timeout_s"))
    assert not health.usable() and health.state == DEAD
    assert not health.usable() and len(client.sent) == 1


def test_concurrent_requests_send_one_probe_at_a_time():
    """A suspect draft needs one answer: the requests that find a probe under way go target-only."""
    release, inside, most = threading.Event(), [], []

    class SlowEcho(ProbedClient):
        def recv(self, match, timeout, knob):
            inside.append(1)
            most.append(len(inside))
            release.wait(5)
            inside.pop()
            return self.sent[-1]

    health = DraftHealth(SlowEcho(), 5.0)
    health.failed(WorkerTimeout("draft", "timeout", "draft_timeout_s"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(health.usable())) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all four are in usable() by now; at most one may be probing
    release.set()
    for t in threads:
        t.join(5)
    assert max(most) == 1 and len(health.client.sent) == 1
    assert results.count(True) >= 1 and health.state == OK  # the prober; the others went target-only


# ---- the probe and /metrics on one real client at once ------------------------------------------
class HandshakeOnly:
    """The lightest handler serve() accepts; heartbeats are answered by serve() itself."""
    role, vocab_size = "draft", 64

    def handshake(self):
        return Handshake(role="draft", vocab_size=64, tokenizer_hash="", hidden_size=0, dtype="",
                         feature_codec="fp16", open_requests=OPEN_REQUESTS)

    def handle(self, msg):
        return None


@pytest.fixture
def draft_client(tmp_path):
    """A worker (serve() in a thread) and the coordinator's client to it."""
    address = f"ipc://{tmp_path}/draft.sock"
    thread = threading.Thread(target=serve, args=(address, HandshakeOnly()), name="test-worker", daemon=True)
    thread.start()
    ctx = zmq.Context()
    client = WorkerClient(ctx, "draft", address, None)
    try:
        yield client
    finally:
        client.request_shutdown()  # serve() returns on the Shutdown
        thread.join(REPLY_S)
        ctx.term()


def test_metrics_and_the_draft_probe_at_once_both_get_their_replies(draft_client):
    """/metrics' handshake and the probe's heartbeat both come back as replies about no request:
    each caller must get its own, however the two waits interleave, never time out because the
    other took and dropped it."""
    health = DraftHealth(draft_client, REPLY_S)
    coordinator = SimpleNamespace(target=None, _draft_client=draft_client,
                                  rounds=SimpleNamespace(config=CoordinatorConfig()))
    for _ in range(ROUNDS):
        health.state = SUSPECT
        start, got = threading.Barrier(2), {}

        def probe():
            start.wait()
            got["probe"] = health.usable()

        def metrics():
            start.wait()
            got["metrics"] = Coordinator.worker_requests(coordinator, REPLY_S)

        threads = [threading.Thread(target=probe), threading.Thread(target=metrics)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(2 * REPLY_S)
        assert got == {"probe": True, "metrics": {"draft": OPEN_REQUESTS}}
        assert health.state == OK


def test_replies_about_no_request_wait_for_their_caller_until_they_go_stale(draft_client, monkeypatch):
    """Taking one reply leaves the others for their callers; one whose caller gave up is dropped
    once it is UNCLAIMED_S old, so they cannot pile up."""
    import dovetail.runtime.client as client_mod
    for seq in (1, 2):
        draft_client.send(Heartbeat(seq, 0.0))
    for seq in (2, 1):  # the second caller's echo first: the first's is still there after
        assert draft_client.recv(lambda m, s=seq: isinstance(m, Heartbeat) and m.seq == s, REPLY_S, "test").seq == seq
    monkeypatch.setattr(client_mod, "UNCLAIMED_S", 0.0)
    draft_client.send(Heartbeat(3, 0.0))
    with pytest.raises(WorkerTimeout):
        draft_client.recv(lambda m: isinstance(m, Heartbeat) and m.seq == 3, 0.5, "test")
    assert not draft_client._untagged
