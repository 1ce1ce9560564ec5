"""The coordinator: drives draft/verify rounds over the two workers and commits tokens.

Only tokens the target has verified are ever committed or streamed. With ``overlap`` on,
the draft works on round n+1 while the target verifies round n, betting that the whole
main path is accepted and that the target's next token is the draft's own favourite; the
bet is thrown away when it loses.
"""
from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from dovetail.client import WorkerClient, WorkerDied, WorkerError, WorkerTimeout
from dovetail.config import CoordinatorConfig
from dovetail.protocol import (
    Close, DraftProposal, DraftRequest, Handshake, Heartbeat, OpenRequest, Opened, VerifyRequest,
    VerifyResult,
)
from dovetail.tree import depths, main_path

log = logging.getLogger("dovetail")


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0                 # verifications
    drafted: int = 0                # draft tokens sent for verification
    accepted: int = 0               # tokens committed by verifications (accepted drafts + 1 each)
    accepted_drafts: int = 0        # draft tokens among them
    speculative_hits: int = 0       # overlapped drafts that could be used
    seconds: float = 0.0            # wall time of the request, prefill included
    prefill_s: float = 0.0
    draft_s: float = 0.0            # draft worker compute
    verify_s: float = 0.0           # target worker compute (verifications)
    wire_s: float = 0.0             # round trips minus worker compute, where the caller waited
    target_idle_s: float = 0.0
    draft_idle_s: float = 0.0
    draft_fallback: bool = False    # the draft failed and decoding went on with the target alone
    finish_reason: str = ""
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per round

    @property
    def mean_accepted(self) -> float:
        """τ: tokens committed per verification round (accepted draft tokens + 1)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole request's wall time, prefill included."""
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens over the time after prefill: the part speculation speeds up."""
        decode = self.seconds - self.prefill_s
        return self.new_tokens / decode if decode > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_s:.2f} tok/s; "
                f"{self.rounds} rounds, {self.mean_accepted:.2f} accepted per round"
                + (" (draft failed: target-only)" if self.draft_fallback else ""))


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: Stats


@dataclass
class Chunk:
    """Tokens committed by one verification round, and the text they completed."""
    token_ids: list[int]
    text: str


class Coordinator:
    def __init__(self, target: WorkerClient, draft: WorkerClient | None, hs_target: Handshake,
                 hs_draft: Handshake | None, tokenizer, config: CoordinatorConfig, *, overlap: bool,
                 context=None, run_dir=None):
        self.target, self.draft = target, draft
        self.target_info, self.draft_info = hs_target, hs_draft
        self.tokenizer, self.config, self.overlap = tokenizer, config, overlap
        self._ctx, self._run_dir = context, run_dir
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one request at a time through the workers
        self._closed = False
        # "ok", "suspect" (timed out: probed before each request until it answers) or "dead".
        self.draft_health = "ok" if draft is not None else "dead"
        self._probes = itertools.count(1)
        self.stop_token_ids = set(config.stop_token_ids if config.stop_token_ids is not None
                                  else default_stop_ids(tokenizer))

    # ---- public API -------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> GenerationResult:
        stats = Stats()
        ids: list[int] = []
        for chunk in self.stream(prompt, max_new_tokens, temperature, top_p, seed, stats=stats):
            ids.extend(chunk.token_ids)
        return GenerationResult(ids, self._decode(ids), stats)

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, *, stats: Stats | None = None) -> Iterator[Chunk]:
        """Yield committed tokens round by round, as the target verifies them."""
        if self._closed:
            raise RuntimeError("the coordinator is closed")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        prompt_ids = self.encode_prompt(prompt)
        stats = stats if stats is not None else Stats()
        seed = int(time.time_ns() % (1 << 31)) if seed is None else seed
        with self._lock:
            yield from self._decode_stream(self._rounds(prompt_ids, max_new_tokens, temperature, top_p, seed, stats))

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            self._need_tokenizer("chat messages")
            out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.target_info.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.target_info.vocab_size})")
            return list(prompt)
        raise TypeError("prompt must be text, a list of chat messages ({'role', 'content'}) or a non-empty list of token ids")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        clients = [c for c in (self.draft, self.target) if c is not None]
        for client in clients:  # both exit at once rather than one after the other
            client.request_shutdown()
        for client in clients:
            client.wait_exit()
        if self._ctx is not None:
            self._ctx.term()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def worker_pids(self) -> dict[str, int | None]:
        return {"target": self.target.pid, "draft": self.draft.pid if self.draft else None}

    # ---- decoding rounds --------------------------------------------------------------
    def _rounds(self, prompt: list[int], max_new: int, temperature: float, top_p: float, seed: int,
                stats: Stats) -> Iterator[list[int]]:
        cfg = self.config
        req = next(self._ids)
        t_start = time.perf_counter()
        stats.prompt_tokens = len(prompt)
        opened = self.target.call(OpenRequest(req, prompt, temperature, top_p, seed), Opened,
                                  cfg.prefill_timeout_s, "prefill_timeout_s")
        stats.prefill_s = opened.seconds
        drafter = _Drafter(self, req, prompt, stats) if self._draft_usable(stats) else None
        committed = list(prompt)
        try:
            while True:
                budget = max_new - stats.new_tokens
                tokens, parents = drafter.propose(committed, budget - 1) if drafter else ([], [])
                t0 = time.perf_counter()
                self.target.send(VerifyRequest(req, stats.rounds, committed[-1], tokens, parents))
                if drafter and self.overlap:
                    drafter.speculate(committed, tokens, parents)
                res = self.target.recv(
                    lambda m: isinstance(m, VerifyResult) and m.req_id == req and m.step == stats.rounds,
                    cfg.verify_timeout_s, "verify_timeout_s", req)
                stats.wire_s += max(0.0, time.perf_counter() - t0 - res.seconds)
                stats.verify_s += res.seconds
                stats.rounds += 1
                stats.drafted += len(tokens)
                stats.accepted_drafts += len(res.accepted)
                stats.accepted += len(res.tokens)
                stats.accept_lengths.append(len(res.tokens))
                if drafter:
                    drafter.settle(committed, res, tokens, parents)
                new = res.tokens[:budget]
                stop = next((i for i, t in enumerate(new) if t in self.stop_token_ids), None)
                if stop is not None:
                    new = new[:stop + 1]
                committed.extend(new)
                stats.new_tokens += len(new)
                yield new
                if stop is not None or stats.new_tokens >= max_new:
                    stats.finish_reason = "stop" if stop is not None else "length"
                    return
        finally:
            stats.seconds = time.perf_counter() - t_start
            stats.target_idle_s = max(0.0, stats.seconds - stats.prefill_s - stats.verify_s)
            stats.draft_idle_s = max(0.0, stats.seconds - stats.draft_s) if drafter else 0.0
            self._close_request(req, drafter)

    def _draft_usable(self, stats: Stats) -> bool:
        """Use the draft unless it died, or it hung and does not answer a short probe yet."""
        if self.draft is None:
            return False
        if self.draft_health == "suspect":
            seq = next(self._probes)
            try:
                self.draft.send(Heartbeat(seq, time.time()))
                self.draft.recv(lambda m: isinstance(m, Heartbeat) and m.seq == seq,
                                self.config.draft_probe_timeout_s, "draft_probe_timeout_s")
                log.warning("draft worker answers again; drafting resumes")
                self.draft_health = "ok"
            except WorkerError as e:
                self.draft_health = "dead" if isinstance(e, WorkerDied) else "suspect"
        if self.draft_health != "ok":
            stats.draft_fallback = True
            return False
        return True

    def _close_request(self, req: int, drafter) -> None:
        if drafter and drafter.alive:
            self.draft.send(Close(req))  # its reply is dropped as stale later: no need to wait
        try:
            self.target.send(Close(req))
        except Exception:  # the target may be gone; its error was raised already
            pass

    def _decode_stream(self, rounds: Iterator[list[int]]) -> Iterator[Chunk]:
        ids: list[int] = []
        shown = ""
        for new in rounds:
            ids.extend(new)
            text = self._decode(ids) or ""
            # Hold back a trailing partial character until the next token completes it.
            if text.endswith("\ufffd"):
                yield Chunk(new, "")
                continue
            yield Chunk(new, text[len(shown):])
            shown = text

    def _decode(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise TypeError(f"{what} needs a tokenizer and this target has none: pass token ids")


class _Drafter:
    """The coordinator's view of the draft worker for one request.

    ``synced`` counts the leading committed tokens the draft is known to hold; each request
    to the draft says so (``base_len``), and the draft rolls back whatever lies beyond.
    """

    def __init__(self, coord: Coordinator, req: int, prompt: list[int], stats: Stats):
        self.coord, self.req, self.stats = coord, req, stats
        self.client = coord.draft
        self.cfg = coord.config
        self.alive = True
        self.step = 0
        self.synced = len(prompt)
        self.ready: DraftProposal | None = None     # a proposal for the next root, if any
        self.bet: tuple[int, list[int]] | None = None  # (step, main-path tokens) of the overlapped draft
        self._guard(lambda: self.client.call(OpenRequest(req, prompt), Opened, self.cfg.draft_timeout_s,
                                             "draft_timeout_s"))

    def propose(self, committed: list[int], max_depth: int) -> tuple[list[int], list[int]]:
        if not self.alive or max_depth < 1:
            return [], []
        prop, self.ready = self.ready, None
        if prop is None:
            self.step += 1
            msg = DraftRequest(self.req, self.step, self.synced, committed[self.synced:],
                               self.cfg.depth, self.cfg.top_k, self.cfg.max_nodes)
            t0 = time.perf_counter()
            prop = self._guard(lambda: self._call(msg))
            if prop is None:
                return [], []
            self.stats.wire_s += max(0.0, time.perf_counter() - t0 - prop.seconds)
            self.synced = len(committed)
        self.stats.draft_s += prop.seconds
        return trim_depth(prop.tokens, prop.parents, max_depth)

    def speculate(self, committed: list[int], tokens: list[int], parents: list[int]) -> None:
        """Start drafting the next round, betting the main path is accepted in full."""
        if not self.alive or not tokens:
            return
        path = [tokens[i] for i in main_path(parents)]
        self.step += 1
        msg = DraftRequest(self.req, self.step, len(committed), path, self.cfg.depth, self.cfg.top_k,
                           self.cfg.max_nodes, guess_root=True)
        self._guard(lambda: self.client.send(msg))
        self.bet = (self.step, path)

    def settle(self, committed: list[int], res: VerifyResult, tokens, parents) -> None:
        """After a verification: keep the overlapped draft if the bet won, else resync."""
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
            log.warning("draft worker failed (%s); continuing with the target alone", e)
            if isinstance(e, WorkerDied):
                self.coord.draft_health = "dead"
            elif isinstance(e, WorkerTimeout):
                self.coord.draft_health = "suspect"
            self.alive = False
            self.stats.draft_fallback = True
            self.ready = self.bet = None
            return None


def trim_depth(tokens: list[int], parents: list[int], max_depth: int) -> tuple[list[int], list[int]]:
    """Drop nodes deeper than max_depth: tokens past the length limit cost verify time for nothing."""
    d = depths(parents)
    if not d or max(d) <= max_depth:
        return tokens, parents
    keep = [i for i in range(len(tokens)) if d[i] <= max_depth]
    index = {old: new for new, old in enumerate(keep)}
    return [tokens[i] for i in keep], [-1 if parents[i] < 0 else index[parents[i]] for i in keep]


def default_stop_ids(tokenizer) -> list[int]:
    """End-of-text and end-of-turn tokens: what the model's generation config usually lists."""
    if tokenizer is None:
        return []
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)
