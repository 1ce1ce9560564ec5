"""Prometheus metrics at /metrics, under vLLM's names with our prefix, so dashboards carry over.

vLLM's spec-decode counters are per draft round: ``num_drafts`` counts verifications that
carried draft tokens, ``num_accepted_tokens_per_pos{position=i}`` the rounds whose i-th
draft token was accepted. Ours on top: where the time went (drafting, verifying, the wire)
and how often a request ran target-only because the draft failed; and the spec-decode
counters split by where the draft came from (``source``: "model", the draft worker, or
"suffix", the suffix draft).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dovetail.runtime.results import Stats

PREFIX = "dovetail:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)
MAX_POSITIONS = 32  # per-position acceptance is kept for the first this many draft positions
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        disable_created_metrics()  # no *_created series: one process, one start time
        self.registry = r = CollectorRegistry()
        p = PREFIX
        self.drafts = Counter(p + "spec_decode_num_drafts", "Verifications that carried draft tokens", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Draft tokens sent for verification",
                                    registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Draft tokens the target accepted",
                                       registry=r)
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Rounds whose draft token at this position was accepted",
                                        ["position"], registry=r)
        self.by_source = {
            name: Counter(p + "spec_decode_source_" + name, doc + ", by draft source", ["source"], registry=r)
            for name, doc in (("num_drafts", "Verifications that carried draft tokens"),
                              ("num_draft_tokens", "Draft tokens sent for verification"),
                              ("num_accepted_tokens", "Draft tokens the target accepted"))}
        self.running = Gauge(p + "num_requests_running", "Requests decoding now", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests admitted and waiting for a slot", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        # vLLM counts both in tokens: the hit rate is hits / queries
        self.cache_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the target's prefix "
                                     "cache", registry=r)
        self.cache_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the target's prefix cache",
                                  registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(p + "request_success", "Requests finished, by reason", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between output tokens", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.draft_s = Counter(p + "draft_seconds", "Seconds the draft worker computed", registry=r)
        self.verify_s = Counter(p + "verify_seconds", "Seconds the target worker verified", registry=r)
        self.wire_s = Counter(p + "wire_seconds", "Seconds of round trips beyond the workers' compute", registry=r)
        self.worker_requests = Gauge(p + "worker_open_requests", "Requests the worker holds open (all its clients'), "
                                     "asked at each scrape", ["worker"], registry=r)
        self.fallbacks = Counter(p + "draft_fallbacks", "Requests that ran target-only because the draft failed",
                                 registry=r)

    def observe_finished(self, stats: Stats, reason: str) -> None:
        """One request's counters, once, when it ends (also when cancelled)."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cache_queries.inc(stats.prompt_tokens)
        self.cache_hits.inc(stats.cached_tokens)
        self.finished.labels(reason).inc()
        self.draft_s.inc(stats.draft_s)
        self.verify_s.inc(stats.verify_s)
        self.wire_s.inc(stats.wire_s)
        if stats.draft_fallback:
            self.fallbacks.inc()
        self.drafts.inc(stats.draft_rounds)
        self.draft_tokens.inc(stats.drafted)
        self.accepted_tokens.inc(stats.accepted_drafts)
        suffix = (stats.suffix_rounds, stats.suffix_drafted, stats.suffix_accepted)
        totals = (stats.draft_rounds, stats.drafted, stats.accepted_drafts)
        for counter, all_, from_suffix in zip(self.by_source.values(), totals, suffix):
            counter.labels("suffix").inc(from_suffix)
            counter.labels("model").inc(all_ - from_suffix)
        for length in stats.accept_lengths:  # accepted draft tokens + 1 per round
            for pos in range(min(length - 1, MAX_POSITIONS)):
                self.accepted_per_pos.labels(str(pos)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
