"""Failed calls and close() leave nothing behind: no sequence in a worker, no open mailbox,
no request cut off by a vanished socket, and the draft stays in use."""
import dataclasses
import threading
import time

import pytest

import dovetail

pytestmark = pytest.mark.timeout(300)

SLOTS = 2  # each worker's --max-requests: a third leaked request would make it answer busy
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def coord(launch_tracked, tiny_target):
    # The target as its own draft: every draft is accepted, so a draft in use shows as τ > 1.
    c = launch_tracked(tiny_target, tiny_target, worker_max_requests=SLOTS, overlap=False,
                       depth=3, top_k=1, max_nodes=3, auto_tree=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def settings(coord):
    """Change coord.config for one test; restored afterwards."""
    saved = coord.config

    def change(**fields):
        coord.config = dataclasses.replace(saved, **fields)

    yield change
    coord.config = saved


def assert_nothing_left(coord):
    """Both workers hold no request (SLOTS at once all run, drafted) and no mailbox is open."""
    handles = [coord.submit(PROMPT, max_new_tokens=12) for _ in range(SLOTS)]
    for h in handles:
        stats = h.result(timeout=120).stats
        assert not stats.draft_fallback and stats.accepted_drafts > 0, stats
    assert coord.in_flight == 0
    assert coord.target.open_mailboxes == [] and coord.draft.open_mailboxes == []
    assert coord.draft_health == "ok"


def test_prefill_timeouts_free_the_target_sequence(coord, settings):
    settings(prefill_timeout_s=1e-4)
    for _ in range(SLOTS + 1):
        with pytest.raises(dovetail.WorkerTimeout, match="prefill_timeout_s"):
            coord.generate(PROMPT * 50, max_new_tokens=4)
    time.sleep(0.5)  # the late Opened replies arrive and are dropped
    coord.config = dataclasses.replace(coord.config, prefill_timeout_s=60.0)
    assert_nothing_left(coord)


def test_draft_timeouts_free_the_draft_state_and_the_draft_is_used_again(coord, settings):
    settings(draft_timeout_s=1e-4)
    for _ in range(SLOTS + 1):
        stats = coord.generate(PROMPT, max_new_tokens=6).stats
        assert stats.draft_fallback and stats.draft_fallback_reason == "timeout"
    coord.config = dataclasses.replace(coord.config, draft_timeout_s=60.0)
    assert_nothing_left(coord)


@pytest.fixture
def own_coord(launch_tracked, tiny_target):
    c = launch_tracked(tiny_target, tiny_target, overlap=False, auto_tree=False)
    try:
        yield c
    finally:
        c.close()


def test_close_cancels_and_joins_running_requests(own_coord):
    first = threading.Event()

    def slow_listener(kind, payload):  # runs in the request's thread: slows each round down
        if kind == "chunk":
            first.set()
            time.sleep(0.02)

    handle = own_coord.submit(PROMPT, max_new_tokens=400, on_event=slow_listener)
    streamed, stream_done = [], threading.Event()

    def consume():  # a stream() in another thread, read slowly
        for chunk in own_coord.stream(PROMPT, max_new_tokens=400):
            streamed.append(chunk)
            time.sleep(0.02)
        stream_done.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert first.wait(60)
    while not streamed:
        time.sleep(0.01)
    t0 = time.monotonic()
    own_coord.close()
    assert time.monotonic() - t0 < 30
    result = handle.result(timeout=5)  # the request ended as cancelled: no socket error
    assert handle.terminal == "cancelled" and result.stats.finish_reason == "cancelled"
    assert 0 < len(result.token_ids) < 400
    reader.join(5)
    assert stream_done.is_set()  # the stream ended too, without an exception
    with pytest.raises(RuntimeError, match="closed"):
        own_coord.generate(PROMPT, max_new_tokens=2)


def test_the_target_says_where_its_memory_lives(coord):
    """Pinned before loading, the target reports the NUMA node(s) its memory is on."""
    assert "memory on NUMA node" in coord.target_info.device, coord.target_info.device
