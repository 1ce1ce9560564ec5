"""Through the coordinator: a request cancelled during its prefill ends within a chunk and
frees the target at once; a verification's timeout counts from when the target takes it up.

The tiny float64 target prefills one token a chunk here (prefill_chunk=1), so a long prompt
takes a few seconds: long enough to cancel in the middle.
"""
import threading
import time

import pytest

pytestmark = pytest.mark.timeout(300)

LONG_PROMPT = [(5 * i + 2) % 60 + 2 for i in range(900)]


@pytest.fixture(scope="module")
def coord(launch_tracked, tiny_target):
    c = launch_tracked(tiny_target, None, prefill_chunk=1, max_active=4)
    try:
        yield c
    finally:
        c.close()


def test_a_request_cancelled_during_its_prefill_ends_within_a_chunk(coord):
    t0 = time.monotonic()
    whole = coord.generate(LONG_PROMPT[:300], max_new_tokens=1)
    per_token = (time.monotonic() - t0) / 300
    events, ended = [], threading.Event()

    def on_event(kind, payload):
        events.append(kind)
        if kind in ("done", "cancelled", "error"):
            ended.set()

    handle = coord.submit(LONG_PROMPT, max_new_tokens=4, on_event=on_event)
    time.sleep(min(0.5, 100 * per_token))  # well inside the 900-token prefill
    cancelled_at = time.monotonic()
    handle.cancel()
    assert ended.wait(30)
    waited = time.monotonic() - cancelled_at
    assert events == ["cancelled"], events
    assert waited < max(0.5, 0.25 * 900 * per_token), f"the cancel took {waited:.2f} s to end the request"
    deadline = time.monotonic() + 5
    while coord.worker_requests().get("target") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert coord.worker_requests()["target"] == 0
    assert whole.stats.new_tokens == 1


def test_a_stream_goes_on_while_another_prompt_prefills(coord):
    """A short request sent while a 900-token prompt goes in (a token a chunk) is answered
    between the chunks: all its tokens come before the long request's first."""
    first_long = []
    long_req = coord.submit(LONG_PROMPT, max_new_tokens=2,
                            on_event=lambda kind, _: kind == "chunk" and not first_long and
                            first_long.append(time.monotonic()))
    time.sleep(0.2)
    stamps = [time.monotonic() for _ in coord.stream([3, 4, 5, 6], max_new_tokens=30)]
    assert long_req.result(timeout=120).stats.new_tokens == 2
    assert len(stamps) >= 1 and first_long and stamps[-1] < first_long[0]
