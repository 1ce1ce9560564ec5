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
from typing import Iterator

from dovetail.runtime.client import WorkerClient, WorkerDied, WorkerError
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.drafter import Drafter
from dovetail.protocol import Close, Handshake, Heartbeat, OpenRequest, Opened, VerifyRequest, VerifyResult
from dovetail.runtime.requests import Admission, Request
from dovetail.runtime.results import Chunk, GenerationResult, Stats

log = logging.getLogger("dovetail")


class Coordinator:
    def __init__(self, target: WorkerClient, draft: WorkerClient | None, hs_target: Handshake,
                 hs_draft: Handshake | None, tokenizer, config: CoordinatorConfig, *, overlap: bool,
                 context=None, run_dir=None, liveness=None):
        self.target, self.draft = target, draft
        self.target_info, self.draft_info = hs_target, hs_draft
        self.tokenizer, self.config, self.overlap = tokenizer, config, overlap
        self._ctx, self._run_dir = context, run_dir
        self._liveness = liveness  # heartbeats to the workers (dovetail/runtime/liveness.py), stopped in close()
        self._ids = itertools.count(1)
        self._admission = Admission(config.max_active, config.max_pending, config.queue_timeout_s)
        self._closed = False
        # "ok", "suspect" (timed out: probed before each request until it answers) or "dead".
        self.draft_health = "ok" if draft is not None else "dead"
        self._probes = itertools.count(1)
        self.stop_token_ids = set(config.stop_token_ids if config.stop_token_ids is not None
                                  else default_stop_ids(tokenizer))
        self.sizer = make_sizer(config, hs_target, overlap) if draft is not None else None

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
        prompt_ids, seed = self._check_request(prompt, max_new_tokens, temperature, top_p, seed)
        stats = stats if stats is not None else Stats()
        self._admission.admit()
        try:
            with self._admission.slot():
                yield from self._decode_stream(self._rounds(prompt_ids, max_new_tokens, temperature, top_p,
                                                            seed, stats))
        finally:
            self._admission.leave()

    def submit(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, on_event=None) -> Request:
        """Start a request in the background and return its handle at once.

        Raises CoordinatorBusy right away when max_pending requests are in flight. See
        :class:`dovetail.runtime.requests.Request` for streaming, results, events and cancelling.
        """
        prompt_ids, seed = self._check_request(prompt, max_new_tokens, temperature, top_p, seed)
        handle = Request(on_event)
        self._admission.admit()
        args = (handle, prompt_ids, max_new_tokens, temperature, top_p, seed)
        threading.Thread(target=self._serve, args=args, name="dovetail-request", daemon=True).start()
        return handle

    def _serve(self, handle: Request, prompt_ids, max_new, temperature, top_p, seed) -> None:
        try:
            with self._admission.slot():
                if not handle.cancelled:
                    rounds = self._rounds(prompt_ids, max_new, temperature, top_p, seed, handle.stats,
                                          cancel=handle._cancel)
                    for chunk in self._decode_stream(rounds):
                        handle.emit_chunk(chunk)
            result = GenerationResult(list(handle.token_ids), self._decode(handle.token_ids), handle.stats)
            handle.finish("cancelled" if handle.cancelled and handle.stats.finish_reason in ("", "cancelled")
                          else "done", result)
        except BaseException as e:  # the request's one terminal event
            handle.finish("error", e)
        finally:
            self._admission.leave()

    def _check_request(self, prompt, max_new_tokens, temperature, top_p, seed) -> tuple[list[int], int]:
        if self._closed:
            raise RuntimeError("the coordinator is closed")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        seed = int(time.time_ns() % (1 << 31)) if seed is None else seed
        return self.encode_prompt(prompt), seed

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished."""
        return self._admission.in_flight

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
        if self._liveness is not None:
            self._liveness.stop()  # first: workers leaving on Shutdown are not "unresponsive"
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
                stats: Stats, cancel: threading.Event | None = None) -> Iterator[list[int]]:
        cfg = self.config
        req = next(self._ids)
        t_start = time.perf_counter()
        stats.prompt_tokens = len(prompt)
        # Hidden states travel only to a draft that reads them (its handshake says so).
        features = bool(self.draft_info is not None and self.draft_info.features)
        opened = self.target.call(OpenRequest(req, prompt, temperature, top_p, seed, features), Opened,
                                  cfg.prefill_timeout_s, "prefill_timeout_s")
        stats.prefill_s = opened.seconds
        drafter = Drafter(self, req, prompt, stats, opened.features) if self._draft_usable(stats) else None
        committed = list(prompt)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                budget = max_new - stats.new_tokens
                tokens, parents = drafter.propose(committed, budget - 1) if drafter else ([], [])
                t0 = time.perf_counter()
                self.target.send(VerifyRequest(req, stats.rounds, committed[-1], tokens, parents))
                if drafter and self.overlap:
                    drafter.speculate(committed, tokens, parents)
                res = self.target.recv(
                    lambda m: isinstance(m, VerifyResult) and m.req_id == req and m.step == stats.rounds,
                    cfg.verify_timeout_s, "verify_timeout_s", req)
                wire = max(0.0, time.perf_counter() - t0 - res.seconds)
                stats.wire_s += wire
                stats.verify_s += res.seconds
                stats.rounds += 1
                stats.drafted += len(tokens)
                stats.accepted_drafts += len(res.accepted)
                stats.accepted += len(res.tokens)
                stats.accept_lengths.append(len(res.tokens))
                if drafter:
                    drafter.settle(committed, res, tokens, parents)
                    if self.sizer is not None:
                        self.sizer.observe(parents, len(res.accepted), drafter.last_draft_s, wire,
                                           drafter.last_synced)
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
            self.draft.send(Close(req))  # its reply is dropped on arrival: no need to wait
        try:
            self.target.send(Close(req))
        except Exception:  # the target may be gone; its error was raised already
            pass
        for client in (self.target, self.draft):
            if client is not None:
                client.close_mailbox(req)

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
            raise TypeError(f"{what} needs a tokenizer and none is loaded (this target has none, or it is "
                            "remote and neither target= nor a draft gave one): pass token ids")


def make_sizer(config: CoordinatorConfig, hs_target: Handshake, overlap: bool):
    """A TreeSizer when auto sizing is on and the target measured its verify-cost curve."""
    from dovetail.runtime.autotree import TreeSizer
    if not config.auto_tree or not hs_target.verify_us:
        return None
    return TreeSizer(hs_target.verify_us, config.depth, config.top_k, config.max_nodes, overlap)


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
