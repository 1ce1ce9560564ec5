"""The coordinator: the library API and admission of requests.

A Coordinator owns the two worker clients and hands each admitted request to the round loop
(runtime/rounds.py), which drafts, verifies and commits; runtime/text.py turns prompts into
token ids and committed ids into streamed text; runtime/draft_health.py decides whether a
request may use the draft. Requests run in the caller's thread (generate, stream) or in
their own (submit), at most ``max_active`` at once (runtime/requests.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Iterator

from dovetail.protocol import Handshake
from dovetail.runtime.client import WorkerClient, WorkerError
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.kvpool import KVPool
from dovetail.runtime.requests import Admission, Request
from dovetail.runtime.results import Chunk, GenerationResult, Stats
from dovetail.runtime.rounds import RoundLoop
from dovetail.models.loading import default_stop_ids
from dovetail.runtime.text import Text, check_stop
from dovetail.spec.sampling import Processing

log = logging.getLogger("dovetail")


def _round_setting(name: str, doc: str) -> property:
    """A Coordinator attribute that lives in its RoundLoop: a change applies to the next request."""
    return property(lambda self: getattr(self.rounds, name), lambda self, value: setattr(self.rounds, name, value),
                    doc=doc)


class Coordinator:
    def __init__(self, target: WorkerClient, draft: WorkerClient | None, hs_target: Handshake,
                 hs_draft: Handshake | None, tokenizer, config: CoordinatorConfig, *, overlap: bool,
                 context=None, run_dir=None, liveness=None, suffix: bool = False):
        self.target = target
        self.target_info, self.draft_info = hs_target, hs_draft
        self.tokenizer = tokenizer
        self.text = Text(tokenizer, hs_target.vocab_size)
        stop_ids = set(config.stop_token_ids if config.stop_token_ids is not None else default_stop_ids(tokenizer))
        # A tokenizer may have ids past the model's rows (an added <|endoftext|>): never written, never a stop.
        stop_ids = {t for t in stop_ids if 0 <= t < hs_target.vocab_size}
        self.rounds = RoundLoop(target, draft, hs_target, hs_draft, config, overlap=overlap, stop_token_ids=stop_ids,
                                suffix=suffix)
        self._draft_client = draft  # shut down in close() even while rounds.draft is set aside
        self._ctx, self._run_dir = context, run_dir
        self._liveness = liveness  # heartbeats to the workers (runtime/liveness.py), stopped in close()
        self._admission = Admission(config.max_active, config.max_pending, config.queue_timeout_s)
        self._kv = KVPool(hs_target.kv_cells, config.queue_timeout_s)  # a llama.cpp target's shared cells
        self._closed = False

    config = _round_setting("config", "The CoordinatorConfig the next request runs with")
    overlap = _round_setting("overlap", "Whether the draft drafts round n+1 while the target verifies round n")
    sizer = _round_setting("sizer", "The TreeSizer that shapes drafts (None: the configured shape)")
    draft = _round_setting("draft", "The draft worker's client (None: target-only decoding)")
    suffix = _round_setting("suffix", "Whether the suffix draft runs (runtime/suffix_draft.py)")

    @property
    def stop_token_ids(self) -> set[int]:
        return self.rounds.stop_token_ids

    @property
    def draft_health(self) -> str:
        """"ok", "suspect" (timed out: probed before each request until it answers) or "dead"."""
        return self.rounds.health.state

    # ---- public API -------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop=None, *, scope: str = "",
                 **processing) -> GenerationResult:
        """The whole completion; ``processing``: as for stream()."""
        stats = Stats()
        ids: list[int] = []
        text: list[str] = []
        logprobs: list = []
        for chunk in self.stream(prompt, max_new_tokens, temperature, top_p, seed, stop, stats=stats, scope=scope,
                                 **processing):
            ids.extend(chunk.token_ids)
            text.append(chunk.text)
            logprobs.extend(chunk.logprobs or [])
        return GenerationResult(ids, self._text_of(text), stats,
                                logprobs if processing.get("logprobs") is not None else None)

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop=None, *, stats: Stats | None = None, scope: str = "",
               reserve: int | None = None, **processing) -> Iterator[Chunk]:
        """Yield committed tokens round by round, as the target verifies them.

        ``stop``: a string or a list; the text ends before the first one to appear (also
        across chunks), and the request with it. ``scope``: the suffix draft copies from the
        earlier outputs of requests with the same scope only (the server: one per API key).
        ``reserve``: output tokens to reserve KV cells for where the target's cells are shared
        (default: max_new_tokens); one that outgrows it ends with finish_reason "length" when
        the cells run out.

        ``processing`` (keywords, as OpenAI names them): ``presence_penalty``,
        ``frequency_penalty`` (on output tokens, in [-2, 2]), ``repetition_penalty`` (on prompt and
        output tokens, > 0), ``logit_bias`` ({token id: bias in [-100, 100]}), and ``logprobs``
        (k: each chunk carries each token's log-probability and the k most likely, up to 20), and
        ``grammar`` (structured output: ``("json_schema", schema)``, ``("json_object", None)``,
        ``("regex", pattern)``, ``("lark", text)`` or a Lark/GBNF text; the output follows it and
        ends with a stop token once it is complete, docs/structured-output.md).
        The target applies them at every position it verifies, each tree node with its own
        path's history: the output is exactly target-only decoding's under the same settings.
        A ``seed`` gives the same text with or without a draft (dovetail/spec/sampling.py).
        """
        prompt_ids, seed, stop, proc = self._check_request(prompt, max_new_tokens, temperature, top_p, seed, stop,
                                                           processing)
        need = self._kv_need(len(prompt_ids), max_new_tokens, reserve)
        stats = stats if stats is not None else Stats()
        self._admission.admit()
        try:
            with (self._admission.cancellable(threading.Event()) as cancel, self._kv.reserve(need, cancel) as room,
                  self._admission.slot(cancel)):
                if room and not cancel.is_set():
                    yield from self.text.chunks(self.rounds.run(prompt_ids, max_new_tokens, proc,
                                                                seed, stats, cancel=cancel, scope=scope),
                                                stop, stats)
        finally:
            self._admission.leave()

    def submit(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, on_event=None, stop=None, *, scope: str = "",
               reserve: int | None = None, **processing) -> Request:
        """Start a request in the background and return its handle at once.

        Raises CoordinatorBusy right away when max_pending requests are in flight. See
        :class:`dovetail.runtime.requests.Request` for streaming, results, events and cancelling.
        ``processing``: as for stream().
        """
        prompt_ids, seed, stop, proc = self._check_request(prompt, max_new_tokens, temperature, top_p, seed, stop,
                                                           processing)
        need = self._kv_need(len(prompt_ids), max_new_tokens, reserve)
        handle = Request(on_event)
        self._admission.admit()
        args = (handle, prompt_ids, max_new_tokens, proc, seed, stop, scope, need)
        threading.Thread(target=self._serve, args=args, name="dovetail-request", daemon=True).start()
        return handle

    def _serve(self, handle: Request, prompt_ids, max_new, proc, seed, stop, scope, need) -> None:
        text: list[str] = []
        logprobs: list = []
        try:
            with (self._admission.cancellable(handle._cancel), self._kv.reserve(need, handle._cancel) as room,
                  self._admission.slot(handle._cancel)):
                if room and not handle.cancelled:
                    rounds = self.rounds.run(prompt_ids, max_new, proc, seed, handle.stats,
                                             cancel=handle._cancel, scope=scope)
                    for chunk in self.text.chunks(rounds, stop, handle.stats):
                        text.append(chunk.text)
                        logprobs.extend(chunk.logprobs or [])
                        handle.emit_chunk(chunk)
            result = GenerationResult(list(handle.token_ids), self._text_of(text), handle.stats,
                                      logprobs if proc.logprobs >= 0 else None)
            handle.finish("cancelled" if handle.cancelled and handle.stats.finish_reason in ("", "cancelled")
                          else "done", result)
        except BaseException as e:  # the request's one terminal event
            handle.finish("error", e)
        finally:
            self._admission.leave()

    def _check_request(self, prompt, max_new_tokens, temperature, top_p, seed, stop, processing: dict
                       ) -> tuple[list[int], int, tuple[str, ...], Processing]:
        if self._closed:
            raise RuntimeError("the coordinator is closed")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        proc = make_processing(temperature, top_p, processing, self.target_info.vocab_size)
        if proc.grammar and not self.stop_token_ids:
            raise ValueError("a grammar needs stop tokens to end the output: set stop_token_ids (this model has "
                             "no eos token)")
        if seed is not None and not 0 <= seed < (1 << 64):
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        stop = check_stop(stop)
        if stop and self.tokenizer is None:
            raise TypeError("stop strings need a tokenizer and none is loaded: use stop_token_ids")
        # The wire carries int64: seeds past 2**63 fold onto smaller ones (as the server's do).
        seed = int(time.time_ns() % (1 << 31)) if seed is None else seed % (1 << 63)
        ids = self.encode_prompt(prompt)
        self._check_context(len(ids), max_new_tokens)
        return ids, seed, stop, proc

    def _kv_need(self, prompt_len: int, max_new_tokens: int, reserve: int | None) -> int:
        """KV cells a request reserves: its prompt, its output, and the rows of one draft tree
        (each row takes a cell while it is verified); checked against the whole pool now."""
        cfg = self.rounds.config
        tree_rows = 1 + max(cfg.max_nodes or 0, cfg.suffix_max_nodes if self.rounds.suffix else 0)
        out = max_new_tokens if reserve is None else min(reserve, max_new_tokens)
        # Near the end of the context the drafter's trees shrink to the room left (rounds.py),
        # so a request that fits the pool without a tree never needs more than the pool.
        need = min(prompt_len + out + tree_rows, max(self._kv.cells, prompt_len + out))
        self._kv.check(need)
        return need

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse before any work a request that cannot fit in the target's context."""
        limit = self.target_info.max_context
        if limit and prompt_len + max_new_tokens > limit:
            where = ("llama.cpp's context: raise llama_ctx / --llama-ctx, up to the model's trained context"
                     if "llama.cpp" in self.target_info.device else "the model's max_position_embeddings")
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                             f"{prompt_len + max_new_tokens} positions, more than the target's {limit} ({where}): "
                             "shorten the prompt or lower max_new_tokens")

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished."""
        return self._admission.in_flight

    def worker_requests(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Requests each worker holds open now, all its clients' (from a fresh handshake); a
        worker that does not answer within timeout_s is left out."""
        hello = Handshake(role="coordinator", vocab_size=0, tokenizer_hash="", hidden_size=0, dtype="",
                          feature_codec=self.rounds.config.feature_codec, pid=os.getpid())
        out = {}
        for role, client in (("target", self.target), ("draft", self._draft_client)):
            if client is None:
                continue
            try:
                out[role] = client.call(hello, Handshake, timeout_s, "worker_requests(timeout_s)").open_requests
            except WorkerError:
                pass
        return out

    @property
    def active(self) -> int:
        """Requests decoding now (the rest of in_flight wait for a slot)."""
        return self._admission.active

    def encode_prompt(self, prompt) -> list[int]:
        return self.text.encode_prompt(prompt)

    def _text_of(self, chunks: list[str]) -> str | None:
        return "".join(chunks) if self.tokenizer is not None else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Requests still running would see their sockets vanish: cancel them, and give them
        # close_timeout_s to finish the round in flight.
        if not self._admission.cancel_all(self.config.close_timeout_s):
            log.warning("close(): %d request(s) still running after close_timeout_s = %g s; closing anyway",
                        self._admission.in_flight, self.config.close_timeout_s)
        if self._liveness is not None:
            self._liveness.stop()  # first: workers leaving on Shutdown are not "unresponsive"
        clients = [c for c in (self._draft_client, self.target) if c is not None]
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
        return {"target": self.target.pid, "draft": self._draft_client.pid if self._draft_client else None}


PROCESSING = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "grammar")


def make_processing(temperature: float, top_p: float, options: dict, vocab_size: int) -> Processing:
    """The Processing of generate/stream/submit's keywords, refused with a clear error."""
    unknown = set(options) - set(PROCESSING)
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; the sampling options are {list(PROCESSING)}")
    bias = {int(k): float(v) for k, v in (options.get("logit_bias") or {}).items()}
    bad = [t for t in bias if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    logprobs = options.get("logprobs")
    return Processing(temperature, top_p, float(options.get("presence_penalty") or 0.0),
                      float(options.get("frequency_penalty") or 0.0),
                      float(1.0 if options.get("repetition_penalty") is None else options["repetition_penalty"]),
                      bias, -1 if logprobs is None else int(logprobs), grammar_of(options.get("grammar")))


def grammar_of(given) -> str:
    """llguidance's text of the ``grammar`` keyword: a (kind, spec) pair as spec/grammar.py's
    grammar_text takes it (("json_schema", {...}), ("regex", r"..."), ("json_object", None),
    ("lark" or "grammar", text)), or a Lark/GBNF text alone. ValueError naming what is wrong."""
    if given is None:
        return ""
    from dovetail.spec.grammar import grammar_text
    if isinstance(given, str):
        return grammar_text("grammar", given)
    if isinstance(given, (tuple, list)) and len(given) == 2 and isinstance(given[0], str):
        return grammar_text(given[0], given[1])
    raise TypeError("grammar must be a (kind, spec) pair, e.g. ('json_schema', {...}) or ('regex', r'...'), "
                    f"or a Lark/GBNF grammar text; got {type(given).__name__}")
