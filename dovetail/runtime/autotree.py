"""Size each draft from what it costs and what it earns: the verify-cost curve the target
measured at start-up, the draft's time per level, and the acceptance observed so far.

A round that drafts d levels commits E[tau(d)] = 1 + sum_j prod_{i<=j} alpha_i tokens,
where alpha_i is the chance that level i is accepted once levels 1..i-1 were. It costs a
verification of n(d)+1 tokens plus the draft's d levels (hidden behind verification when
the draft overlaps on its own device) plus the wire. The sizer picks the d in 0..max_depth
with the most tokens per second; d = 0 is plain target-only decoding, so a draft that does
not pay stops being asked, except for an occasional probe that keeps alpha up to date.

With the gate on, each draft also gets ``min_prob``: a draft token whose path probability
under the draft is below it is not proposed. A token of path probability P saves P plain
rounds (verify_ms(1) + wire) and costs one more verified row (the curve's mean slope over
its first GATE_SPAN steps) plus, unless the draft overlaps verification, a draft level; so
it pays when P > (slope + draft level) / plain round. Where verifying k tokens costs little
more than one (a GPU draft next to a many-core target) the gate is near 0; on llama.cpp on
two cores (37, 60, 85, 96 ms for k = 1..4) it is about one half. It relies on the draft's
probabilities being calibrated: bench.gating measures that.

The curve measured at start-up is where the sizer begins, not where it stays. Each round's
own verification time moves the estimate for its row count (VERIFY_EMA): a shared machine's
memory bandwidth drifts by 10-20% within a minute (a bf16 1.5B on two cores: one token in 79
to 107 ms across four start-ups), and a memory-bound k = 1 drifts most, so a curve measured
in a slow spell makes every extra row look cheaper than it is. Verifying the root alone is
never seen while drafting wins, so now and then (RECHECK_EVERY, backing off) the sizer
verifies the root alone to see what plain decoding costs now. A row count no round has
verified yet keeps its start-up price times the drift of the ones that were (``drift``):
the start-up curve comes from a short context and the backend alone, and a long copy
priced at it after a run of one-row rounds on a long prompt would look cheaper than it is.
"""
from __future__ import annotations

import threading

from dovetail.spec.tree import depths

PRIOR_ALPHA = 0.6     # acceptance assumed per level before any round is seen
PRIOR_WEIGHT = 2.0    # ... worth this many observed rounds
EMA = 0.1             # weight of the newest round in the draft/wire time estimates
PROBE_EVERY = 8       # while d = 0 wins, draft anyway once per this many rounds ...
PROBE_EVERY_MAX = 128  # ... doubling after each probe that does not change the decision
PROBE_SHARE = 0.05    # ... and only when the tokens its draft must read first (a 0.5B on two
                      # cores: ~4 ms each) cost at most this share of the rounds since the last draft
CATCH_UP_TOKENS = 4   # a draft round that first had to process more committed tokens than
                      # this (a prompt, a long gap) says nothing about the cost per level
VERIFY_EMA = 0.2      # weight of a round's own verification time in its row count's cost
RECHECK_EVERY = 16    # while drafting wins, verify the root alone once per this many choices ...
RECHECK_EVERY_MAX = 256  # ... doubling after each check that does not change the decision
GATE_SPAN = 4         # verify-curve steps averaged for the cost of one more row
MAX_GATE = 0.9        # a gate never asks for more certainty than this


class TreeSizer:
    """``batch_us``: the target's batched costs, flat (requests, rows each, us) triples
    (Handshake.batch_verify_us); without them several requests are priced as one."""

    def __init__(self, verify_us: list[int], max_depth: int, top_k: int, max_nodes: int, overlap: bool,
                 batch_us: list[int] | tuple = ()):
        if not verify_us:
            raise ValueError("the tree sizer needs the target's verify-cost curve")
        self.verify_ms_k = [t / 1000 for t in verify_us]  # [k-1] -> ms to verify k tokens, as last seen
        self.start_ms_k = list(self.verify_ms_k)           # ... as measured at start-up
        self.seen_k = [False] * len(verify_us)             # ... and whether a round has verified k rows since
        self.drift = 1.0  # what rounds cost over what the start-up curve said, over all row counts seen
        # requests -> [(rows in the forward, ms)], the single-request curve as 1
        self.batch_points: dict[int, list[tuple[int, float]]] = {1: [(k + 1, t) for k, t in enumerate(self.verify_ms_k)]}
        for n, r, us in zip(batch_us[0::3], batch_us[1::3], batch_us[2::3]):
            self.batch_points.setdefault(n, []).append((n * r, us / 1000))
        for points in self.batch_points.values():
            points.sort()
        self.in_flight: dict[int, tuple[int, float]] = {}  # request -> (rows, expected tokens) of its round
        self.max_depth, self.top_k, self.max_nodes, self.overlap = max_depth, top_k, max_nodes, overlap
        self.tries = [0] * (max_depth + 1)  # rounds that reached level i (1-based)
        self.hits = [0] * (max_depth + 1)   # ... and had it accepted
        self.draft_ms_per_level: float | None = None
        self.catch_up_ms_per_token: float | None = None  # what a draft pays per token it reads late
        self.wire_ms: float | None = None
        self.rounds_since_draft = 0
        self.probe_every = PROBE_EVERY
        self.choices_since_plain = 0
        self.recheck_every = RECHECK_EVERY
        self.last_choice = max_depth
        self._lock = threading.Lock()  # concurrent requests share one sizer

    # ---- the model ----------------------------------------------------------------------
    def verify_ms(self, k: int) -> float:
        """Cost of verifying k tokens: as rounds of k rows took, or for a row count no round has
        verified, as measured at start-up times the drift the rounds showed; linear beyond."""
        n = len(self.verify_ms_k)
        if k <= n:
            return self._row_cost(k - 1)
        last = self._row_cost(n - 1)
        slope = (last - self._row_cost(n - 2)) if n > 1 else last
        return last + max(slope, 0.0) * (k - n)

    def _row_cost(self, i: int) -> float:
        # The start-up curve is measured on a short context with the backend alone; rounds run
        # on the request's context through the worker. A row count the rounds never use (a
        # long copy, after a run of short ones) would keep its start-up price and look cheap.
        return self.verify_ms_k[i] if self.seen_k[i] else self.verify_ms_k[i] * self.drift

    def batch_ms(self, requests: int, rows: int) -> float:
        """Cost of one forward verifying ``rows`` rows of ``requests`` requests: interpolated
        in rows on the measured shapes of the nearest request counts, then between them."""
        counts = sorted(self.batch_points)
        if requests <= 1 or len(counts) == 1:
            return self.verify_ms(rows)
        lo = max(c for c in counts if c <= requests)
        hi = min((c for c in counts if c >= requests), default=lo)
        at_lo, at_hi = _along(self.batch_points[lo], rows), _along(self.batch_points[hi], rows)
        if hi == lo:
            return at_lo
        return at_lo + (at_hi - at_lo) * (requests - lo) / (hi - lo)

    def min_prob(self) -> float:
        """The gate: the path probability at which a draft token pays for itself."""
        with self._lock:
            n = min(GATE_SPAN, len(self.verify_ms_k) - 1)
            if n < 1:
                return 0.0
            slope = max(0.0, (self.verify_ms(n + 1) - self.verify_ms(1)) / n)
            level = 0.0 if self.overlap else (self.draft_ms_per_level or 0.0)
            return min(MAX_GATE, (slope + level) / self.plain_ms())

    def plain_ms(self) -> float:
        """A round that verifies the root alone: target-only decoding."""
        return self.verify_ms(1) + (self.wire_ms or 0.0)

    def alpha(self, level: int) -> float:
        return (self.hits[level] + PRIOR_ALPHA * PRIOR_WEIGHT) / (self.tries[level] + PRIOR_WEIGHT)

    def nodes(self, depth: int) -> int:
        return min(self.max_nodes, depth * self.top_k)

    def expected_tokens(self, depth: int) -> float:
        total, reach = 1.0, 1.0
        for level in range(1, depth + 1):
            reach *= self.alpha(level)
            total += reach
        return total

    def round_ms(self, depth: int, others: tuple[int, int] = (0, 0)) -> float:
        """A round's time; ``others``: (requests, rows) verified in the same forward."""
        verify = self.batch_ms(others[0] + 1, others[1] + self.nodes(depth) + 1)
        draft = depth * (self.draft_ms_per_level or 0.0)
        return (max(verify, draft) if self.overlap else verify + draft) + (self.wire_ms or 0.0)

    def tokens_per_ms(self, depth: int, others: tuple[int, int, float] = (0, 0, 0.0)) -> float:
        """Tokens per ms of the forward this round shares with ``others`` (requests, rows,
        expected tokens): all requests' tokens count, so a draft token is priced at the
        batch's marginal row, not at a lone request's."""
        return (self.expected_tokens(depth) + others[2]) / self.round_ms(depth, others[:2])

    # ---- decisions and feedback -----------------------------------------------------------
    def choose(self, req: int | None = None, behind: int = 0) -> int:
        """Levels to draft this round (0: verify the root alone), for request ``req``, priced
        with the other requests in flight (their last choices) sharing the forward; ``behind``:
        committed tokens the draft has not read yet (a probe pays for reading them)."""
        with self._lock:
            others = [v for r, v in self.in_flight.items() if r != req]
            load = (len(others), sum(r for r, _ in others), sum(e for _, e in others))
            depth = self._choose(load, behind)
            if req is not None:
                self.in_flight[req] = (self.nodes(depth) + 1, self.expected_tokens(depth))
            return depth

    def forget(self, req: int) -> None:
        """The request is over: it no longer shares forwards."""
        with self._lock:
            self.in_flight.pop(req, None)

    def _choose(self, load: tuple[int, int, float] = (0, 0, 0.0), behind: int = 0) -> int:
        if self.draft_ms_per_level is None:  # the draft's speed is unknown: find out first
            return self.max_depth
        best = max(range(self.max_depth + 1), key=lambda d: self.tokens_per_ms(d, load))
        if best > 0:
            self.probe_every = PROBE_EVERY
            self.choices_since_plain += 1
            # What does plain decoding cost now? Only a forward of its own tells (observe()).
            if self.choices_since_plain >= self.recheck_every and load[0] == 0:
                best, self.choices_since_plain = 0, 0
                self.recheck_every = min(2 * self.recheck_every, RECHECK_EVERY_MAX)
        else:
            self.choices_since_plain, self.recheck_every = 0, RECHECK_EVERY
            if self.rounds_since_draft + 1 >= self.probe_every and self._probe_affordable(behind):
                best = max(range(1, self.max_depth + 1), key=lambda d: self.tokens_per_ms(d, load))
                self.probe_every = min(2 * self.probe_every, PROBE_EVERY_MAX)
        self.last_choice = best
        return best

    def _probe_affordable(self, behind: int) -> bool:
        """A probe's draft first reads the tokens committed since it last drafted: on shared
        cores that can cost more than the probe can tell (a 0.5B reading 150 tokens: 0.5 s)."""
        if behind <= CATCH_UP_TOKENS or self.catch_up_ms_per_token is None:
            return True
        return behind * self.catch_up_ms_per_token <= PROBE_SHARE * (self.rounds_since_draft + 1) * self.plain_ms()

    def best_prefix(self, probs: list[float], req: int | None = None) -> int:
        """How many nodes of a free draft (the suffix draft's: no draft time) to verify, given
        each node's probability of being accepted, best first and never a node before its
        parent: the count with the most expected tokens per ms, 0 when none beats decoding
        alone. Priced on the forward it shares with the other requests in flight."""
        with self._lock:
            others = [v for r, v in self.in_flight.items() if r != req]
            n, rows, tokens = len(others), sum(r for r, _ in others), sum(e for _, e in others)
            wire = self.wire_ms or 0.0
            best, best_rate, expected, best_expected = 0, 0.0, 1.0, 1.0
            for m in range(len(probs) + 1):
                expected += probs[m - 1] if m else 0.0
                rate = (expected + tokens) / (self.batch_ms(n + 1, rows + m + 1) + wire)
                if rate > best_rate:
                    best, best_rate, best_expected = m, rate, expected
            if req is not None:
                self.in_flight[req] = (best + 1, best_expected)
            return best

    def observe(self, parents: list[int], accepted: int, draft_s: float | None, wire_s: float,
                synced: int = 1, verify_s: float | None = None, req: int | None = None) -> None:
        """One verified round: the tree drafted (parents), how many draft tokens were accepted,
        how many committed tokens the draft processed first (``synced``), and how long the
        target took to verify it (``verify_s``; counted only when request ``req`` had the
        forward to itself)."""
        with self._lock:
            self._observe(parents, accepted, draft_s if synced <= CATCH_UP_TOKENS else None)
            if draft_s is not None and synced > CATCH_UP_TOKENS:
                self.catch_up_ms_per_token = _ema(self.catch_up_ms_per_token, 1000 * draft_s / synced)
            self._observe_verify(len(parents) + 1, verify_s, wire_s, req)

    def observe_verify(self, rows: int, verify_s: float | None, wire_s: float, req: int | None = None) -> None:
        """A verification of ``rows`` rows whose draft this sizer did not choose (the suffix
        draft's): it teaches the curve and the wire, not the model draft's acceptance."""
        with self._lock:
            self._observe_verify(rows, verify_s, wire_s, req)

    def _observe_verify(self, rows: int, verify_s: float | None, wire_s: float, req: int | None) -> None:
        self.wire_ms = _ema(self.wire_ms, 1000 * wire_s)
        alone = not any(r != req for r in self.in_flight)
        if verify_s is not None and alone and rows <= len(self.verify_ms_k):
            old = self.verify_ms_k[rows - 1]
            self.verify_ms_k[rows - 1] = (1 - VERIFY_EMA) * old + VERIFY_EMA * 1000 * verify_s
            self.seen_k[rows - 1] = True
            ratio = 1000 * verify_s / self.start_ms_k[rows - 1] if self.start_ms_k[rows - 1] > 0 else 1.0
            self.drift = (1 - VERIFY_EMA) * self.drift + VERIFY_EMA * ratio

    def _observe(self, parents: list[int], accepted: int, draft_s: float | None) -> None:
        depth = max(depths(parents), default=0)
        self.rounds_since_draft = 0 if depth else self.rounds_since_draft + 1
        for level in range(1, depth + 1):
            if level > accepted + 1:
                break
            self.tries[level] += 1
            self.hits[level] += level <= accepted
        if depth and draft_s is not None:
            self.draft_ms_per_level = _ema(self.draft_ms_per_level, 1000 * draft_s / depth)

    def summary(self) -> dict:
        return {"alpha": [round(self.alpha(i), 3) for i in range(1, self.max_depth + 1)],
                "draft_ms_per_level": self.draft_ms_per_level, "wire_ms": self.wire_ms,
                "depth": self.last_choice}


def skip_draft_reason(verify_us: list[int], max_depth: int, top_k: int, max_nodes: int,
                      overlap: bool) -> str | None:
    """Why no draft can pay on this target's curve, or None when one might.

    Decided before the draft starts, with what is known then: the target's measured curve,
    the prior acceptance per level, and a draft and wire that cost nothing. Those last two
    are optimistic, so None means only that drafting *might* pay (the sizer then judges it
    round by round); a reason means that not even a free draft at the prior acceptance
    beats decoding alone: then there is no draft at all, no draft prefill and no probes.
    """
    sizer = TreeSizer(verify_us, max_depth, top_k, max_nodes, overlap)
    sizer.draft_ms_per_level, sizer.wire_ms = 0.0, 0.0
    alone = sizer.tokens_per_ms(0)
    depth = max(range(1, max_depth + 1), key=sizer.tokens_per_ms)
    if sizer.tokens_per_ms(depth) > alone:
        return None
    n = sizer.nodes(depth) + 1
    return (f"no draft: on this target's measured curve, verifying {n} tokens costs {sizer.verify_ms(n):.0f} ms "
            f"against {sizer.verify_ms(1):.0f} ms for one, so even a free draft accepted at the prior rate "
            f"({PRIOR_ALPHA} per level) would commit {1000 * sizer.tokens_per_ms(depth):.1f} tokens/s against "
            f"{1000 * alone:.1f} decoding alone; decoding with the target alone "
            "(force a draft with --force-draft, or launch(..., force_draft=True))")


def _along(points: list[tuple[int, float]], rows: int) -> float:
    """Linear interpolation through (rows, ms) points; beyond them, along the nearest two
    (never downhill, never below zero)."""
    if len(points) == 1:
        return points[0][1] * rows / points[0][0]
    i = next((j for j in range(1, len(points)) if rows <= points[j][0]), len(points) - 1)
    (r0, t0), (r1, t1) = points[i - 1], points[i]
    slope = max(0.0, (t1 - t0) / (r1 - r0)) if r1 != r0 else 0.0
    return max(0.0, t0 + slope * (rows - r0))


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
