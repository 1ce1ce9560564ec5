"""tests/helpers.py's comparison of greedy outputs up to a near tie, on made-up logits."""
import pytest
import torch

from tests.helpers import NEAR_TIE_LOGITS, divergence_summary, greedy_divergence, near_tie, same_argmax_or_near_tie

VOCAB = 10


def logits(**values) -> torch.Tensor:
    """Token ids as t<id>=logit; every other token at -5."""
    out = torch.full((VOCAB,), -5.0)
    for name, v in values.items():
        out[int(name[1:])] = v
    return out


def test_identical_continuations_need_no_logits():
    def never(ids):
        raise AssertionError("no forward for identical outputs")
    assert greedy_divergence(never, [1, 2], [3, 4, 5], [3, 4, 5]) is None


def test_a_near_tie_where_they_part_passes_and_is_reported():
    seen = []

    def next_logits(ids):
        seen.append(ids)
        return logits(t7=3.0, t8=2.8, t9=1.0)
    assert greedy_divergence(next_logits, [1, 2], [3, 7, 5], [3, 8, 6]) == (1, pytest.approx(0.2))
    assert seen == [[1, 2, 3]]  # the prompt and the common prefix
    assert greedy_divergence(next_logits, [1, 2], [3, 8], [3, 7]) is not None  # either order
    summary = divergence_summary("x", [None, (1, 0.2)])
    assert summary.startswith("x: 1 of 2 identical; 1 diverged") and "token 1, gap 0.200" in summary


def test_a_wide_gap_or_a_third_token_fails():
    wide = logits(t7=3.0, t8=3.0 - 1.5 * NEAR_TIE_LOGITS)
    with pytest.raises(AssertionError, match="no near tie"):
        greedy_divergence(lambda ids: wide, [1], [7], [8])
    third = logits(t7=3.0, t9=2.9, t8=2.8)  # 8 is close, but not the runner-up
    with pytest.raises(AssertionError, match="no near tie"):
        greedy_divergence(lambda ids: third, [1], [7], [8])
    with pytest.raises(AssertionError):  # a longer output is no near tie either
        greedy_divergence(lambda ids: third, [1], [7], [7, 8])


def test_same_argmax_or_near_tie():
    row = logits(t2=1.0, t4=0.9)
    assert same_argmax_or_near_tie(row, 2) is True
    assert same_argmax_or_near_tie(row, 4) is False
    with pytest.raises(AssertionError):
        same_argmax_or_near_tie(row, 5)
    assert near_tie(row, 4, 2) == pytest.approx(0.1)
