"""Many requests at once: bounded admission, one terminal event each, nothing retracted or left.

Tiny float64 models, so every greedy output can be compared exactly with the same request
run alone. The workers hold at most WORKER_SLOTS requests each, equal to max_active: a
single request that leaked a worker sequence would make a later one fail with "busy".
"""
import os
import random
import signal
import threading

import pytest

import dovetail

pytestmark = pytest.mark.timeout(600)

N_REQUESTS = 64
WORKER_SLOTS = 8


@pytest.fixture(scope="module")
def coord(launch_tracked, tiny_target, tiny_draft_near):
    c = launch_tracked(tiny_target, tiny_draft_near, depth=3, top_k=2, max_nodes=6,
                       max_active=WORKER_SLOTS, max_pending=N_REQUESTS, worker_max_requests=WORKER_SLOTS)
    try:
        yield c
    finally:
        c.close()


def make_load(seed=0):
    rng = random.Random(seed)
    load = []
    for i in range(N_REQUESTS):
        prompt = [rng.randrange(2, 64) for _ in range(rng.randrange(1, 20))]
        cancel = i % 10 == 3  # 10% are cancelled after their first chunk
        load.append((prompt, 40 if cancel else rng.randrange(1, 40), cancel))
    return load


class Recorder:
    """Every event of one request, in the order the coordinator emitted them."""

    def __init__(self):
        self.events, self.lock = [], threading.Lock()
        self.handle = None
        self.cancel_after_first = False

    def __call__(self, kind, payload):
        with self.lock:
            self.events.append((kind, payload))
        if kind == "chunk" and self.cancel_after_first:
            self.handle.cancel()


def test_64_concurrent_requests_with_cancellations(coord):
    load = make_load()
    reference = [coord.generate(p, max_new_tokens=n).token_ids for p, n, _ in load]

    recorders = [Recorder() for _ in load]
    handles = []
    target = coord.worker_pids["target"]
    os.kill(target, signal.SIGSTOP)  # hold every request in flight while the 65th knocks
    try:
        for (prompt, n, cancel), rec in zip(load, recorders):
            rec.cancel_after_first = cancel
            rec.handle = h = coord.submit(prompt, max_new_tokens=n, on_event=rec)
            handles.append(h)
        with pytest.raises(dovetail.CoordinatorBusy, match="max_pending"):
            coord.submit([5, 6, 7], max_new_tokens=4)  # 64 in flight: the 65th is refused at once
    finally:
        os.kill(target, signal.SIGCONT)  # well inside the heartbeat window (3 x 1 s)

    for h in handles:
        h.result(timeout=300)
    for (prompt, n, cancel), rec, h, ref in zip(load, recorders, handles, reference):
        kinds = [k for k, _ in rec.events]
        assert kinds.count("done") + kinds.count("cancelled") + kinds.count("error") == 1, kinds
        assert kinds[-1] in ("done", "cancelled"), rec.events[-1]
        streamed = [t for k, c in rec.events if k == "chunk" for t in c.token_ids]
        result = h.result(timeout=1)
        assert streamed == result.token_ids == h.token_ids  # contiguous, nothing dropped
        if cancel:
            assert kinds[-1] == "cancelled" and result.stats.finish_reason == "cancelled"
            assert 0 < len(streamed) < n and streamed == ref[:len(streamed)]  # never retracted
        else:
            assert kinds[-1] == "done" and streamed == ref, (prompt, n)

    assert coord.in_flight == 0
    assert coord.target.open_mailboxes == [] and coord.draft.open_mailboxes == []
    # Every worker slot is free again: WORKER_SLOTS requests at once all succeed.
    again = [coord.submit(p, max_new_tokens=n) for p, n, _ in load[:WORKER_SLOTS]]
    assert [h.result(timeout=120).token_ids for h in again] == reference[:WORKER_SLOTS]


def test_streams_from_threads_are_each_identical_to_running_alone(coord):
    load = make_load(seed=1)[:16]
    reference = [coord.generate(p, max_new_tokens=n).token_ids for p, n, _ in load]
    out = [None] * len(load)

    def run(i):
        out[i] = [t for chunk in coord.stream(load[i][0], max_new_tokens=load[i][1]) for t in chunk.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(load))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == reference


def test_an_error_is_the_one_terminal_event(coord, monkeypatch):
    events = []
    real_run = coord.rounds.run

    def failing_run(*args, **kwargs):  # fails after its first round, as a worker fault would
        rounds = real_run(*args, **kwargs)
        yield next(rounds)
        rounds.close()
        raise RuntimeError("the target failed mid-request")

    monkeypatch.setattr(coord.rounds, "run", failing_run)
    h = coord.submit([1, 2, 3], max_new_tokens=5, on_event=lambda k, p: events.append(k))
    with pytest.raises(RuntimeError, match="mid-request"):
        h.result(timeout=60)
    monkeypatch.undo()
    assert events[0] == "chunk"
    assert events.count("error") == 1 and events[-1] == "error" and h.terminal == "error"
    assert coord.in_flight == 0 and coord.generate([1, 2, 3], max_new_tokens=3).stats.new_tokens == 3
