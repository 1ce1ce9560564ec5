"""The coordinator's per-request drafter: feature rows gathered between draft requests, failed calls."""
import numpy as np
import pytest

from dovetail.protocol import decode_features, encode_features
from dovetail.runtime.client import WorkerDied, WorkerError, WorkerTimeout
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.draft_health import DraftHealth
from dovetail.runtime.drafter import Drafter, merge_features
from dovetail.runtime.results import Stats

pytestmark = pytest.mark.timeout(30)


def test_merge_features_keeps_rows_in_order():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), -np.arange(3, dtype=np.float32).reshape(1, 3)
    assert merge_features([]) is None
    one = encode_features(a)
    assert merge_features([one]) is one  # sent as it came: no re-encoding
    for codec in ("fp16", "int8"):
        merged = merge_features([encode_features(a, codec), encode_features(b, codec)])
        assert merged.codec == codec and merged.shape == [3, 3]
        assert np.allclose(decode_features(merged), np.concatenate([a, b]), atol=0.05)


class RefusingClient:
    """A draft client whose every call fails with ``error``; records what was sent."""

    def __init__(self, error):
        self.error, self.sent = error, []

    def call(self, msg, reply_type, timeout_s, knob):
        raise self.error

    def send(self, msg):
        self.sent.append(msg)


@pytest.mark.parametrize("error, reason, state", [
    (WorkerError("draft", "busy", "2 requests open (max_requests)"), "busy", "ok"),
    (WorkerTimeout("draft", "timeout", "no reply within 30 s"), "timeout", "suspect"),
    (WorkerDied("draft", "died", "exit code 1"), "died", "dead"),
])
def test_a_failed_draft_call_says_why_and_only_busy_leaves_the_draft_trusted(error, reason, state):
    client, stats = RefusingClient(error), Stats()
    health = DraftHealth(client, 1.0)
    drafter = Drafter(client, CoordinatorConfig(depth=2, top_k=1, max_nodes=2), health, None, 7, [1, 2], stats)
    assert not drafter.alive and drafter.propose([1, 2], 4) == ([], [])
    assert stats.draft_fallback and stats.draft_fallback_reason == reason and health.state == state
    drafter.close()  # a draft that still lives holds the request's state: it gets its Close; a dead one, nothing
    assert [type(m).__name__ for m in client.sent] == ([] if state == "dead" else ["Close"])
