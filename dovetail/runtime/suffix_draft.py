"""The suffix draft: trees read off text already seen, at no model cost.

Each request keeps a suffix automaton (spec/suffix.py) of its own prompt and output; a
``SuffixCache`` keeps one over earlier requests' outputs. Each round, the longest earlier
occurrence of the text's end in either proposes what followed it, as a tree grown best first
by each node's *path probability*: the parent's, times the learned acceptance for its match
length, times how often that token followed the match (SuffixDecoding's frequency score).
The tree sizer then verifies the prefix of that list with the most expected tokens per ms
on the target's measured verify curve (``TreeSizer.best_prefix``), which is nothing where
nothing is copied: the gate.

Acceptance per match length is learned from every verified node, per request and across
requests (``AcceptTable``), starting from a prior that trusts long matches. Proposals are
point masses, so the target's acceptance rules (greedy; recursive rejection sampling over
deterministic children) keep the output exactly the target's.

The cache is a timing side channel between tenants (a request that repeats another's output
decodes faster, though its output is the same), so it is kept per scope: on the server, per
API key. ``suffix_cache_tokens=0`` (``--suffix-cache-tokens 0``) turns it off.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

from dovetail.protocol import VerifyResult
from dovetail.runtime.autotree import TreeSizer
from dovetail.runtime.results import Stats
from dovetail.spec.suffix import Matcher, SuffixAutomaton

# Match-length buckets (a bucket holds lengths from its edge up to the next) and the prior
# acceptance of a token proposed at that match length when it alone followed the match.
BUCKET_EDGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
PRIOR_ACCEPT = (0.45, 0.55, 0.65, 0.72, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
PRIOR_WEIGHT = 2.0     # the prior is worth this many verified nodes
GLOBAL_WEIGHT = 4.0    # what all requests learned is worth this many of a request's own nodes
BRANCH = 3             # most continuations expanded below one node
MIN_PROB = 0.02        # nodes less likely than this are not worth growing
CACHE_MATCH_TAIL = 64  # tokens rematched against the cache after it changed
FIRST_CAP = 8          # a request's first drafts hold at most this many nodes; a draft accepted in
                       # full doubles its cap, one mostly refused halves it (never below MIN_CAP):
MIN_CAP = 4            # what was learned on other requests' text can be wrong for this one, and a
                       # long chain refused early costs many rows (quoted prose ends at a full stop)
EVICT_TO = 0.75        # a full cache drops its oldest outputs down to this share of its bound
LOCAL, CACHE = 0, 1    # where a node came from: the request's own text, or earlier outputs


def bucket(match_len: int, seen: int = 2) -> int:
    """The acceptance bucket of a token proposed after a match of ``match_len`` tokens that
    occurred ``seen`` times before: by length, and apart for a match seen once (code copied
    from one place continues as it did there far more often than a common phrase does)."""
    return 2 * (bisect.bisect_right(BUCKET_EDGES, match_len) - 1) + (seen == 1)


class AcceptTable:
    """Acceptance by (source, bucket): hits over tries, the tries weighted by the node's
    frequency score, so that hits / tries calibrates score -> probability."""

    def __init__(self, parent: "AcceptTable | None" = None):
        self.parent = parent
        self.tries = [[0.0] * 2 * len(BUCKET_EDGES) for _ in (LOCAL, CACHE)]
        self.hits = [[0.0] * 2 * len(BUCKET_EDGES) for _ in (LOCAL, CACHE)]
        self._lock = threading.Lock() if parent is None else None  # the shared table is written by every request

    def rate(self, source: int, b: int) -> float:
        if self.parent is None:
            with self._lock:
                prior = PRIOR_ACCEPT[b // 2]
                return (self.hits[source][b] + prior * PRIOR_WEIGHT) / (self.tries[source][b] + PRIOR_WEIGHT)
        prior = self.parent.rate(source, b)
        return (self.hits[source][b] + prior * GLOBAL_WEIGHT) / (self.tries[source][b] + GLOBAL_WEIGHT)

    def learn(self, source: int, b: int, weight: float, hit: bool) -> None:
        for table in (self, self.parent):
            if table is not None:
                with table._lock or nullcontext():
                    table.tries[source][b] += weight
                    table.hits[source][b] += hit


@dataclass
class Node:
    token: int
    parent: int      # index in the proposal, -1: the root
    prob: float      # estimated probability that verification accepts it
    source: int      # LOCAL or CACHE
    bucket: int      # acceptance bucket it was priced at (bucket())
    score: float     # its frequency share among its siblings


def grow_tree(sources, accept: AcceptTable, max_nodes: int, max_depth: int) -> list[Node]:
    """Up to ``max_nodes`` nodes, most probable first (a node never before its parent), from
    ``sources``: (source, automaton, state, match length) whose state's strings end where the
    text ends. Paths that two sources both propose appear once, at the higher probability."""
    heap: list = []
    tie = itertools.count()

    def push(source, sam, state, match_len, parent, parent_prob, depth):
        if depth > max_depth:
            return
        conts = sam.continuations(state)
        total = sum(c for _, c, _ in conts)
        conts = conts[:BRANCH]
        if total <= 0:
            return
        b = bucket(match_len, total)
        rate = accept.rate(source, b)
        for token, count, nxt in conts:
            score = count / total
            prob = parent_prob * min(1.0, rate * score)
            if prob >= MIN_PROB:
                heapq.heappush(heap, (-prob, depth, next(tie), token, parent, source, sam, nxt, match_len + 1, b, score))

    for source, sam, state, match_len in sources:
        if match_len > 0:
            push(source, sam, state, match_len, -1, 1.0, 1)
    nodes: list[Node] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    while heap and len(nodes) < max_nodes:
        neg, depth, _, token, parent, source, sam, state, match_len, b, score = heapq.heappop(heap)
        key = (parent, token)
        if key in index:  # another source got here first, with at least this probability
            me = index[key]
        else:
            me = index[key] = len(nodes)
            nodes.append(Node(token, parent, -neg, source, b, score))
        push(source, sam, state, match_len, me, -neg, depth + 1)
    return nodes


class SuffixCache:
    """Earlier requests' outputs, one automaton per scope, bounded in tokens over all scopes.

    When the bound is passed, the outputs used least recently (added, or matched by a later
    request's draft) are dropped until EVICT_TO of the bound is left, and the scopes that lost
    any are rebuilt from what they keep: amortized a few automaton steps per cached token.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.total = 0
        self.order: OrderedDict[tuple[str, int], int] = OrderedDict()  # (scope, doc id) -> tokens, LRU first
        self.scopes: dict[str, _Scope] = {}
        self._ids = itertools.count()
        self.lock = threading.Lock()

    def scope(self, name: str) -> "_Scope | None":
        return self.scopes.get(name) if self.max_tokens else None

    def add(self, name: str, tokens: list[int]) -> None:
        """Cache one request's output (one longer than the bound is not kept)."""
        if not self.max_tokens or not tokens or len(tokens) > self.max_tokens:
            return
        with self.lock:
            doc = next(self._ids)
            self.scopes.setdefault(name, _Scope()).add(doc, tokens)
            self.order[(name, doc)] = len(tokens)
            self.total += len(tokens)
            if self.total > self.max_tokens:
                self._evict()

    def touch(self, name: str, doc: int) -> None:
        with self.lock:
            if (name, doc) in self.order:
                self.order.move_to_end((name, doc))

    def _evict(self) -> None:
        dirty = set()
        while self.total > EVICT_TO * self.max_tokens:
            (name, doc), n = self.order.popitem(last=False)
            self.total -= n
            self.scopes[name].docs.pop(doc)
            dirty.add(name)
        for name in dirty:
            if self.scopes[name].docs:
                self.scopes[name].rebuild()
            else:
                del self.scopes[name]


class _Scope:
    """One scope's outputs in one automaton, each ended by a separator of its own."""

    def __init__(self):
        self.docs: OrderedDict[int, list[int]] = OrderedDict()
        self.sam = SuffixAutomaton()
        self.starts: list[int] = []  # text offset where each doc begins ...
        self.doc_ids: list[int] = []  # ... and its id
        self.version = 0

    def add(self, doc: int, tokens: list[int]) -> None:
        self.docs[doc] = tokens
        self._append(doc, tokens)
        self.version += 1

    def rebuild(self) -> None:
        self.sam, self.starts, self.doc_ids = SuffixAutomaton(), [], []
        for doc, tokens in self.docs.items():
            self._append(doc, tokens)
        self.version += 1

    def _append(self, doc: int, tokens: list[int]) -> None:
        self.starts.append(len(self.sam))
        self.doc_ids.append(doc)
        self.sam.extend_all(tokens)
        self.sam.extend(-1 - doc)  # a separator no other text has: no match runs across it

    def doc_at(self, pos: int) -> int:
        return self.doc_ids[bisect.bisect_right(self.starts, pos) - 1]


class SuffixDrafter:
    """The suffix draft of one request, with the Drafter's round interface (runtime/rounds.py)."""

    def __init__(self, cfg, sizer: TreeSizer | None, accept: AcceptTable, cache: SuffixCache | None,
                 scope: str, req: int, prompt: list[int], stats: Stats):
        self.cfg, self.sizer, self.req, self.stats = cfg, sizer, req, stats
        self.accept = AcceptTable(parent=accept)
        self.cache, self.scope = cache, scope
        self.prompt_len = len(prompt)
        self.local = SuffixAutomaton()
        self.local.extend_all(prompt)
        self.matcher: Matcher | None = None
        self.cache_version = -1
        self.candidates: list[Node] = []  # the last tree grown, for learning: all of it, sent or not ...
        self.sent = 0                      # ... and how many of its nodes went to the target
        self.expected = 0.0                # expected tokens committed by what was sent
        self.fed = 0                       # committed tokens the matcher has read
        self.cap = FIRST_CAP               # most nodes of the next draft (FIRST_CAP)

    @property
    def max_nodes(self) -> int:
        n = min(self.cfg.suffix_max_nodes, self.cap)
        if self.sizer is not None:  # beyond the measured curve a row's cost is a guess
            n = min(n, len(self.sizer.verify_ms_k) - 1)
        return max(n, 0)

    def propose(self, committed: list[int], max_depth: int, room: int | None = None
                ) -> tuple[list[int], list[int]]:
        t0 = time.perf_counter()
        self.candidates, self.sent, self.expected = [], 0, 1.0
        for t in committed[len(self.local):]:
            self.local.extend(t)
        limit = min(self.max_nodes, room if room is not None else self.max_nodes)
        if max_depth < 1 or limit < 1:
            return [], []
        sources = [(LOCAL, self.local, *self.local.repeat())]
        scope = self.cache.scope(self.scope) if self.cache is not None else None
        with self.cache.lock if scope is not None else nullcontext():  # the cache's automaton may grow
            if scope is not None:
                sources.append(self._cache_source(scope, committed))
            nodes = grow_tree(sources, self.accept, limit, max_depth)
        self.candidates, self.sent = nodes, self._price(nodes)
        sent = nodes[:self.sent]
        self.expected = 1.0 + sum(n.prob for n in sent)
        if scope is not None and any(n.source == CACHE for n in sent):
            self.cache.touch(self.scope, scope.doc_at(scope.sam.first[self.matcher.state]))
        self.stats.draft_s += time.perf_counter() - t0
        return [n.token for n in sent], [n.parent for n in sent]

    def _price(self, nodes: list[Node]) -> int:
        probs = [n.prob for n in nodes]
        if self.sizer is not None:
            return self.sizer.best_prefix(probs, self.req)
        # no measured curve (a fixed shape): the nodes more likely accepted than not
        return min(sum(p >= 0.5 for p in probs), self.cfg.max_nodes or len(probs))

    def _cache_source(self, scope, committed: list[int]):
        if self.matcher is None or self.matcher.sam is not scope.sam or self.cache_version != scope.version:
            self.matcher = Matcher(scope.sam)
            self.matcher.restart(committed[-CACHE_MATCH_TAIL:])
            self.cache_version = scope.version
            self.fed = len(committed)
        for t in committed[self.fed:]:
            self.matcher.feed(t)
        self.fed = len(committed)
        return CACHE, scope.sam, self.matcher.state, self.matcher.length

    def speculate(self, committed, tokens, parents) -> None:
        """Nothing to overlap: drafting costs no forward."""

    def settle(self, committed: list[int], res: VerifyResult, tokens, parents) -> None:
        """Learn from the verification. The target's tokens this round (``res.tokens``: what it
        accepted, then its own) judge every node of the grown tree whose parent they reach, sent
        or not: a node kept back because it looked unlikely is learned from too, or a match
        length priced out once would never be tried again."""
        on_path: list[bool] = []  # node i's path is the target's
        levels: list[int] = []    # node i's depth - 1: the index of the target's token it is judged by
        for node in self.candidates:
            level = 0 if node.parent < 0 else levels[node.parent] + 1
            reached = (node.parent < 0 or on_path[node.parent]) and level < len(res.tokens)
            hit = reached and node.token == res.tokens[level]
            levels.append(level)
            on_path.append(hit)
            if reached:
                self.accept.learn(node.source, node.bucket, node.score, hit)
        if self.sent:
            if len(res.accepted) == self.sent and self.sent * 2 >= self.cap:
                self.cap *= 2
            elif 2 * len(res.accepted) < self.sent:
                self.cap = max(MIN_CAP, self.cap // 2)
            self.stats.suffix_rounds += 1
            self.stats.suffix_drafted += self.sent
            self.stats.suffix_accepted += len(res.accepted)

    def observe(self, parents: list[int], res: VerifyResult, wire_s: float) -> None:
        if self.sizer is not None:
            self.sizer.observe_verify(len(parents) + 1, res.seconds, wire_s, self.req)

    def close(self, committed: list[int] | None = None) -> None:
        """Cache the request's output for the requests after it (in its scope)."""
        if self.cache is not None and committed is not None:
            self.cache.add(self.scope, committed[self.prompt_len:])


class HybridDrafter:
    """The suffix draft beside a model draft: each round verifies the suffix tree where it
    promises at least the tokens the model's would (a long match), the model's elsewhere.

    The model draft keeps its own state (runtime/drafter.py): rounds it sits out are tokens
    it reads on its next draft, and its overlapped draft, when one is running, bets on the
    main path of whichever tree went to the target. When it fails it is dropped, and the
    suffix draft goes on alone (then, where nothing is copied, the target alone).
    """

    def __init__(self, model, suffix: SuffixDrafter):
        self.model, self.suffix = model, suffix
        self.used = model

    def propose(self, committed: list[int], max_depth: int, room: int | None = None
                ) -> tuple[list[int], list[int]]:
        tokens, parents = self.suffix.propose(committed, max_depth, room)
        if tokens and (not self.model.alive or self.suffix.expected >= self._model_expected()):
            self.model.ready = None  # an overlapped draft for this root: not needed now
            self.used = self.suffix
            return tokens, parents
        self.suffix.sent = 0  # not verified; its tree is still judged by the target's tokens
        self.used = self.model
        return self.model.propose(committed, max_depth, room)

    def _model_expected(self) -> float:
        sizer = self.model.sizer
        return sizer.expected_tokens(sizer.last_choice) if sizer is not None else 1.0

    def speculate(self, committed, tokens, parents) -> None:
        self.model.speculate(committed, tokens, parents)

    def settle(self, committed: list[int], res: VerifyResult, tokens, parents) -> None:
        self.model.settle(committed, res, tokens, parents)
        self.suffix.settle(committed, res, tokens, parents)

    def observe(self, parents: list[int], res: VerifyResult, wire_s: float) -> None:
        self.used.observe(parents, res, wire_s)

    def close(self, committed: list[int] | None = None) -> None:
        self.model.close()
        self.suffix.close(committed)
