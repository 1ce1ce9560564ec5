"""Target worker: the big model on the CPU. Prefills, verifies draft trees, keeps the KV.

Run as its own process: ``python -m dovetail.workers.target --bind ipc://... --model PATH``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from dovetail.models.options import (
    BACKENDS, DEFAULT_BATCH_ROWS, DEFAULT_LLAMA_CTX, DEFAULT_LLAMA_EXTRA_BUFFERS, MAX_BATCH_ROWS, QUANTIZE_CHOICES,
    check_batch_rows,
    check_llama_ctx,
    check_llama_extra_buffers,
)
from dovetail.system.cpus import describe_memory, format_cpus, memory_nodes, numa_nodes, pin_process
from dovetail.protocol import (
    FEATURE_CODECS, Close, Closed, Handshake, OpenRequest, Opened, VerifyRequest, VerifyResult,
    encode_features,
)
from dovetail.spec.grammar import DeadEnd, allowed_nodes, prune
from dovetail.spec.picker import Picker
from dovetail.spec.sampling import History, Processing, TokenLogprobs
from dovetail.spec.verify import accept_path
from dovetail.workers.backend import ContextFull, HFBackend, TargetBackend
from dovetail.workers.hf import Forward
from dovetail.models.options import DEFAULT_PREFIX_CACHE_TOKENS
from dovetail.workers.prefix_cache import PrefixCache, common_length
from dovetail.models.loading import choose_dtype
from dovetail.workers.args import add_extra_buffers_flag
from dovetail.workers.llama_buffers import decide, decode_probe
from dovetail.workers.quant import check_quantize
from dovetail.workers.serve import (
    RequestError, WorkerConfig, parse_config, serve, setup_logging, worker_parser,
)

log = logging.getLogger("dovetail.target")

# A long prompt is prefilled in chunks, the other requests' verifications between them: a
# stream waits at most about one chunk for its next round while another prompt goes in.
PREFILL_CHUNK_S = 0.5       # target time of one chunk
SOLO_CHUNK_S = 2.0          # ... while no other request is open: nobody's stream waits, and bigger chunks go
                            # faster (1.5B Q4_K, 2 cores: 132 tok/s in chunks of 64, 147 in chunks of 256)
DEFAULT_PREFILL_CHUNK = 128  # tokens per chunk before anything is measured
MIN_PREFILL_CHUNK = 16       # never fewer tokens a chunk: each chunk also reads all the weights
GRAMMAR_ERROR = "grammar"    # the error code of a grammar that fails on this model (runtime/rounds.py GRAMMAR)
GRAMMARS_KEPT = 16           # compiled grammars kept for the next request that sends the same one
MIN_SHARED = 16              # prompt tokens another open request must share before a prefill forks from it


@dataclass
class TargetConfig(WorkerConfig):
    model: str
    feature_codec: str = "fp16"
    backend: str = "transformers"
    ctx: int = DEFAULT_LLAMA_CTX  # llama.cpp only: KV cells shared by all open requests
    calibrate: bool = True  # measure (or read the cached) verify-cost curve at start-up
    quantize: str = "none"
    llama_extra_buffers: str = DEFAULT_LLAMA_EXTRA_BUFFERS  # auto | on | off (workers/llama_buffers.py)
    sessions: bool = False  # a server of many coordinators (workers/sessions.py), until SIGTERM/SIGINT
    batch_rows: int = DEFAULT_BATCH_ROWS  # most rows of several requests' verifications in one forward (1: none batched)
    prefill_chunk: int = 0  # prompt tokens per prefill chunk (0: what fits PREFILL_CHUNK_S, measured)
    prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS  # finished requests' KV kept for later prompts (0: off)
    prefix_cache_dir: str = ""  # the cache's entries saved here on the way out, loaded at start-up ("": not kept)

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "llama.cpp" and not str(self.model).endswith(".gguf"):
            raise ValueError(f"the llama.cpp backend needs a .gguf model, got {self.model}")
        check_llama_ctx(self.ctx, "--ctx")
        if self.backend == "llama.cpp" and self.quantize != "none":
            raise ValueError("--quantize is for the transformers backend; a GGUF keeps its own quantization")
        if self.feature_codec not in FEATURE_CODECS:
            raise ValueError(f"feature codec must be one of {FEATURE_CODECS}, got {self.feature_codec!r}")
        check_quantize(self.quantize)
        check_llama_extra_buffers(self.llama_extra_buffers, "--llama-extra-buffers")
        if self.max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        check_batch_rows(self.batch_rows, "--batch-rows")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"--prefix-cache-tokens must be >= 0 (0: off), got {self.prefix_cache_tokens}")
        if self.prefix_cache_dir and (self.backend != "llama.cpp" or not self.prefix_cache_tokens):
            raise ValueError("--prefix-cache-dir keeps the llama.cpp backend's prefix cache across restarts: it needs "
                             "--backend llama.cpp and a prefix cache (--prefix-cache-tokens > 0)")
        if not 0 <= self.prefill_chunk <= MAX_BATCH_ROWS:
            raise ValueError(f"--prefill-chunk must be in 0..{MAX_BATCH_ROWS} (0: sized by time), got {self.prefill_chunk}")


@dataclass
class Sequence:
    """One request: its KV cache and the committed token the target has not processed yet."""
    cache: object
    pending: int
    proc: Processing   # how the target's logits become its token at each position
    history: History   # the committed text as the penalties see it
    seed: int          # the draw at position p is uniform_at(seed, p): the same text with any draft
    features: bool = True  # send hidden states back (a feature draft reads them)
    step: int = 0
    grammar: object = None  # GrammarState after the committed text (spec/grammar.py), or None
    tokens: list[int] = field(default_factory=list)  # prompt + committed tokens: the cache holds a prefix of them
    # The root of the first verification (the prompt's last token) went into the cache with the prompt's
    # last chunk, in the same forward: its logits, until that verification uses them (Prefill.step).
    root_logits: torch.Tensor | None = None
    scope: str = ""         # whose prefix cache its KV goes to when it closes
    # A feature draft's request, with the prefix cache on: the hidden states of the positions the
    # cache holds, in order (the prompt's, then each round's accepted rows), kept with its entry.
    hidden: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TargetHandler:
    # A target may serve several coordinators at once (dovetail-launch --role target): each
    # request is keyed by the peer that sent it and its id, so ids never collide and a
    # coordinator can verify or close only its own requests.
    keys_by_peer: ClassVar[bool] = True
    backend: TargetBackend
    config: TargetConfig
    role: str = "target"
    sequences: dict[tuple[bytes, int], Sequence] = field(default_factory=dict)
    verify_us: list[int] = field(default_factory=list)  # cost of verifying k = 1, 2, ... tokens
    batch_verify_us: list[int] = field(default_factory=list)  # (requests, rows each, us) triples
    batch_bound: int | None = None  # rows one forward gathers, from the measured costs (None: --batch-rows)
    prefilling: dict[tuple[bytes, int], "Prefill"] = field(default_factory=dict)  # opened, prompt not all in
    prefill_us_per_token: float | None = None  # the last prefill chunk's cost per token
    grammars: dict = field(default_factory=dict)  # (grammar text, stop ids) -> Grammar, the last few
    prefix_cache: PrefixCache | None = None  # finished requests' KV for later prompts (built from the config)
    opened: int = 0  # requests begun: each prefill's turn in line (Prefill.order)

    def __post_init__(self):
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(self.backend, self.config.prefix_cache_tokens)
        if self.prefix_cache.enabled:
            self.backend.evict = self.prefix_cache.evict_one  # a live request's need comes first

    @property
    def vocab_size(self) -> int:
        return self.backend.identity.vocab_size

    @property
    def prefills_root(self) -> bool:
        """The backend can end a prefill with the first root's logits (prefill_logits)."""
        return type(self.backend).prefill_logits is not TargetBackend.prefill_logits

    @property
    def max_batch_rows(self) -> int:
        return self.config.batch_rows if self.batch_bound is None else self.batch_bound

    def worth_waiting(self, key: tuple[bytes, int], msg: VerifyRequest) -> bool:
        """Whether this verification may wait for others to share its forward: not when it
        needs none (its root went in with the prompt, no tree)."""
        seq = self.sequences.get(key)
        return seq is None or seq.root_logits is None or bool(msg.tokens)

    def is_open(self, key: tuple[bytes, int]) -> bool:
        """The request still decodes here (its next verification may come)."""
        return key in self.sequences

    def handshake(self) -> Handshake:
        ident = self.backend.identity
        return Handshake(role="target", vocab_size=ident.vocab_size, tokenizer_hash=ident.tokenizer_hash,
                         hidden_size=ident.hidden_size, dtype=ident.dtype,
                         feature_codec=self.config.feature_codec, model=ident.model,
                         device=ident.device, pid=os.getpid(), verify_us=list(self.verify_us),
                         batch_verify_us=list(self.batch_verify_us),
                         max_context=self.backend.max_context, open_requests=len(self.sequences) + len(self.prefilling),
                         kv_cells=self.backend.kv_cells)

    def handle(self, msg, peer: bytes = b""):
        try:
            if isinstance(msg, OpenRequest):
                return self.open(msg, (peer, msg.req_id))
            if isinstance(msg, VerifyRequest):
                return self.verify(msg, (peer, msg.req_id))
        except ContextFull as e:  # a refusal the coordinator can name, not a fault
            raise RequestError(msg.req_id, "context_full", str(e)) from e
        if isinstance(msg, Close):
            seq = self.sequences.pop((peer, msg.req_id), None)
            if seq is not None:
                self._retire(seq)
            job = self.prefilling.get((peer, msg.req_id))
            if job is not None:  # cancelled mid-prefill: it stops before its next chunk, its prefix kept
                job.abort(keep=True)
            return Closed(req_id=msg.req_id)
        raise RequestError(getattr(msg, "req_id", -1), "unexpected", f"a target worker does not take {type(msg).__name__}")

    def drop_peer(self, peer: bytes) -> int:
        """Close every request ``peer`` left open (its session ended); how many there were."""
        keys = [key for key in self.sequences if key[0] == peer]
        for key in keys:
            self._retire(self.sequences.pop(key))
        jobs = [job for key, job in self.prefilling.items() if key[0] == peer]
        for job in jobs:
            job.abort(keep=True)
        return len(keys) + len(jobs)

    def open(self, msg: OpenRequest, key: tuple[bytes, int]) -> Opened:
        """The whole prefill at once (what serve() does chunk by chunk through begin_open)."""
        job = self.begin_open(msg, key[0])
        job.may_wait = False
        while (reply := job.step()) is None:
            pass
        return reply

    def begin_open(self, msg: OpenRequest, peer: bytes = b"") -> "Prefill":
        """Start a request whose prompt serve() prefills one chunk at a time, running the other
        requests' verifications in between: a long prompt does not freeze every stream."""
        key = (peer, msg.req_id)
        if not msg.prompt:
            raise RequestError(msg.req_id, "bad_request", "the prompt is empty")
        if key in self.sequences or key in self.prefilling:
            raise RequestError(msg.req_id, "duplicate", f"request {msg.req_id} is already open")
        if len(self.sequences) + len(self.prefilling) >= self.config.max_requests:
            raise RequestError(msg.req_id, "busy", f"{len(self.sequences) + len(self.prefilling)} requests open "
                               "(max_requests)")
        try:
            proc = Processing(msg.temperature, msg.top_p, msg.presence_penalty, msg.frequency_penalty,
                              msg.repetition_penalty, dict(zip(msg.bias_ids, msg.bias_values)), msg.logprobs)
        except ValueError as e:
            raise RequestError(msg.req_id, "bad_request", str(e)) from None
        grammar = self._grammar(msg) if msg.grammar else None
        # The last prompt token stays pending: it is the root of the first verification.
        cache, reused, hidden = self._cached(msg)
        seq = Sequence(cache, msg.prompt[-1], proc, History(msg.prompt), msg.seed, features=msg.features,
                       grammar=grammar, tokens=list(msg.prompt), scope=msg.cache_scope,
                       hidden=[hidden] if hidden is not None else [])
        job = Prefill(self, key, msg, seq, reused)
        self.opened += 1
        job.order = self.opened
        self.prefilling[key] = job
        return job

    def _cached(self, msg: OpenRequest) -> tuple[object, int, torch.Tensor | None]:
        """A new sequence for the prompt: from the longest cached prefix of it (and that prefix's
        length), else empty. A feature draft's request needs the prompt's hidden states too: it
        starts from an entry that kept them (and gets them, the third item)."""
        if self.prefix_cache.enabled:
            if msg.features:
                return self._fork_or_new(*self.prefix_cache.fork_hidden(msg.cache_scope, msg.prompt[:-1]))
            return self._fork_or_new(*self.prefix_cache.fork(msg.cache_scope, msg.prompt[:-1]), None)
        return self.backend.new_sequence(), 0, None

    def _fork_or_new(self, cache, reused: int, hidden):
        return (cache, reused, hidden) if cache is not None else (self.backend.new_sequence(), 0, None)

    def _retire(self, seq: Sequence) -> None:
        """A closed request's KV becomes a prefix-cache entry (or is freed); a feature draft's
        request's hidden states go with it."""
        hidden = torch.cat(seq.hidden) if seq.hidden else None
        seq.hidden = []
        self.prefix_cache.adopt(seq.scope, seq.cache, seq.tokens, hidden=hidden)

    def _join(self, job: "Prefill") -> bool:
        """Share what other open requests of the job's scope already hold: requests sent together
        with one system prompt (an agent's parallel calls) prefill it once. True: wait, an
        earlier prefill is computing positions this one shares; else, where an open request
        holds a longer shared prefix than the job has, the job's sequence becomes a fork of it."""
        todo = job.msg.prompt[:-1]
        best, best_n = None, job.done_tokens + MIN_SHARED - 1
        for other in self.prefilling.values():
            if other is job or other.seq.scope != job.seq.scope:
                continue
            shared = common_length(other.msg.prompt[:-1], todo, 0)
            if job.may_wait and other.order < job.order and other.done_tokens < shared and shared > best_n:
                return True  # it computes them next: take them then
            n = min(shared, other.done_tokens)
            if n > best_n:
                best, best_n = other.seq, n
        for seq in self.sequences.values():
            if seq.scope == job.seq.scope:
                n = common_length(seq.tokens[:self.backend.length(seq.cache)], todo, 0)
                if n > best_n:
                    best, best_n = seq, n
        if best is not None:
            twin = self.backend.fork(best.cache, best_n)
            self.backend.release(job.seq.cache)  # what it held is a prefix of the fork
            job.seq.cache, job.done_tokens, job.reused = twin, best_n, best_n
        return False

    def _grammar(self, msg: OpenRequest):
        """A fresh GrammarState for the request's grammar; the compiled grammar is kept for the
        next request with the same one (agents send the same schema again and again)."""
        from dovetail.spec.grammar import Grammar
        key = (msg.grammar, tuple(msg.stop_ids))
        grammar = self.grammars.pop(key, None)
        if grammar is None:
            tokenizer = getattr(self.backend, "tokenizer", None)
            if tokenizer is None:
                raise RequestError(msg.req_id, "bad_request", "structured output needs the target's tokenizer, "
                                   "and this target has none")
            try:
                grammar = Grammar.load(msg.grammar.decode(), tokenizer, stop_ids=msg.stop_ids,
                                       vocab_size=self.vocab_size)
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(msg.req_id, GRAMMAR_ERROR, f"grammar: {e}") from None
        self.grammars[key] = grammar  # most recently used last
        while len(self.grammars) > GRAMMARS_KEPT:
            self.grammars.pop(next(iter(self.grammars)))
        state = grammar.start()
        if not state.mask().any():
            raise RequestError(msg.req_id, GRAMMAR_ERROR, "the grammar allows no token of this model's vocabulary "
                               "at the start of the output")
        return state

    def chunk_tokens(self) -> int:
        """Prompt tokens in the next prefill chunk: --prefill-chunk, or what fits PREFILL_CHUNK_S
        (SOLO_CHUNK_S while this prefill is the only open request) by the last chunk's measured
        speed (a chunk deep in a long prompt costs more than one near its start: attention
        grows), first by the verify-cost curve."""
        if self.config.prefill_chunk:
            return self.config.prefill_chunk
        if self.prefill_us_per_token is None and self.verify_us:
            k = len(self.verify_us)
            self.prefill_us_per_token = self.verify_us[-1] / k
        if not self.prefill_us_per_token:
            return DEFAULT_PREFILL_CHUNK
        solo = not self.sequences and len(self.prefilling) == 1
        n = int((SOLO_CHUNK_S if solo else PREFILL_CHUNK_S) * 1e6 / self.prefill_us_per_token)
        return max(MIN_PREFILL_CHUNK, min(MAX_BATCH_ROWS, n))

    def _end_prefill(self, job: "Prefill") -> None:
        self.prefilling.pop(job.key, None)

    def verify(self, msg: VerifyRequest, key: tuple[bytes, int]) -> VerifyResult:
        seq = self._ready(msg, key)
        t0 = time.perf_counter()
        start = self.backend.length(seq.cache)
        try:
            tree = self._tree(seq, msg)
            early = self._early_root(seq, tree)
            start = self.backend.length(seq.cache) - (early is not None)
            out = early if early is not None else self.backend.verify(seq.cache, msg.root, tree[0], tree[1],
                                                                      hidden=seq.features)
            return self._commit(seq, msg, out, start, t0, tree, in_cache=early is not None)
        except BaseException:
            self.backend.rollback(seq.cache, start)  # a failed step leaves the sequence as it was
            raise

    def _early_root(self, seq: Sequence, tree) -> Forward | None:
        """The first verification when its root went in with the prompt: with no draft beside it
        the root's logits are the whole forward (and the cache is right already); with a tree
        the root comes out again and goes in with the tree (None)."""
        logits, seq.root_logits = seq.root_logits, None
        if logits is None:
            return None
        if not tree[0]:
            return Forward(logits=logits[None], hidden=None)
        self.backend.rollback(seq.cache, self.backend.length(seq.cache) - 1)
        return None

    def verify_batch(self, items: list[tuple[bytes, VerifyRequest]]) -> list:
        """Several requests' verifications in one forward (backend.verify_many); a reply (or an
        Error) for each, in order. Each request is accepted and rolled back on its own, exactly
        as verify() does; a forward that fails is retried one request at a time, so that its
        error reaches the request it belongs to."""
        replies: list = [None] * len(items)
        ready = []
        for i, (peer, msg) in enumerate(items):
            try:
                ready.append((i, msg, self._ready(msg, (peer, msg.req_id))))
            except RequestError as e:
                replies[i] = e
        for i, msg, seq in [r for r in ready if r[2].root_logits is not None]:  # first rounds: mostly no forward
            ready.remove((i, msg, seq))
            try:
                replies[i] = self.handle(msg, items[i][0])
            except Exception as e:  # noqa: BLE001 (turned into this request's Error by serve())
                replies[i] = e
        if len(ready) > 1:
            t0 = time.perf_counter()
            seqs = [seq for _, _, seq in ready]
            starts = [self.backend.length(seq.cache) for seq in seqs]
            try:
                trees = [self._tree(seq, m) for _, m, seq in ready]
                outs = self.backend.verify_many([seq.cache for seq in seqs], [m.root for _, m, _ in ready],
                                                [(tokens, parents) for tokens, parents, _ in trees],
                                                [seq.features for seq in seqs])
            except Exception:
                log.warning("a batched verify of %d requests failed; verifying them one by one", len(ready),
                            exc_info=True)
            else:
                for (i, msg, seq), out, start, tree in zip(ready, outs, starts, trees):
                    try:
                        replies[i] = self._commit(seq, msg, out, start, t0, tree)
                    except Exception as e:  # noqa: BLE001 (this request's error, the others go on)
                        self.backend.rollback(seq.cache, start)
                        replies[i] = e
                ready = []
        for i, msg, _ in ready:
            try:
                replies[i] = self.handle(msg, items[i][0])
            except Exception as e:  # noqa: BLE001 (turned into this request's Error by serve())
                replies[i] = e
        return replies

    def _ready(self, msg: VerifyRequest, key: tuple[bytes, int]) -> Sequence:
        seq = self.sequences.get(key)
        if seq is None:
            raise RequestError(msg.req_id, "unknown_request", f"request {msg.req_id} is not open")
        if msg.step != seq.step:
            # A duplicated or stale verify must never advance the KV cache twice.
            raise RequestError(msg.req_id, "stale_step", f"verify step {msg.step} but the request is at step {seq.step}")
        if msg.root != seq.pending:
            raise RequestError(msg.req_id, "bad_root", f"root token {msg.root} is not the pending token {seq.pending}")
        return seq

    def _tree(self, seq: Sequence, msg: VerifyRequest) -> tuple[list[int], list[int], list[int] | None]:
        """The tree to verify: the draft's, without the nodes the request's grammar forbids after
        their path (they could never be accepted; rows spent on them are lost). (tokens,
        parents, kept): kept[j] the draft's index of node j, None when nothing was pruned."""
        if seq.grammar is None or not msg.tokens:
            return msg.tokens, msg.parents, None
        allowed = allowed_nodes(seq.grammar, msg.tokens, msg.parents)
        if all(allowed):
            return msg.tokens, msg.parents, None
        return prune(msg.tokens, msg.parents, allowed)

    def _commit(self, seq: Sequence, msg: VerifyRequest, out, start: int, t0: float,
                tree: tuple[list[int], list[int], list[int] | None], in_cache: bool = False) -> VerifyResult:
        """Accept a path of the verified tree, keep its rows, and say what was committed
        (``in_cache``: the root alone, already in the cache: nothing to keep)."""
        tokens, parents, kept = tree
        picker = Picker(out.logits, seq.proc, seq.history, seq.seed, root_position=start, grammar=seq.grammar)
        try:
            path, nxt = accept_path(tokens, parents, picker.pick)
        except DeadEnd as e:
            raise RequestError(msg.req_id, GRAMMAR_ERROR, str(e)) from None
        finally:
            picker.close()
        rows = [0] + [c + 1 for c in path]
        committed = [tokens[c] for c in path] + [nxt]
        if seq.grammar is not None:
            seq.grammar.advance(committed)  # ValueError and no change if a pick broke the grammar
        try:
            if not in_cache:
                self.backend.keep(seq.cache, start, rows)
        except BaseException:
            if seq.grammar is not None:
                seq.grammar.rollback(len(committed))
            raise
        seq.history.commit(committed)
        seq.tokens += committed
        seq.pending, seq.step = nxt, seq.step + 1
        row_hidden = out.hidden[rows] if seq.features and out.hidden is not None else None
        feats = encode_features(row_hidden, self.config.feature_codec) if row_hidden is not None else None
        if row_hidden is not None and self.prefix_cache.enabled:
            seq.hidden.append(row_hidden)  # for the prefix cache, when the request closes
        logprobs, top_ids, top_logprobs = flat_logprobs([picker.logprobs[r] for r in rows]
                                                        if seq.proc.logprobs >= 0 else [])
        accepted = path if kept is None else [kept[c] for c in path]  # the draft's own node indices
        return VerifyResult(req_id=msg.req_id, step=msg.step, accepted=accepted, tokens=committed,
                            cache_len=self.backend.length(seq.cache), features=feats,
                            seconds=time.perf_counter() - t0, logprobs=logprobs, top_ids=top_ids,
                            top_logprobs=top_logprobs)


def flat_logprobs(entries: list[TokenLogprobs]) -> tuple[list[float], list[int], list[float]]:
    """Each committed token's log-probability, and its top ones flat, as VerifyResult carries them."""
    return ([e.logprob for e in entries], [i for e in entries for i, _ in e.top],
            [v for e in entries for _, v in e.top])


class Prefill:
    """One request's prompt going into the KV cache a chunk at a time (TargetHandler.begin_open).

    serve() calls step() between other messages until it returns the Opened reply; a Close
    (or the client's session ending) aborts it, and its cache is freed at once.
    """

    def __init__(self, handler: TargetHandler, key: tuple[bytes, int], msg: OpenRequest, seq: Sequence,
                 reused: int = 0):
        self.handler, self.key, self.msg, self.seq = handler, key, msg, seq
        self.req_id = msg.req_id
        self.reused = reused     # prompt positions the sequence got from the prefix cache (or another request)
        self.done_tokens = reused
        self.order = 0           # begun after the jobs with lower numbers (it may wait for them, never they for it)
        self.may_wait = True     # for an earlier prefill of the same prefix (not when prefilled at once: open())
        self.hidden = seq.hidden  # the prompt's hidden states so far (a feature draft's request)
        self.seconds = 0.0
        self.aborted = False

    def step(self) -> Opened | None:
        """Prefill the next chunk; the Opened reply once the prompt is all in (None before)."""
        if self.aborted:
            raise RequestError(self.req_id, "closed", f"request {self.req_id} was closed during its prefill")
        h, backend = self.handler, self.handler.backend
        if h.prefix_cache.enabled and not self.seq.features and h._join(self):
            return None
        todo = self.msg.prompt[:-1]
        n = h.chunk_tokens()
        chunk = todo[self.done_tokens:self.done_tokens + n]
        # The last chunk takes the prompt's last token too, whose logits the first verification
        # needs: one forward fewer before the first token (not for a feature draft's request,
        # which wants the prompt's hidden states only).
        with_root = (self.done_tokens + len(chunk) == len(todo) and not self.seq.features
                     and len(chunk) < MAX_BATCH_ROWS and h.prefills_root)
        t0 = time.perf_counter()
        try:
            if with_root:
                self.seq.root_logits = backend.prefill_logits(self.seq.cache, chunk + [self.msg.prompt[-1]])
            elif chunk:
                out = backend.prefill(self.seq.cache, chunk, hidden=self.seq.features)
                if out is not None:
                    self.hidden.append(out)
        except BaseException:
            self.abort()
            raise
        spent = time.perf_counter() - t0
        self.seconds += spent
        if len(chunk) >= MIN_PREFILL_CHUNK:  # short chunks say little about the cost per token
            h.prefill_us_per_token = 1e6 * spent / len(chunk)
        self.done_tokens += len(chunk)
        if self.done_tokens < len(todo):
            return None
        h._end_prefill(self)
        h.sequences[self.key] = self.seq
        hidden = torch.cat(self.hidden) if self.hidden else None
        feats = encode_features(hidden, h.config.feature_codec) if hidden is not None else None
        self.seq.hidden = [hidden] if hidden is not None and h.prefix_cache.enabled else []
        held = backend.length(self.seq.cache) - (self.seq.root_logits is not None)  # the prompt but its root
        return Opened(req_id=self.req_id, cache_len=held, features=feats, seconds=self.seconds, reused=self.reused,
                      root_ready=self.seq.root_logits is not None)

    def abort(self, keep: bool = False) -> None:
        """Stop the prefill; ``keep``: what it prefilled becomes a prefix-cache entry (a client
        that cancels and retries, or resends the prompt, starts from there), else it is freed."""
        if not self.aborted:
            self.aborted = True
            self.handler._end_prefill(self)
            if keep:
                self.handler._retire(self.seq)
            else:
                self.handler.backend.release(self.seq.cache)


def build_parser() -> argparse.ArgumentParser:
    p = worker_parser("target", __doc__)
    p.add_argument("--model", required=True, help="Hugging Face model folder or .gguf file")
    p.add_argument("--feature-codec", default="fp16", choices=FEATURE_CODECS, help="how hidden states travel")
    p.add_argument("--backend", default="transformers", choices=BACKENDS,
                   help="transformers (HF folder or de-quantized GGUF) or llama.cpp (GGUF, native kernels)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip measuring the verify-cost curve at start-up (drafts then keep a fixed size)")
    p.add_argument("--ctx", type=int, default=DEFAULT_LLAMA_CTX,
                   help="llama.cpp only: KV cells shared by all open requests (prompt + output tokens)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="int8 / int4: weight-only int8 or 4-bit (groups of 32) decoder layers, a faster, "
                        "slightly different target; embeddings and LM head stay in --dtype (default: none)")
    add_extra_buffers_flag(p)
    p.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS,
                   help="verify the waiting requests together, up to this many rows in one forward "
                        f"(1: one request per forward; default: {DEFAULT_BATCH_ROWS})")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                   help="prefill prompts this many tokens at a time, verifying the other requests in between "
                        f"(default 0: as many as take about {PREFILL_CHUNK_S:g} s, measured as it goes)")
    p.add_argument("--prefix-cache-tokens", type=int, default=DEFAULT_PREFIX_CACHE_TOKENS, metavar="TOKENS",
                   help="keep finished requests' KV for later prompts that start the same way, up to this many "
                        f"tokens, least recently used first out (default: {DEFAULT_PREFIX_CACHE_TOKENS}; 0: off)")
    p.add_argument("--prefix-cache-dir", default="", metavar="DIR",
                   help="llama.cpp only: save the prefix cache's entries (KV and tokens) to DIR when the worker "
                        "stops and load them when it starts, so a long system prompt stays cached across restarts "
                        "(default: not kept)")
    p.add_argument("--sessions", action="store_true",
                   help="serve coordinator sessions one after another and several at once, until SIGTERM or "
                        "SIGINT: a client's Shutdown, or its silence for --heartbeat-timeout, closes only its "
                        "own requests (dovetail-launch --role target)")
    return p


def saved_identity(backend: TargetBackend) -> dict:
    """What a saved prefix cache must have been saved by: the model, its tokenizer, its weights'
    types, and the context's cells (a KV state loads only into a context like its own)."""
    ident = backend.identity
    return {"model": ident.model, "tokenizer_hash": ident.tokenizer_hash, "dtype": ident.dtype,
            "kv_cells": backend.kv_cells}


def load_backend(cfg: TargetConfig, pinned: list[int], where: str, probe_child=decode_probe) -> TargetBackend:
    """``probe_child``: the entry point of the extra-buffer probe's child (llama_buffers.py)."""
    if cfg.backend == "llama.cpp":
        from dovetail.workers.llama import CACHE_SEQS, SCRATCH_SEQS, LlamaBackend, import_llama
        import_llama()  # a missing library says so before any probe
        # torch only does bookkeeping on a few rows of logits here, and its OpenMP runtime is
        # not llama.cpp's: after each op its threads spin on the cores llama.cpp's threads
        # need (OMP_WAIT_POLICY=ACTIVE: 33 -> 70 ms per 1.5B step on 2 cores). One thread.
        torch.set_num_threads(1)
        # Extra buffer types crash on some CPUs: decided once per machine, in a child process.
        extra = decide(cfg.llama_extra_buffers, cfg.model, len(pinned), child=probe_child)
        return LlamaBackend(cfg.model, threads=len(pinned), n_ctx=cfg.ctx,
                            n_seqs=cfg.max_requests + SCRATCH_SEQS + (CACHE_SEQS if cfg.prefix_cache_tokens else 0),
                            device_label=where,
                            extra_buffers=extra.extra_buffers)
    return HFBackend(cfg.model, dtype=choose_dtype(cfg.dtype, "cpu"), device_label=where, quantize=cfg.quantize)


def main(argv=None) -> None:
    cfg = parse_config(TargetConfig, build_parser(), argv)
    setup_logging(cfg.log_level, "target")
    pinned = pin_process(cfg.cpus)
    nodes = numa_nodes(pinned)
    # The handshake carries this, so the coordinator (and the CLI) can show where we run.
    where = f"cpu {format_cpus(pinned)}, {torch.get_num_threads()} threads, NUMA node(s) " + \
        (",".join(map(str, nodes)) if nodes else "unknown")
    log.info("pinned to %s", where)
    t0 = time.perf_counter()
    backend = load_backend(cfg, pinned, where)
    log.info("loaded %s (%s, vocab %d, hidden %d) in %.1f s", backend.identity.model, backend.identity.dtype,
             backend.identity.vocab_size, backend.identity.hidden_size, time.perf_counter() - t0)
    # Pinned before loading, so the weights were first touched from the target's own CPUs and
    # the kernel placed them on their node; the handshake says where they really are (a GGUF
    # already in the page cache stays where an earlier process read it).
    backend.identity = replace(backend.identity, device=f"{backend.identity.device}, {describe_memory(memory_nodes())}")
    handler = TargetHandler(backend, cfg)
    if cfg.prefix_cache_dir:
        n = handler.prefix_cache.load(cfg.prefix_cache_dir, saved_identity(backend))
        log.info("prefix cache: %d entr%s loaded from %s", n, "y" if n == 1 else "ies", cfg.prefix_cache_dir)

    def release() -> None:
        if cfg.prefix_cache_dir:  # before the model goes: the entries' KV lives in its context
            try:
                n = handler.prefix_cache.save(cfg.prefix_cache_dir, saved_identity(backend))
                log.info("prefix cache: %d entr%s saved to %s", n, "y" if n == 1 else "ies", cfg.prefix_cache_dir)
            except OSError as e:
                log.warning("prefix cache: not saved to %s: %s", cfg.prefix_cache_dir, e)
        backend.close()

    def calibrate() -> None:  # on the compute thread, where every later forward runs (serve())
        from dovetail.workers.calibrate import BOUND_SLACK, batch_row_bound, curve_kind, load_or_measure
        handler.verify_us, handler.batch_verify_us = load_or_measure(
            backend, cfg.model, cfg.backend, curve_kind(backend), len(pinned), cfg.batch_rows)
        handler.batch_bound = batch_row_bound(handler.verify_us, handler.batch_verify_us, cfg.batch_rows)
        if cfg.batch_rows > 1:
            log.info("verifications of several requests share a forward up to %d rows (--batch-rows %d; the "
                     "measured cost per row is within %.0f%% of its best there)", handler.batch_bound, cfg.batch_rows,
                     100 * BOUND_SLACK)

    serve(cfg.bind, handler, parent_pid=cfg.parent_pid, keys=cfg.keys, heartbeat_timeout=cfg.heartbeat_timeout,
          parent_death_signal=cfg.parent_death_signal, warmup=calibrate if cfg.calibrate else None,
          release=release, sessions=cfg.sessions)


if __name__ == "__main__":
    main()
