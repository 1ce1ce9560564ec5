"""The suffix draft's pieces without workers: tree growth, pricing, learning, the cache."""
from __future__ import annotations

import random

import pytest

from dovetail.protocol import VerifyResult
from dovetail.runtime.autotree import TreeSizer
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.results import Stats
from dovetail.runtime.suffix_draft import (
    CACHE, EVICT_TO, FIRST_CAP, LOCAL, AcceptTable, SuffixCache, SuffixDrafter, bucket, grow_tree,
)
from dovetail.spec.suffix import SuffixAutomaton
from dovetail.spec.tree import check_parents, depths

pytestmark = pytest.mark.timeout(60)

FLAT = [10_000 + 100 * k for k in range(16)]            # us for k = 1..16: extra rows nearly free
STEEP = [41_000, 67_000, 95_000, 110_000, 131_000, 152_000, 198_000, 244_000] + \
        [244_000 + 5_000 * i for i in range(1, 9)]       # llama.cpp Q4_K on two cores


def drafter(prompt, curve=FLAT, cache=None, scope="", accept=None, **cfg):
    sizer = TreeSizer(curve, 3, 2, 6, overlap=False) if curve else None
    config = CoordinatorConfig(**cfg).with_tree_defaults("cpu")
    return SuffixDrafter(config, sizer, accept or AcceptTable(), cache, scope, 1, list(prompt), Stats())


def result(tokens, parents, truth) -> VerifyResult:
    """What greedy verification accepts of a tree when the target's text is ``truth``."""
    accepted, node, depth = [], -1, 0
    while True:
        kids = [i for i, p in enumerate(parents) if p == node and tokens[i] == truth[depth]]
        if not kids:
            break
        node = kids[0]
        accepted.append(node)
        depth += 1
    return VerifyResult(1, 0, accepted, [tokens[i] for i in accepted] + [truth[depth]], 0, seconds=0.0)


def test_trees_are_valid_and_within_budget():
    rng = random.Random(0)
    for trial in range(50):
        text = [rng.randrange(5) for _ in range(rng.randrange(20, 200))]
        sam = SuffixAutomaton()
        sam.extend_all(text)
        max_nodes, max_depth = rng.randrange(1, 16), rng.randrange(1, 8)
        nodes = grow_tree([(LOCAL, sam, *sam.repeat())], AcceptTable(), max_nodes, max_depth)
        parents = [n.parent for n in nodes]
        check_parents(parents)
        assert len(nodes) <= max_nodes
        assert max(depths(parents), default=0) <= max_depth
        probs = [n.prob for n in nodes]
        assert probs == sorted(probs, reverse=True)  # any prefix is a tree: what the sizer keeps
        for i, n in enumerate(nodes):
            assert 0 < n.prob <= (1.0 if n.parent < 0 else nodes[n.parent].prob)
            siblings = [m.token for m in nodes if m.parent == n.parent]
            assert len(siblings) == len(set(siblings))


def test_a_copy_is_proposed_and_followed_to_its_end():
    code = list(range(100, 160))
    d = drafter(code + [7, 8] + code[:12])
    text = list(d.local.tokens)
    tokens, parents = d.propose(text, max_depth=40)
    # the curve is flat, so every node pays; a request's first draft holds FIRST_CAP of them
    assert tokens == code[12:12 + FIRST_CAP] and parents == list(range(-1, FIRST_CAP - 1))
    res = result(tokens, parents, code[12:])
    d.settle(None, res, tokens, parents)
    assert d.stats.suffix_rounds == 1 and d.stats.suffix_accepted == FIRST_CAP
    text += res.tokens
    tokens, _ = d.propose(text, max_depth=40)  # accepted in full: the cap doubles (the curve allows 15)
    assert tokens == code[13 + FIRST_CAP:13 + FIRST_CAP + 15]
    d.settle(None, result(tokens, [-1] + list(range(14)), [0]), tokens, [-1] + list(range(14)))
    assert d.cap == FIRST_CAP  # refused at once: halved again


def test_no_repeats_no_proposal():
    """The gate: on text that never repeats itself the draft proposes nothing."""
    d = drafter([])
    text = list(range(1000))
    proposed = 0
    for i in range(1, len(text)):
        tokens, _ = d.propose(text[:i], max_depth=8)
        proposed += len(tokens)
    assert proposed == 0


def test_steep_curve_keeps_only_what_pays():
    """On two cores an extra row costs ~60% of a step: a one-token match (prior 0.45) is not
    worth verifying, a long copy is."""
    d = drafter([5, 6, 9, 5], curve=STEEP)
    assert d.propose(d.local.tokens, max_depth=8) == ([], [])
    code = list(range(100, 160))
    d = drafter(code + code[:20], curve=STEEP)
    tokens, _ = d.propose(d.local.tokens, max_depth=30)
    assert len(tokens) >= 4


def test_learning_moves_the_estimate_both_ways():
    table = AcceptTable()
    child = AcceptTable(parent=table)
    b = bucket(10)
    prior = child.rate(LOCAL, b)
    for _ in range(20):
        child.learn(LOCAL, b, 1.0, False)
    assert child.rate(LOCAL, b) < 0.2 < prior
    assert table.rate(LOCAL, b) < 0.2  # all requests learn it too
    assert AcceptTable(parent=table).rate(LOCAL, b) == pytest.approx(table.rate(LOCAL, b))
    assert table.rate(CACHE, b) == pytest.approx(prior)  # per source


def test_a_rejected_copy_stops_being_proposed():
    """A repeat the target keeps rejecting is priced out within a few rounds."""
    code = list(range(100, 140))
    d = drafter(code + code[:10], curve=STEEP)
    rounds_with_drafts = 0
    text = list(d.local.tokens)
    for r in range(30):
        tokens, parents = d.propose(text, max_depth=8)
        rounds_with_drafts += bool(tokens)
        truth = [5000 + r, 0]  # the target never agrees
        d.settle(None, result(tokens, parents, truth), tokens, parents)
        text.append(truth[0])
        text.extend(code[:10])  # the same match comes back every round
    assert 1 <= rounds_with_drafts <= 3


def test_cache_proposes_earlier_outputs_in_its_scope_only():
    cache = SuffixCache(1000)
    answer = list(range(200, 240))
    cache.add("alice", answer)
    d = drafter([1, 2, 3] + answer[:6], cache=cache, scope="alice")
    tokens, _ = d.propose(d.local.tokens, max_depth=20)
    assert tokens[:5] == answer[6:11]
    other = drafter([1, 2, 3] + answer[:6], cache=cache, scope="bob")
    assert other.propose(other.local.tokens, max_depth=20) == ([], [])
    off = drafter([1, 2, 3] + answer[:6], cache=SuffixCache(0), scope="alice")
    off.close(off.local.tokens + answer)
    assert off.cache.scopes == {}


def test_cache_respects_its_token_bound_and_drops_the_least_recent():
    cache = SuffixCache(500)
    rng = random.Random(1)
    docs = [[rng.randrange(10_000) for _ in range(rng.randrange(20, 120))] for _ in range(40)]
    for i, doc in enumerate(docs):
        cache.add(f"s{i % 3}", doc)
        assert cache.total <= 500
        assert cache.total == sum(len(s.docs[d]) for s in cache.scopes.values() for d in s.docs)
        assert sum(len(s.sam) for s in cache.scopes.values()) == cache.total + sum(
            len(s.docs) for s in cache.scopes.values())  # every kept token (and a separator each)
    assert cache.total > EVICT_TO * 500 - 120
    kept = {tuple(d) for s in cache.scopes.values() for d in s.docs.values()}
    assert tuple(docs[-1]) in kept and tuple(docs[0]) not in kept
    cache.add("s0", list(range(600)))  # longer than the bound: not kept
    assert cache.total <= 500


def test_a_matched_output_is_kept_over_newer_ones():
    cache = SuffixCache(350)
    first = list(range(1000, 1100))
    for doc in (first, list(range(2000, 2100)), list(range(3000, 3100))):
        cache.add("", doc)
    d = drafter(first[:8], cache=cache)
    assert d.propose(d.local.tokens, max_depth=8)[0]  # drafts from the first output: it is used
    cache.add("", list(range(4000, 4100)))  # past the bound: the least recently used go
    kept = [tuple(v) for s in cache.scopes.values() for v in s.docs.values()]
    assert kept == [tuple(first), tuple(range(4000, 4100))]


def test_what_was_not_sent_is_learned_too():
    """A one-token match is priced out on a steep curve at first, but the target's tokens judge
    it every round all the same: when they keep confirming it, it starts being drafted."""
    pairs = [(400 + i, 500 + i) for i in range(30)]
    prompt = [t for i, (a, b) in enumerate(pairs) for t in (a, b, 600 + i)]  # a_i b_i filler_i
    plan = [t for i, (a, b) in enumerate(pairs) for t in (700 + i, a, b)]    # new_i a_i b_i: b_i follows a_i again
    d = drafter(prompt, curve=STEEP)
    text, i, drafted_at = list(prompt), 0, []
    while i < len(plan) - 1:
        tokens, parents = d.propose(text, max_depth=4)
        res = result(tokens, parents, plan[i:])
        if tokens:
            drafted_at.append(i)
        d.settle(None, res, tokens, parents)
        text += res.tokens
        i += len(res.tokens)
    assert drafted_at and drafted_at[0] > 2  # not the first pair (never tried: only the target's tokens teach it) ...
    assert len(drafted_at) >= 25             # ... but from then on nearly every one
