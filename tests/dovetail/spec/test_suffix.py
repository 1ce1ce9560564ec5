"""The suffix automaton and matcher against brute-force search on random token streams."""
from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from dovetail.spec.suffix import MAX_COUNT_CHAIN, Matcher, SuffixAutomaton

pytestmark = pytest.mark.timeout(60)


def brute_repeat(text: list[int]) -> int:
    """Length of the longest suffix of text that also ends at an earlier position."""
    n = len(text)
    for length in range(n - 1, 0, -1):
        key = text[n - length:]
        if any(text[e - length + 1:e + 1] == key for e in range(length - 1, n - 1)):
            return length
    return 0


def brute_followers(text: list[int], key: list[int]) -> Counter:
    """What followed each earlier occurrence of key."""
    n, k = len(text), len(key)
    return Counter(text[s + k] for s in range(n - k) if text[s:s + k] == key)


def brute_count(text: list[int], key: list[int]) -> int:
    return sum(text[s:s + len(key)] == key for s in range(len(text) - len(key) + 1))


def walk(sam: SuffixAutomaton, key: list[int]) -> int | None:
    v = 0
    for t in key:
        v = sam.next[v].get(t)
        if v is None:
            return None
    return v


@pytest.mark.parametrize("vocab", [2, 5, 40])
def test_repeats_and_followers_match_brute_force(vocab):
    rng = random.Random(vocab)
    text: list[int] = []
    sam = SuffixAutomaton()
    for _ in range(160):
        t = rng.randrange(vocab)
        # now and then copy a stretch from earlier, as an edit would
        if text and rng.random() < 0.05:
            s = rng.randrange(len(text))
            for c in text[s:s + rng.randrange(1, 20)]:
                text.append(c)
                sam.extend(c)
        text.append(t)
        sam.extend(t)
        state, length = sam.repeat()
        assert length == brute_repeat(text), text
        if length:
            key = text[-length:]
            got = {tok: c for tok, c, _ in sam.continuations(state)}
            assert got == dict(brute_followers(text, key))
            counts = [c for _, c, _ in sam.continuations(state)]
            assert counts == sorted(counts, reverse=True)


def test_occurrence_counts_and_first_end_match_brute_force():
    rng = random.Random(7)
    text = [rng.randrange(4) for _ in range(400)]
    sam = SuffixAutomaton()
    sam.extend_all(text)
    for _ in range(300):
        s = rng.randrange(len(text))
        key = text[s:s + rng.randrange(1, 12)]
        v = walk(sam, key)
        assert v is not None
        assert sam.cnt[v] == brute_count(text, key)
        first = next(e for e in range(len(key) - 1, len(text)) if text[e - len(key) + 1:e + 1] == key)
        assert sam.first[v] == first
    absent = [9, 9]
    assert walk(sam, absent) is None


def test_matcher_finds_the_longest_suffix_in_other_documents():
    rng = random.Random(3)
    docs = [[rng.randrange(6) for _ in range(rng.randrange(5, 60))] for _ in range(5)]
    sam = SuffixAutomaton()
    for i, d in enumerate(docs):
        sam.extend_all(d)
        sam.extend(-1 - i)
    stream = [rng.randrange(6) for _ in range(200)] + docs[2][3:30] + [rng.randrange(6) for _ in range(20)]
    m = Matcher(sam)
    for i, t in enumerate(stream):
        m.feed(t)
        seen = stream[:i + 1]
        best = 0
        for length in range(1, len(seen) + 1):
            key = seen[-length:]
            if any(brute_count(d, key) for d in docs):  # separators: no match spans two documents
                best = length
            else:
                break
        assert m.length == best
    tail = stream[-40:]
    again = Matcher(sam)
    again.restart(tail)
    assert again.length == m.length


def test_separators_are_never_proposed():
    sam = SuffixAutomaton()
    sam.extend_all([1, 2, 3, -1, 1, 2, 4, -2])
    m = Matcher(sam)
    for t in (7, 2, 3):
        m.feed(t)
    assert m.length == 2
    assert [t for t, _, _ in sam.continuations(m.state)] == []  # [2, 3] ended a document


def test_a_degenerate_stream_stays_linear():
    """One token repeated: every suffix occurs earlier; counting stops at MAX_COUNT_CHAIN."""
    sam = SuffixAutomaton()
    t0 = time.perf_counter()
    sam.extend_all([5] * (4 * MAX_COUNT_CHAIN))
    assert time.perf_counter() - t0 < 10
    state, length = sam.repeat()
    assert length == 4 * MAX_COUNT_CHAIN - 1
    assert [t for t, _, _ in sam.continuations(state)] == [5]
