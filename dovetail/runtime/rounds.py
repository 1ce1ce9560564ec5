"""One request's decoding: draft, verify, commit, round after round.

Only tokens the target has verified are ever committed or yielded. With ``overlap`` on,
the draft works on round n+1 while the target verifies round n, betting that the whole
main path is accepted and that the target's next token is the draft's own favourite; the
bet is thrown away when it loses (runtime/drafter.py).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Iterator

from dovetail.protocol import Close, Handshake, OpenRequest, Opened, Taken, VerifyRequest, VerifyResult
from dovetail.runtime.autotree import TreeSizer
from dovetail.runtime.client import WorkerClient, WorkerError
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.draft_health import DraftHealth
from dovetail.runtime.drafter import Drafter
from dovetail.runtime.requests import CoordinatorBusy
from dovetail.runtime.results import Committed, Stats
from dovetail.spec.sampling import Processing, TokenLogprobs
from dovetail.runtime.suffix_draft import AcceptTable, HybridDrafter, SuffixCache, SuffixDrafter

log = logging.getLogger("dovetail")

CONTEXT_FULL = "context_full"  # the target's error code when its KV cells have no room (workers/target.py)
GRAMMAR = "grammar"  # ... when a request's grammar cannot be built, or allows no token the vocabulary has


class GrammarError(ValueError):
    """The request's grammar fails on this model (its tokenizer cannot spell what it asks)."""


class RoundLoop:
    """What every request's rounds share: the two workers, the tree settings, the draft's health.

    ``config``, ``overlap``, ``sizer``, ``draft`` and ``suffix`` are read at the start of each
    request, so a change between requests applies to the next one. ``suffix``: run the suffix
    draft (runtime/suffix_draft.py), alone or beside the draft worker; what all requests
    learned of its acceptance and their outputs (by scope) stay here.
    """

    def __init__(self, target: WorkerClient, draft: WorkerClient | None, target_info: Handshake,
                 draft_info: Handshake | None, config: CoordinatorConfig, *, overlap: bool,
                 stop_token_ids: set[int], suffix: bool = False):
        self.target, self.draft = target, draft
        self.draft_info = draft_info
        self.config, self.overlap = config, overlap
        self.stop_token_ids = stop_token_ids
        self.max_context = target_info.max_context  # 0: unknown
        self.health = DraftHealth(draft, config.draft_probe_timeout_s)
        self.suffix = suffix
        self.sizer = make_sizer(config, target_info, overlap) if draft is not None or suffix else None
        self.suffix_accept = AcceptTable()
        self.suffix_cache = SuffixCache(config.suffix_cache_tokens)
        self._ids = itertools.count(1)

    def run(self, prompt: list[int], max_new: int, proc: Processing, seed: int,
            stats: Stats, cancel: threading.Event | None = None, scope: str = "") -> Iterator[Committed]:
        """Yield the tokens each round commits until a stop token, ``max_new`` tokens or ``cancel``;
        ``proc``: how the target turns its logits into tokens (penalties, bias, temperature, top_p,
        logprobs); ``scope``: whose earlier outputs the suffix draft may copy from and whose
        cached prompt prefixes the target may start from (the server: the API key's)."""
        cfg, overlap = self.config, self.overlap
        req = next(self._ids)
        t_start = time.perf_counter()
        stats.prompt_tokens = len(prompt)
        # Hidden states travel only to a draft that reads them (its handshake says so).
        features = bool(self.draft_info is not None and self.draft_info.features)
        drafter = None
        committed = list(prompt)
        try:
            # Inside the try: a prefill that fails or times out still gets its Close, or the
            # target would keep the sequence (and a llama.cpp sequence id) for good.
            # A cancel (the client left) ends the wait at once; the Close in the finally
            # stops the target's prefill before its next chunk.
            self.target.send(open_request(req, prompt, proc, seed, features, self.stop_token_ids, scope))
            try:
                opened = self.target.recv(lambda m: isinstance(m, Opened) and m.req_id == req,
                                          cfg.prefill_timeout_s, "prefill_timeout_s", req, cancel=cancel)
            except WorkerError as e:
                if e.code == CONTEXT_FULL:  # cells taken by requests we did not reserve for: capacity
                    raise CoordinatorBusy(f"the target's KV cells are full now: {e.detail}") from e
                if e.code == GRAMMAR:
                    raise GrammarError(e.detail) from e
                raise
            if opened is None:
                stats.finish_reason = "cancelled"
                return
            stats.prefill_s = opened.seconds
            stats.cached_tokens = opened.reused
            drafter = self._start_drafter(req, prompt, stats, opened, scope)
            # The target holds the first token's logits already: ask for it with no tree and it
            # streams at once, with no forward; the draft starts from it (a tree now would cost
            # a forward before the first token, and its first level is what the logits say).
            free = opened.root_ready
            step = 0  # the VerifyRequest's: the free one counts as a step, not as a verification round
            while True:
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                budget = max_new - stats.new_tokens
                # A tree's rows take context too (llama.cpp: one cell each, however shallow):
                # the root and its n nodes need len(committed) + n positions of it.
                room = self.max_context - len(committed) if self.max_context else None
                tokens, parents = drafter.propose(committed, budget - 1, room) if drafter and not free else ([], [])
                t0 = time.perf_counter()
                self.target.send(VerifyRequest(req, step, committed[-1], tokens, parents))
                if drafter and overlap:
                    drafter.speculate(committed, tokens, parents)
                try:
                    res = self.target.recv(
                        lambda m: isinstance(m, VerifyResult) and m.req_id == req and m.step == step,
                        cfg.verify_timeout_s, "verify_timeout_s", req,
                        restart=lambda m: isinstance(m, Taken) and m.req_id == req and m.step == step)
                except WorkerError as e:
                    if e.code == GRAMMAR:
                        raise GrammarError(e.detail) from e
                    if e.code != CONTEXT_FULL:
                        raise
                    # It outgrew its reservation (Coordinator's reserve=) and the shared cells
                    # are full: the end of its context, as for any model.
                    log.warning("request %d: the target's KV cells are full after %d tokens; it ends here (%s)",
                                req, stats.new_tokens, e.detail)
                    stats.finish_reason = "length"
                    return
                step += 1
                wire = max(0.0, time.perf_counter() - t0 - res.seconds)
                if free:  # the prefill's token: no verification, nothing drafted, no forward's cost to learn
                    stats.prefill_first, stats.wire_s, free = 1, stats.wire_s + wire, False
                else:
                    count_round(stats, tokens, res, wire)
                    if drafter:
                        drafter.settle(committed, res, tokens, parents)
                        drafter.observe(parents, res, wire)
                new, stop = self._cut(res.tokens[:budget])
                new = Committed(new, unflat_logprobs(res, len(new)) if proc.logprobs >= 0 else None)
                committed.extend(new)
                stats.new_tokens += len(new)
                yield new
                if stop or stats.new_tokens >= max_new:
                    stats.finish_reason = "stop" if stop else "length"
                    return
        finally:
            stats.seconds = time.perf_counter() - t_start
            stats.target_idle_s = max(0.0, stats.seconds - stats.prefill_s - stats.verify_s)
            stats.draft_idle_s = max(0.0, stats.seconds - stats.draft_s) if drafter else 0.0
            self._close_request(req, drafter, committed)

    def _start_drafter(self, req: int, prompt: list[int], stats: Stats, opened: Opened, scope: str):
        """This request's drafter: the draft worker's (unless its health says not now), the
        suffix draft, both (HybridDrafter), or None."""
        model = None
        if self.draft is not None:
            if self.health.usable():
                model = Drafter(self.draft, self.config, self.health, self.sizer, req, prompt, stats,
                                wants_features=bool(self.draft_info is not None and self.draft_info.features),
                                features=opened.features, scope=scope)
            else:
                stats.draft_fallback, stats.draft_fallback_reason = True, self.health.state
        if not self.suffix:
            return model
        self.suffix_cache.max_tokens = self.config.suffix_cache_tokens  # the config as of this request
        suffix = SuffixDrafter(self.config, self.sizer, self.suffix_accept, self.suffix_cache, scope, req, prompt,
                               stats)
        return suffix if model is None else HybridDrafter(model, suffix)

    def _cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The tokens up to and including the first stop token, and whether there was one."""
        stop = next((i for i, t in enumerate(tokens) if t in self.stop_token_ids), None)
        return (tokens, False) if stop is None else (tokens[:stop + 1], True)

    def _close_request(self, req: int, drafter, committed: list[int]) -> None:
        if self.sizer is not None:
            self.sizer.forget(req)  # its rows no longer share the target's forwards
        if drafter is not None:
            drafter.close(committed)
        try:
            self.target.send(Close(req))
        except Exception:  # the target may be gone; its error was raised already
            pass
        for client in (self.target, self.draft):
            if client is not None:
                client.close_mailbox(req)


def open_request(req: int, prompt: list[int], proc: Processing, seed: int, features: bool,
                 stop_ids=(), scope: str = "") -> OpenRequest:
    """``stop_ids``: what ends the output, sent with a grammar (allowed where it is complete);
    ``scope``: whose cached prompt prefixes the target may start from."""
    return OpenRequest(req, prompt, proc.temperature, proc.top_p, seed, features,
                       grammar=proc.grammar.encode(), stop_ids=sorted(stop_ids) if proc.grammar else [],
                       presence_penalty=proc.presence_penalty, frequency_penalty=proc.frequency_penalty,
                       repetition_penalty=proc.repetition_penalty, bias_ids=list(proc.logit_bias),
                       bias_values=[float(v) for v in proc.logit_bias.values()], logprobs=proc.logprobs,
                       cache_scope=scope)


def unflat_logprobs(res: VerifyResult, n: int) -> list[TokenLogprobs]:
    """The first ``n`` committed tokens' TokenLogprobs from a VerifyResult's flat lists."""
    k = len(res.top_ids) // len(res.tokens)
    return [TokenLogprobs(res.logprobs[i], list(zip(res.top_ids[i * k:(i + 1) * k], res.top_logprobs[i * k:(i + 1) * k])))
            for i in range(n)]


def count_round(stats: Stats, tokens: list[int], res: VerifyResult, wire_s: float) -> None:
    stats.wire_s += wire_s
    stats.verify_s += res.seconds
    stats.rounds += 1
    stats.drafted += len(tokens)
    stats.draft_rounds += bool(tokens)
    stats.accepted_drafts += len(res.accepted)
    stats.accepted += len(res.tokens)
    stats.accept_lengths.append(len(res.tokens))


def make_sizer(config: CoordinatorConfig, hs_target: Handshake, overlap: bool) -> TreeSizer | None:
    """A TreeSizer when auto sizing is on and the target measured its verify-cost curve."""
    if not config.auto_tree or not hs_target.verify_us:
        return None
    return TreeSizer(hs_target.verify_us, config.depth, config.top_k, config.max_nodes, overlap,
                     batch_us=hs_target.batch_verify_us)
