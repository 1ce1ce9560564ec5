"""The coordinator's side of the draft worker, for one request: sync, speculate, fall back.

It talks to the draft worker's client and reports failures to DraftHealth; nothing else of
the coordinator is in reach.
"""
from __future__ import annotations

import logging
import time

from dovetail.protocol import (
    Close, DraftProposal, DraftRequest, Feature, OpenRequest, Opened, VerifyResult, decode_features, encode_features,
)
from dovetail.runtime.autotree import TreeSizer
from dovetail.runtime.client import WorkerClient, WorkerDied, WorkerError, WorkerTimeout
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.draft_health import DEAD, DraftHealth
from dovetail.runtime.results import Stats
from dovetail.spec.tree import main_path, trim_depth, trim_nodes

log = logging.getLogger("dovetail")

BUSY = "busy"  # the error code of a worker holding max_requests requests already


class Drafter:
    """The coordinator's view of the draft worker for one request.

    ``synced`` counts the leading committed tokens the draft is known to hold; each request
    to the draft says so (``base_len``), and the draft rolls back whatever lies beyond.

    A feature draft (its handshake says ``features``) also gets the target's hidden states:
    the prompt's (Opened.features) and each verification's (VerifyResult.features: the
    root and the accepted nodes). They pile up here until the next DraftRequest carries
    them, so its rows always cover committed positions up to, not including, the last
    committed token (the alignment rule in workers/feature_draft.py). Such a draft does
    not draft ahead (no ``speculate``): it would need features of unverified tokens.
    """

    def __init__(self, client: WorkerClient, cfg: CoordinatorConfig, health: DraftHealth, sizer: TreeSizer | None,
                 req: int, prompt: list[int], stats: Stats, *, wants_features: bool = False,
                 features: Feature | None = None, scope: str = ""):
        self.client, self.cfg, self.health = client, cfg, health
        self.req, self.stats = req, stats
        self.alive = True
        self.step = 0
        self.synced = len(prompt)
        self.sizer = sizer                          # None: fixed tree shape from the config
        self.last_draft_s: float | None = None      # the draft's own seconds for this round
        self.last_synced = 0                        # committed tokens it processed first
        self.prefilled = False                      # the first request makes it read the prompt
        self.ready: DraftProposal | None = None     # a proposal for the next root, if any
        self.bet: tuple[int, list[int]] | None = None  # (step, main-path tokens) of the overlapped draft
        self.wants_features = wants_features
        self.features: list[Feature] = [features] if features is not None and wants_features else []
        # scope: the draft worker starts from its cached KV of earlier prompts of that scope only
        self._guard(lambda: self.client.call(OpenRequest(req, prompt, cache_scope=scope), Opened, self.cfg.draft_timeout_s,
                                             "draft_timeout_s"))

    def propose(self, committed: list[int], max_depth: int, room: int | None = None
                ) -> tuple[list[int], list[int]]:
        """The next draft, cut to ``max_depth`` (the tokens still wanted) and to ``room`` nodes
        (what the target's context has left)."""
        self.last_draft_s, self.last_synced = None, 0
        if not self.alive or max_depth < 1 or (room is not None and room < 1):
            return [], []
        prop, self.ready = self.ready, None
        if prop is None:
            behind = len(committed) - (self.synced if self.prefilled else 0)  # tokens the draft reads first
            depth, max_nodes = self.shape(behind)
            if depth == 0:  # drafting does not pay at the moment: verify the root alone
                return [], []
            self.step += 1
            msg = DraftRequest(self.req, self.step, self.synced, committed[self.synced:],
                               depth, self.cfg.top_k, max_nodes, features=merge_features(self.features),
                               min_prob=self.gate())
            self.features = []  # sent; if the call fails the draft is dropped for this request
            t0 = time.perf_counter()
            prop = self._guard(lambda: self._call(msg))
            if prop is None:
                return [], []
            self.stats.wire_s += max(0.0, time.perf_counter() - t0 - prop.seconds)
            self.last_synced = behind
            self.prefilled = True
            self.synced = len(committed)
        self.stats.draft_s += prop.seconds
        self.last_draft_s = prop.seconds
        tokens, parents = trim_depth(prop.tokens, prop.parents, max_depth)
        return (tokens, parents) if room is None else trim_nodes(tokens, parents, room)

    def shape(self, behind: int = 0) -> tuple[int, int]:
        """(depth, max_nodes) of the next draft: the sizer's choice, or the configured shape;
        ``behind``: committed tokens the draft has not read yet."""
        if self.sizer is None:
            return self.cfg.depth, self.cfg.max_nodes
        depth = self.sizer.choose(self.req, behind)
        return depth, max(1, self.sizer.nodes(depth))

    def gate(self) -> float:
        """min_prob for the next draft: the sizer's price of a token, when the gate is on."""
        return self.sizer.min_prob() if self.cfg.gate and self.sizer is not None else 0.0

    def speculate(self, committed: list[int], tokens: list[int], parents: list[int]) -> None:
        """Start drafting the next round, betting the main path is accepted in full."""
        if not self.alive or not tokens or self.wants_features:
            return
        path = [tokens[i] for i in main_path(parents)]
        depth, max_nodes = self.shape()
        if depth == 0:
            return
        self.step += 1
        msg = DraftRequest(self.req, self.step, len(committed), path, depth, self.cfg.top_k,
                           max_nodes, guess_root=True, min_prob=self.gate())
        self._guard(lambda: self.client.send(msg))
        self.bet = (self.step, path)

    def settle(self, committed: list[int], res: VerifyResult, tokens, parents) -> None:
        """After a verification: keep the overlapped draft if the bet won, else resync."""
        if self.wants_features and res.features is not None:
            self.features.append(res.features)
        if self.bet is None or not self.alive:
            return
        step, path = self.bet
        self.bet = None
        # The draft now holds committed + path + its guess; find how much of that is right.
        if res.tokens[:-1] == path:
            prop = self._guard(lambda: self._await(step))
            if prop is None:
                return
            if prop.root_guess == res.tokens[-1]:
                self.stats.speculative_hits += 1
                self.ready = prop
                self.synced = len(committed) + len(res.tokens)
                return
            self.stats.draft_s += prop.seconds  # wasted, but the draft did spend it
            self.synced = len(committed) + len(path)
            return
        agree = 0
        while agree < len(path) and agree < len(res.tokens) and path[agree] == res.tokens[agree]:
            agree += 1
        self.synced = len(committed) + agree

    def observe(self, parents: list[int], res: VerifyResult, wire_s: float) -> None:
        """Tell the sizer what the round drafted, what it earned and what it cost."""
        if self.sizer is not None:
            self.sizer.observe(parents, len(res.accepted), self.last_draft_s, wire_s, self.last_synced,
                               verify_s=res.seconds, req=self.req)

    def close(self, committed: list[int] | None = None) -> None:
        """End the request on the draft; its reply is dropped on arrival, so no waiting."""
        # Also after a failed draft call: a draft that timed out or refused a step still holds
        # the request's state, and max_requests leaks would leave it answering only "busy".
        if self.health.state == DEAD:
            return
        try:
            self.client.send(Close(self.req))
        except WorkerError as e:  # it died meanwhile: DraftHealth hears of it from the next call
            log.debug("draft Close for request %d not sent: %s", self.req, e)

    def _call(self, msg: DraftRequest) -> DraftProposal:
        self.client.send(msg)
        return self._await(msg.step)

    def _await(self, step: int) -> DraftProposal:
        return self.client.recv(
            lambda m: isinstance(m, DraftProposal) and m.req_id == self.req and m.step == step,
            self.cfg.draft_timeout_s, "draft_timeout_s", self.req)

    def _guard(self, fn):
        """Run a draft call; a failing draft turns into target-only decoding, never an error."""
        try:
            return fn()
        except WorkerError as e:
            if e.code == BUSY:  # the worker is fine, only full: no reason to doubt it next time
                log.warning("draft worker busy (%s); this request goes on with the target alone "
                            "(worker_max_requests / --max-requests sets how many requests it holds)", e.detail)
            else:
                log.warning("draft worker failed (%s); continuing with the target alone", e)
                self.health.failed(e)
            self.stats.draft_fallback_reason = fallback_reason(e)
            self.alive = False
            self.stats.draft_fallback = True
            self.ready = self.bet = None
            return None


def fallback_reason(error: WorkerError) -> str:
    """Stats.draft_fallback_reason for a failed draft call."""
    if isinstance(error, WorkerDied):
        return "died"
    if isinstance(error, WorkerTimeout):
        return "timeout"
    return error.code  # "busy", "stale_step", "internal", ...


def merge_features(parts: list[Feature]) -> Feature | None:
    """One Feature holding the rows of ``parts`` in order (re-encoded only when there are several)."""
    if len(parts) <= 1:
        return parts[0] if parts else None
    import numpy as np
    return encode_features(np.concatenate([decode_features(p) for p in parts]), parts[0].codec)
