"""DraftHealth on its own: how a failed draft call moves it, and the probe that brings it back."""
import threading
import time

import pytest

from dovetail.protocol import Heartbeat
from dovetail.runtime.client import WorkerDied, WorkerError, WorkerTimeout, WorkerUnresponsive
from dovetail.runtime.draft_health import DEAD, OK, SUSPECT, DraftHealth

pytestmark = pytest.mark.timeout(30)


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
    """Probes share the client's id-less mailbox: two waiting at once could take each other's echo."""
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
