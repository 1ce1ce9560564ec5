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
from dovetail.spec.picker import Picker
from dovetail.spec.sampling import History, Processing, TokenLogprobs
from dovetail.spec.verify import accept_path
from dovetail.workers.backend import ContextFull, HFBackend, TargetBackend
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

    @property
    def vocab_size(self) -> int:
        return self.backend.identity.vocab_size

    @property
    def max_batch_rows(self) -> int:
        return self.config.batch_rows if self.batch_bound is None else self.batch_bound

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
                self.backend.release(seq.cache)
            job = self.prefilling.get((peer, msg.req_id))
            if job is not None:  # cancelled mid-prefill: it stops before its next chunk
                job.abort()
            return Closed(req_id=msg.req_id)
        raise RequestError(getattr(msg, "req_id", -1), "unexpected", f"a target worker does not take {type(msg).__name__}")

    def drop_peer(self, peer: bytes) -> int:
        """Close every request ``peer`` left open (its session ended); how many there were."""
        keys = [key for key in self.sequences if key[0] == peer]
        for key in keys:
            self.backend.release(self.sequences.pop(key).cache)
        jobs = [job for key, job in self.prefilling.items() if key[0] == peer]
        for job in jobs:
            job.abort()
        return len(keys) + len(jobs)

    def open(self, msg: OpenRequest, key: tuple[bytes, int]) -> Opened:
        """The whole prefill at once (what serve() does chunk by chunk through begin_open)."""
        job = self.begin_open(msg, key[0])
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
        # The last prompt token stays pending: it is the root of the first verification.
        seq = Sequence(self.backend.new_sequence(), msg.prompt[-1], proc, History(msg.prompt), msg.seed,
                       features=msg.features)
        job = Prefill(self, key, msg, seq)
        self.prefilling[key] = job
        return job

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
            out = self.backend.verify(seq.cache, msg.root, msg.tokens, msg.parents, hidden=seq.features)
            return self._commit(seq, msg, out, start, t0)
        except BaseException:
            self.backend.rollback(seq.cache, start)  # a failed step leaves the sequence as it was
            raise

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
        if len(ready) > 1:
            t0 = time.perf_counter()
            seqs = [seq for _, _, seq in ready]
            starts = [self.backend.length(seq.cache) for seq in seqs]
            try:
                outs = self.backend.verify_many([seq.cache for seq in seqs], [m.root for _, m, _ in ready],
                                                [(m.tokens, m.parents) for _, m, _ in ready],
                                                [seq.features for seq in seqs])
            except Exception:
                log.warning("a batched verify of %d requests failed; verifying them one by one", len(ready),
                            exc_info=True)
            else:
                for (i, msg, seq), out, start in zip(ready, outs, starts):
                    try:
                        replies[i] = self._commit(seq, msg, out, start, t0)
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

    def _commit(self, seq: Sequence, msg: VerifyRequest, out, start: int, t0: float) -> VerifyResult:
        """Accept a path of the verified tree, keep its rows, and say what was committed."""
        picker = Picker(out.logits, seq.proc, seq.history, seq.seed, root_position=start)
        path, nxt = accept_path(msg.tokens, msg.parents, picker.pick)
        rows = [0] + [c + 1 for c in path]
        self.backend.keep(seq.cache, start, rows)
        committed = [msg.tokens[c] for c in path] + [nxt]
        seq.history.commit(committed)
        seq.pending, seq.step = nxt, seq.step + 1
        feats = (encode_features(out.hidden[rows], self.config.feature_codec)
                 if seq.features and out.hidden is not None else None)
        logprobs, top_ids, top_logprobs = flat_logprobs([picker.logprobs[r] for r in rows]
                                                        if seq.proc.logprobs >= 0 else [])
        return VerifyResult(req_id=msg.req_id, step=msg.step, accepted=path, tokens=committed,
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

    def __init__(self, handler: TargetHandler, key: tuple[bytes, int], msg: OpenRequest, seq: Sequence):
        self.handler, self.key, self.msg, self.seq = handler, key, msg, seq
        self.req_id = msg.req_id
        self.done_tokens = 0
        self.hidden: list[torch.Tensor] = []
        self.seconds = 0.0
        self.aborted = False

    def step(self) -> Opened | None:
        """Prefill the next chunk; the Opened reply once the prompt is all in (None before)."""
        if self.aborted:
            raise RequestError(self.req_id, "closed", f"request {self.req_id} was closed during its prefill")
        h, backend = self.handler, self.handler.backend
        todo = self.msg.prompt[:-1]
        n = h.chunk_tokens()
        chunk = todo[self.done_tokens:self.done_tokens + n]
        t0 = time.perf_counter()
        try:
            if chunk:
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
        return Opened(req_id=self.req_id, cache_len=backend.length(self.seq.cache), features=feats,
                      seconds=self.seconds)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.handler._end_prefill(self)
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
    p.add_argument("--sessions", action="store_true",
                   help="serve coordinator sessions one after another and several at once, until SIGTERM or "
                        "SIGINT: a client's Shutdown, or its silence for --heartbeat-timeout, closes only its "
                        "own requests (dovetail-launch --role target)")
    return p


def load_backend(cfg: TargetConfig, pinned: list[int], where: str, probe_child=decode_probe) -> TargetBackend:
    """``probe_child``: the entry point of the extra-buffer probe's child (llama_buffers.py)."""
    if cfg.backend == "llama.cpp":
        from dovetail.workers.llama import SCRATCH_SEQS, LlamaBackend, import_llama
        import_llama()  # a missing library says so before any probe
        # torch only does bookkeeping on a few rows of logits here, and its OpenMP runtime is
        # not llama.cpp's: after each op its threads spin on the cores llama.cpp's threads
        # need (OMP_WAIT_POLICY=ACTIVE: 33 -> 70 ms per 1.5B step on 2 cores). One thread.
        torch.set_num_threads(1)
        # Extra buffer types crash on some CPUs: decided once per machine, in a child process.
        extra = decide(cfg.llama_extra_buffers, cfg.model, len(pinned), child=probe_child)
        return LlamaBackend(cfg.model, threads=len(pinned), n_ctx=cfg.ctx,
                            n_seqs=cfg.max_requests + SCRATCH_SEQS, device_label=where,
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
          release=backend.close, sessions=cfg.sessions)


if __name__ == "__main__":
    main()
