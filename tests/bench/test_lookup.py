"""bench.lookup: prompt-lookup proposals and the gated / oracle time of a free draft (no model)."""
from __future__ import annotations

import pytest
import torch

from bench.lookup import accepted, answer_proposals, gated_ms, lookup, oracle_ms, run
from dovetail.training.distill import Answered

pytestmark = pytest.mark.timeout(30)


def test_lookup_takes_the_longest_suffix_at_its_latest_occurrence():
    text = [5, 1, 2, 9, 1, 2, 7, 3, 1, 2]
    assert lookup(text, 4, 3) == ([7, 3, 1], 2)       # "1 2" last seen before 7 (not before 9)
    assert lookup([4, 8, 3, 8], 4, 2) == ([3, 8], 1)  # only "8" recurs
    assert lookup([1, 2, 3], 4, 2) == ([], 0)
    assert accepted([7, 3, 4], [7, 3, 1]) == 2 and accepted([], [1]) == 0


def test_a_round_commits_what_is_accepted_plus_the_targets_token():
    tokens = [1, 2, 3, 4, 1, 2, 3, 5]                  # prompt 1 2 3 4, answer 1 2 3 5
    props = answer_proposals(tokens, 4, 8, 4, 3)
    assert props[0] == ([], 0, 0)                      # "4" was not seen before
    assert props[1] == ([2, 3], 1, 2)                  # after "... 4 1": 2 3 4, cut where the answer ends
    assert props[2] == ([3], 2, 1)                     # after "... 1 2": 3, one token before the end
    ms, rounds = gated_ms(props, [10.0, 15.0, 20.0, 25.0], 1, 3)
    assert (ms, rounds) == (10.0 + 20.0, 2)            # "1" alone, then "2 3" drafted and accepted plus "5"
    assert gated_ms(props, [10.0, 15.0, 20.0, 25.0], 2, 3) == (10.0 + 10.0 + 15.0, 3)  # 1 | 2 | 3 (+5)


def test_oracle_never_loses_and_gains_only_where_extra_tokens_are_cheap():
    prompt = list(range(10, 30))
    ans = Answered(torch.tensor(prompt + prompt[:12] + [99, 98]), torch.zeros(0), len(prompt))
    linear = [10.0, 20.0, 30.0, 40.0, 50.0]            # every token costs a step: nothing to gain
    cheap = [10.0, 11.0, 12.0, 13.0, 14.0]
    assert run([ans], linear, 4, 4, 64)["oracle_speed"] == pytest.approx(1.0)
    r = run([ans], cheap, 4, 4, 64)
    assert r["oracle_speed"] > 2 and r["oracle_speed"] >= max(g["speed"] for g in r["grid"])
    props = answer_proposals(ans.tokens.tolist(), 20, len(ans.tokens), 4, 4)
    assert oracle_ms(props, cheap, 4) <= min(gated_ms(props, cheap, g, n)[0] for g in range(1, 5) for n in range(1, 5))
