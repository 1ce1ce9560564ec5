"""The target's prefix cache (workers/prefix_cache.py) on a tiny float64 model.

Reused KV must give exactly what a fresh prefill gives: every check compares a request that
starts from a cached prefix with the same request on a handler whose cache is off, token for
token and logprob for logprob (float64: exact)."""
import json

import numpy as np
import pytest
import torch

from dovetail.protocol import Close, OpenRequest, VerifyRequest, decode_features
from dovetail.workers.backend import HFBackend
from dovetail.workers.prefix_cache import PrefixCache
from dovetail.workers.target import TargetConfig, TargetHandler
from tests.helpers import HandlerSession, make_tiny_model

pytestmark = pytest.mark.timeout(300)

VOCAB = 64
SYSTEM = [1, 5, 9, 3, 7, 11, 2, 40, 41, 17, 23, 29, 31, 37, 43, 47]  # a shared "system prompt"


# ---- the tree alone ---------------------------------------------------------------------------
class CountingBackend:
    """Sequences as plain token lists: what the tree must keep, fork and free."""
    shares_prefixes = True

    def __init__(self):
        self.live, self.released = [], []

    def new(self, tokens):
        seq = list(tokens)
        self.live.append(seq)
        return seq

    def length(self, seq):
        return len(seq)

    def fork(self, seq, n):
        assert any(s is seq for s in self.live), "forked from a released sequence"
        return self.new(seq[:n])

    def release(self, seq):
        assert any(s is seq for s in self.live), "released twice"
        self.live = [s for s in self.live if s is not seq]
        self.released.append(seq)


def test_the_longest_shared_prefix_is_found_and_forked():
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    assert cache.adopt("", b.new([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5])
    assert cache.adopt("", b.new([1, 2, 9, 9]), [1, 2, 9, 9])  # splits the edge after [1, 2]
    assert cache.match("", [1, 2, 3, 4, 6])[1] == 4
    assert cache.match("", [1, 2, 9, 8])[1] == 3
    assert cache.match("", [1, 2])[1] == 2
    assert cache.match("", [7]) == (None, 0)
    seq, n = cache.fork("", [1, 2, 3, 4, 5, 6, 7])
    assert n == 5 and seq == [1, 2, 3, 4, 5]
    assert cache.tokens == 7  # shared cells: [1, 2] counted once, then [3, 4, 5] and [9, 9]


def test_scopes_never_share():
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    cache.adopt("alice", b.new([1, 2, 3]), [1, 2, 3])
    assert cache.fork("bob", [1, 2, 3, 4]) == (None, 0)
    assert cache.fork("alice", [1, 2, 3, 4])[1] == 3


def test_an_entry_that_another_extends_is_dropped_and_a_covered_one_is_not_kept():
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    first = b.new([1, 2, 3])
    cache.adopt("", first, [1, 2, 3])
    longer = b.new([1, 2, 3, 4, 5])
    assert cache.adopt("", longer, [1, 2, 3, 4, 5])
    assert [e.seq for e in cache.entries] == [longer] and b.released == [first]
    shorter = b.new([1, 2])
    assert not cache.adopt("", shorter, [1, 2])  # the longer entry holds those positions
    assert b.released[-1] is shorter and len(cache) == 1


def test_a_feature_request_forks_only_as_far_as_kept_hidden_states_go():
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    rows = torch.arange(5.0)[:, None]  # position p's "hidden state" is p
    cache.adopt("", b.new([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5], hidden=rows)
    cache.adopt("", b.new([1, 2, 9, 9, 9, 9]), [1, 2, 9, 9, 9, 9])  # no hidden states kept
    _, n, hidden = cache.fork_hidden("", [1, 2, 9, 9, 9, 9, 0])
    assert n == 2 and torch.equal(hidden, rows[:2])  # as far as the first entry's rows go
    seq, n, hidden = cache.fork_hidden("", [1, 2, 3, 4, 0])
    assert (seq, n) == ([1, 2, 3, 4], 4) and torch.equal(hidden, rows[:4])
    assert cache.fork_hidden("bob", [1, 2, 3]) == (None, 0, None)
    assert cache.fork("", [1, 2, 9, 9, 9, 9, 0])[1] == 6  # a request without features takes any entry


def test_an_entry_extended_by_one_without_hidden_states_passes_its_own_on():
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    rows = torch.arange(3.0)[:, None]
    cache.adopt("", b.new([1, 2, 3]), [1, 2, 3], hidden=rows)
    cache.adopt("", b.new([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5])  # drops the first; takes its rows
    assert len(cache) == 1 and torch.equal(cache.entries[0].hidden, rows)
    assert cache.fork_hidden("", [1, 2, 3, 4, 5, 6])[1] == 3
    longer = torch.arange(5.0)[:, None]
    assert not cache.adopt("", b.new([1, 2, 3, 4]), [1, 2, 3, 4], hidden=longer[:4])  # covered, but ...
    assert cache.fork_hidden("", [1, 2, 3, 4, 5, 6])[1] == 4  # ... its hidden states stay


def test_least_recently_used_entries_go_past_the_bound():
    b = CountingBackend()
    cache = PrefixCache(b, 10)
    a, c = b.new([1, 2, 3, 4]), b.new([5, 6, 7, 8])
    cache.adopt("", a, [1, 2, 3, 4])
    cache.adopt("", c, [5, 6, 7, 8])
    cache.fork("", [1, 2, 3, 4, 0])  # a is used again: c is now the older one
    d = b.new([9, 10, 11, 12])
    cache.adopt("", d, [9, 10, 11, 12])
    assert [e.seq for e in cache.entries] == [a, d] and c in b.released and cache.tokens == 8
    assert not cache.adopt("", b.new(list(range(20, 40))), list(range(20, 40)))  # alone over the bound


def test_the_entry_being_forked_is_never_the_one_evicted_for_its_id():
    """A backend out of sequence ids evicts to give the fork one: never its own source."""
    b = CountingBackend()
    cache = PrefixCache(b, 1000)
    old, src = b.new([5, 6]), b.new([1, 2, 3])
    cache.adopt("", old, [5, 6])
    cache.adopt("", src, [1, 2, 3])
    cache.fork("", [5, 6, 0])  # old is now the most recently used: src would go first
    plain_fork = b.fork

    def fork_after_evicting(seq, n):
        assert cache.evict_one()
        return plain_fork(seq, n)
    b.fork = fork_after_evicting
    seq, n = cache.fork("", [1, 2, 3, 4])
    assert n == 3 and seq == [1, 2, 3] and old in b.released and src not in b.released


class SavingBackend(CountingBackend):
    """Sequences saved as JSON files; a file that does not parse does not load."""

    def save_sequence(self, seq, path, tokens):
        assert tokens == seq
        path.write_text(json.dumps(tokens))
        return True

    def load_sequence(self, path, max_tokens):
        try:
            tokens = json.loads(path.read_text())
        except ValueError:
            return None
        return (self.new(tokens), tokens) if len(tokens) <= max_tokens else None


def test_saved_entries_load_into_a_new_cache_and_nothing_else_does(tmp_path):
    b = SavingBackend()
    cache = PrefixCache(b, 1000)
    cache.adopt("alice", b.new([1, 2, 3, 4]), [1, 2, 3, 4])
    cache.adopt("bob", b.new([1, 2, 9]), [1, 2, 9])
    assert cache.save(tmp_path, {"model": "m"}) == 2
    fresh = PrefixCache(SavingBackend(), 1000)
    assert fresh.load(tmp_path, {"model": "other"}) == 0 and len(fresh) == 0  # another model's
    assert fresh.load(tmp_path, {"model": "m"}) == 2
    assert fresh.fork("alice", [1, 2, 3, 4, 5])[1] == 4 and fresh.fork("bob", [1, 2, 9, 0])[1] == 3
    (tmp_path / "entry-0.kv").write_text("{broken")  # one file spoiled: the other still loads
    assert PrefixCache(SavingBackend(), 1000).load(tmp_path, {"model": "m"}) == 1
    (tmp_path / "index.json").write_text("not json")
    assert PrefixCache(SavingBackend(), 1000).load(tmp_path, {"model": "m"}) == 0
    assert PrefixCache(SavingBackend(), 1000).load(tmp_path / "missing", {"model": "m"}) == 0


def test_off_keeps_nothing():
    b = CountingBackend()
    cache = PrefixCache(b, 0)
    seq = b.new([1, 2, 3])
    assert not cache.adopt("", seq, [1, 2, 3]) and b.released == [seq]
    assert cache.fork("", [1, 2, 3, 4]) == (None, 0)


# ---- on the target handler: exact reuse ------------------------------------------------------
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("prefix") / "model", seed=4, vocab_size=VOCAB,
                           attention_gain=10.0)


@pytest.fixture(scope="module")
def backend(model_path):
    return HFBackend(str(model_path), dtype=torch.float64)


def make_handler(backend, model_path, tokens=4096, **kw):
    return TargetHandler(backend, TargetConfig(bind="inproc://t", model=str(model_path),
                                               prefix_cache_tokens=tokens, **kw))


def run(handler, req, prompt, drafts, **open_kw):
    """Open, verify each draft (a chain; [] decodes one token), close; (committed, logprobs, reused)."""
    open_kw.setdefault("features", False)
    s = HandlerSession(handler, req, prompt, logprobs=2, **open_kw)
    logprobs = []
    for d in drafts:
        res = s.verify(d)
        logprobs += res.logprobs
    handler.handle(Close(req))
    return s.committed, logprobs, s.opened.reused


DRAFTS = [[], [3, 7], [], [9, 9, 9], [], [], [12, 4], []]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_a_second_turn_from_the_cache_is_exactly_a_fresh_prefill(backend, model_path, sampling):
    cached, fresh = make_handler(backend, model_path), make_handler(backend, model_path, tokens=0)
    first, _, reused = run(cached, 1, SYSTEM + [20, 21], DRAFTS, **sampling)
    assert reused == 0
    second_turn = first + [30, 31, 32]  # the whole conversation again, and the next message
    got, got_lp, reused = run(cached, 2, second_turn, DRAFTS, **sampling)
    want, want_lp, _ = run(fresh, 2, second_turn, DRAFTS, **sampling)
    assert reused == len(first) - 1  # the first request's cache: all but its last (pending) token
    assert got == want and got_lp == want_lp


def test_a_shared_system_prompt_serves_two_requests_at_once(backend, model_path):
    """Two requests fork one entry and decode interleaved; each is what it would be alone."""
    cached, fresh = make_handler(backend, model_path), make_handler(backend, model_path, tokens=0)
    run(cached, 1, SYSTEM + [20], [[]])
    a = HandlerSession(cached, 2, SYSTEM + [33, 34], features=False)
    b = HandlerSession(cached, 3, SYSTEM + [35], features=False)
    assert a.opened.reused == b.opened.reused == len(SYSTEM)
    for d in DRAFTS:
        a.verify(d)
        b.verify(list(reversed(d)))
    want_a = HandlerSession(fresh, 2, SYSTEM + [33, 34], features=False)
    want_b = HandlerSession(fresh, 3, SYSTEM + [35], features=False)
    for d in DRAFTS:
        want_a.verify(d)
        want_b.verify(list(reversed(d)))
    assert a.committed == want_a.committed and b.committed == want_b.committed


def test_eviction_while_a_request_reads_the_prefix_changes_nothing(backend, model_path):
    cached, fresh = make_handler(backend, model_path), make_handler(backend, model_path, tokens=0)
    run(cached, 1, SYSTEM, [[]])
    s = HandlerSession(cached, 2, SYSTEM + [50, 51], features=False)
    assert s.opened.reused == len(SYSTEM)  # SYSTEM[-1] went in with the first verification
    s.verify([3, 7])
    cached.prefix_cache.clear()  # the entry it was forked from goes
    assert len(cached.prefix_cache) == 0
    for d in DRAFTS:
        s.verify(d)
    want = HandlerSession(fresh, 2, SYSTEM + [50, 51], features=False)
    for d in [[3, 7], *DRAFTS]:
        want.verify(d)
    assert s.committed == want.committed


def test_tree_rows_and_rollback_never_touch_the_cached_prefix(backend, model_path):
    cached = make_handler(backend, model_path)
    run(cached, 1, SYSTEM, [[]])
    entry = cached.prefix_cache.entries[0]
    before = [(layer.keys.clone(), layer.values.clone()) for layer in entry.seq.layers]
    length = backend.length(entry.seq)
    s = HandlerSession(cached, 2, SYSTEM + [50], features=False)
    s.verify([1, 2, 3, 4], parents=[-1, -1, 0, 0])  # a tree: rows gathered, the rest dropped
    s.verify([63, 62, 61])                            # most likely rejected: rolled back
    assert backend.length(entry.seq) == length
    for (k, v), layer in zip(before, entry.seq.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_a_cancelled_prefill_leaves_its_prefix_in_the_cache(backend, model_path):
    cached = make_handler(backend, model_path, prefill_chunk=4)
    prompt = SYSTEM + [20, 21, 22]
    job = cached.begin_open(OpenRequest(1, prompt, features=False))
    assert job.step() is None and job.step() is None  # 8 of 18 positions in
    cached.handle(Close(1))
    assert [backend.length(e.seq) for e in cached.prefix_cache.entries] == [8]
    again = HandlerSession(cached, 2, prompt, features=False)
    assert again.opened.reused == 8 and again.opened.cache_len == len(prompt) - 1


def test_other_scopes_start_cold_and_feature_requests_need_kept_hidden_states(backend, model_path):
    cached = make_handler(backend, model_path)
    run(cached, 1, SYSTEM + [20], [[]], cache_scope="alice")
    assert HandlerSession(cached, 2, SYSTEM + [20], features=False, cache_scope="bob").opened.reused == 0
    # a feature draft needs the prompt's hidden states, which a request without features did not keep
    opened = HandlerSession(cached, 3, SYSTEM + [20], features=True, cache_scope="alice").opened
    assert opened.reused == 0 and opened.features is not None
    assert HandlerSession(cached, 4, SYSTEM + [20], features=False, cache_scope="alice").opened.reused == len(SYSTEM)


def test_a_feature_requests_next_turn_gets_the_hidden_states_a_fresh_prefill_gives(backend, model_path):
    """A feature draft's request keeps its hidden states with its entry; the next turn starts
    from them and sends its draft the same rows, then the same tokens and rows, as a cold start."""
    cached, fresh = make_handler(backend, model_path), make_handler(backend, model_path, tokens=0)
    first = HandlerSession(cached, 1, SYSTEM + [20, 21], features=True)
    for d in DRAFTS:
        first.verify(d)
    cached.handle(Close(1))
    turn = first.committed + [30, 31, 32]
    got, want = (HandlerSession(h, 2, turn, features=True) for h in (cached, fresh))
    assert got.opened.reused == len(first.committed) - 1 and want.opened.reused == 0
    assert got.opened.cache_len == want.opened.cache_len == len(turn) - 1
    rows = decode_features(got.opened.features)
    assert rows.shape == decode_features(want.opened.features).shape == (len(turn) - 1, backend.identity.hidden_size)
    np.testing.assert_allclose(rows, decode_features(want.opened.features), rtol=2**-10, atol=1e-4)  # fp16 wire
    for d in DRAFTS:
        a, b = got.verify(d), want.verify(d)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(decode_features(a.features), decode_features(b.features), rtol=2**-10, atol=1e-4)


def test_the_bound_holds_on_the_handler(backend, model_path):
    cached = make_handler(backend, model_path, tokens=40)
    for req in range(1, 6):
        run(cached, req, [req + 1] * 12 + SYSTEM, [[]])  # 5 unrelated prompts: 28 positions held each
    assert cached.prefix_cache.tokens <= 40 and len(cached.prefix_cache) == 1


def test_prompts_sent_together_prefill_their_shared_prefix_once(backend, model_path):
    """Two prefills of one system prompt at once (an agent's parallel calls): the later waits
    while the earlier computes the shared positions, then forks them; both decode exactly as
    cold starts."""
    cached, fresh = make_handler(backend, model_path, prefill_chunk=4), make_handler(backend, model_path, tokens=0)
    prompts = {1: SYSTEM + [20, 21], 2: SYSTEM + [22]}
    jobs = {r: cached.begin_open(OpenRequest(r, p, features=False)) for r, p in prompts.items()}
    opened = {}
    while len(opened) < 2:  # serve()'s turns: each job one step
        for r, job in jobs.items():
            if r in opened:
                continue
            reply = job.step()
            if reply is not None:
                opened[r] = reply
    assert opened[2].reused == len(SYSTEM) and opened[1].reused == 0
    for r, p in prompts.items():
        s = HandlerSession.__new__(HandlerSession)  # continue the opened request as a session
        s.h, s.req, s.step, s.opened, s.committed, s.prompt_len = cached, r, 0, opened[r], list(p), len(p)
        for d in DRAFTS:
            s.verify(d)
        want = HandlerSession(fresh, r, p, features=False)
        for d in DRAFTS:
            want.verify(d)
        assert s.committed == want.committed, r
