"""bench.gating's policy and replay on a scripted draft (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from bench.gating import best_length, replay
from dovetail.training.distill import Answered
from dovetail.protocol import DraftProposal, DraftRequest, Handshake

pytestmark = pytest.mark.timeout(30)

VERIFY = [37.0, 60.0, 85.0, 96.0]


def test_a_token_is_kept_only_when_likely_enough_to_pay():
    assert best_length([0.3], VERIFY, 0.0) == 0          # 1.3 tokens / 60 ms < 1 / 37 ms
    assert best_length([0.9, 0.8], VERIFY, 0.0) == 2     # 2.7 / 85 > 1.9 / 60 > 1 / 37
    assert best_length([0.99] * 6, VERIFY, 0.0) == 3     # never past the measured curve
    assert best_length([], VERIFY, 0.0) == 0


class ScriptedDraft:
    """Proposes the true next two tokens, then a wrong one, with fixed path probabilities."""
    feature_codec = "fp16"

    def __init__(self, truth: list[int]):
        self.truth = truth

    def handshake(self):
        return Handshake(role="draft", vocab_size=100, tokenizer_hash="", hidden_size=0, dtype="",
                         feature_codec="", features=False)

    def handle(self, msg):
        if not isinstance(msg, DraftRequest):
            return None
        n = msg.base_len + len(msg.new_tokens)
        nxt = self.truth[n:n + 2]
        tokens = nxt + [99] * (3 - len(nxt))
        return DraftProposal(msg.req_id, msg.step, tokens, [-1, 0, 1], seconds=0.003,
                             scores=[math.log(0.9), math.log(0.81), math.log(0.081)])


def test_replay_commits_the_kept_accepted_tokens_and_prices_the_rounds():
    truth = list(range(10, 40))
    answers = [Answered(torch.tensor(truth), torch.zeros(len(truth), 4), 3)]  # 27 answer tokens
    free = replay(ScriptedDraft(truth), answers, 3, VERIFY, True, 1000)
    assert free["committed"] == 27 and free["rounds"] == 9 and free["tau"] == 3.0  # 2 kept + the target's
    assert free["kept_per_round"] == 2
    assert free["speed_vs_target_only"] == pytest.approx(27 * 37 / (9 * 85))
    assert free["calibration"]["0.9-1.0"] == {"tokens": 9, "accepted": 1.0}
    assert free["calibration"]["0.0-0.1"] == {"tokens": 9, "accepted": 0.0}
    paid = replay(ScriptedDraft(truth), answers, 3, VERIFY, False, 1000)  # 1 ms per level, 3 levels computed
    assert paid["speed_vs_target_only"] == pytest.approx(27 * 37 / (9 * (85 + 3)))
