"""Draft worker: a small LM with the target's tokenizer proposes chains or top-k trees.

Run as its own process: ``python -m dovetail.workers.draft --bind ipc://... --model PATH``.
It keeps its own KV cache in step with the committed sequence: each DraftRequest says how
many tokens of what the draft already knows are still right (``base_len``) and what came
after; everything past that is rolled back by truncating cache positions.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from dovetail.system.cpus import pin_process
from dovetail.protocol import DraftProposal, DraftRequest, Handshake
from dovetail.models.loading import choose_dtype, dtype_name, load_tokenizer, tokenizer_hash
from dovetail.workers.draft_common import (
    apply_request, dispatch_draft, expand_level, gate_score, node_mask, place_draft, select_nodes, wire_scores,
)
from dovetail.workers.draft_lm import DraftCache, DraftLM
from dovetail.workers.hf import CausalLM
from dovetail.models.options import DEFAULT_LLAMA_EXTRA_BUFFERS, check_llama_extra_buffers
from dovetail.workers.args import add_extra_buffers_flag
from dovetail.workers.llama_buffers import decide
from dovetail.models.options import DEFAULT_PREFIX_CACHE_TOKENS
from dovetail.workers.prefix_cache import PrefixCache
from dovetail.workers.serve import WorkerConfig, parse_config, serve, setup_logging, worker_parser

log = logging.getLogger("dovetail.draft")


@dataclass
class DraftConfig(WorkerConfig):
    model: str | None = None
    device: str = "cpu"
    layers: int | None = None
    backend: str = "transformers"
    feature_draft: str | None = None  # a feature-draft checkpoint folder (instead of --model)
    target_model: str | None = None   # the target it drafts for: embedding, LM head, identity
    feature_codec: str = "fp16"       # must match the target's (checked at the handshake)
    quantize: str = "none"            # "int8": a feature draft's weights on the CPU (its speed, not the output)
    llama_extra_buffers: str = DEFAULT_LLAMA_EXTRA_BUFFERS  # a llama.cpp draft's buffers: auto | on | off (llama_buffers.py)
    prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS  # closed requests' draft KV kept for later prompts (0: off)

    def __post_init__(self):
        super().__post_init__()
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"--prefix-cache-tokens must be >= 0 (0: off), got {self.prefix_cache_tokens}")
        check_placement(self.device, self.layers)
        check_llama_extra_buffers(self.llama_extra_buffers, "--llama-extra-buffers")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"--quantize must be none or int8, got {self.quantize!r}")
        if self.quantize != "none" and (self.feature_draft is None or self.device != "cpu"):
            raise ValueError("--quantize int8 is for a feature draft on the CPU (--feature-draft, --device cpu)")
        if (self.model is None) == (self.feature_draft is None):
            raise ValueError("give either --model (a draft LM) or --feature-draft (with --target-model)")
        if self.feature_draft is not None and (self.target_model is None or self.layers
                                               or self.backend != "transformers"):
            raise ValueError("--feature-draft needs --target-model and takes no --layers or --backend")
        if self.backend not in ("transformers", "llama.cpp"):
            raise ValueError(f"--backend must be transformers or llama.cpp, got {self.backend!r}")
        if self.backend == "llama.cpp":
            if not str(self.model).endswith(".gguf") or self.device != "cpu" or self.layers:
                raise ValueError("a llama.cpp draft runs a whole .gguf model on the CPU "
                                 "(no --layers, --device cpu)")


def check_placement(device: str, layers: int | None) -> None:
    """Validation shared by every worker that runs a draft model (draft and replay)."""
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be 'cpu' or 'cuda:N', got {device!r}")
    if layers is not None and layers < 1:
        raise ValueError("--layers must be at least 1")


@dataclass
class DraftState:
    known: list[int]          # the sequence as the draft believes it (committed + guesses)
    cache: DraftCache
    cached: int = 0           # leading tokens of `known` whose KV in `cache` is valid
    step: int = -1
    scope: str = ""           # whose prefix cache its KV goes to when it closes


@dataclass
class DraftHandler:
    lm: DraftLM
    config: DraftConfig
    tok_hash: str
    role: str = "draft"
    states: dict[int, DraftState] = field(default_factory=dict)
    prefix_cache: PrefixCache | None = None  # closed requests' KV, as on the target (built from the config)

    def __post_init__(self):
        if self.prefix_cache is None:
            tokens = self.config.prefix_cache_tokens if hasattr(self.lm, "fork") else 0
            self.prefix_cache = PrefixCache(DraftCaches(self.lm), tokens)
        evicts = getattr(self.lm, "backend", None)  # a llama.cpp draft: its cells and ids go to live requests first
        if self.prefix_cache.enabled and evicts is not None:
            evicts.evict = self.prefix_cache.evict_one

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def handshake(self) -> Handshake:
        return Handshake(role="draft", vocab_size=self.lm.vocab_size, tokenizer_hash=self.tok_hash,
                         hidden_size=self.lm.hidden_size, dtype=dtype_name(self.lm.dtype),
                         feature_codec="fp16", model=self.lm.name, device=self.lm.device, pid=os.getpid(), open_requests=len(self.states))

    def handle(self, msg):
        return dispatch_draft(self, msg, self.config.max_requests, self._open, retire=self._retire)

    def _open(self, msg) -> DraftState:
        """A request's state, its KV from the longest cached prefix of the prompt when there is one:
        a chat's next turn or a shared system prompt starts drafting without reading it again."""
        cache, cached = self.prefix_cache.fork(msg.cache_scope, msg.prompt[:-1])
        if cache is None:
            cache = self.lm.new_cache()
        return DraftState(list(msg.prompt), cache, cached=cached, scope=msg.cache_scope)

    def _retire(self, st: DraftState) -> None:
        self.lm.crop(st.cache, st.cached)  # past `cached` the cache may hold guesses: never keep them
        self.prefix_cache.adopt(st.scope, st.cache, st.known[:st.cached])

    def draft(self, msg: DraftRequest) -> DraftProposal:
        t0 = time.perf_counter()
        st = apply_request(self.states, msg)
        # Keep one token unprocessed to get its logits.
        st.cached = min(st.cached, len(st.known) - 1)
        self.lm.crop(st.cache, st.cached)
        logits = self.lm.forward(st.cache, st.known[st.cached:], logit_rows=[-1]).logits[-1]
        st.cached = len(st.known)
        root_guess = -1
        if msg.guess_root:
            # Speculating a whole round ahead: the target's next token is unknown, so bet
            # on the draft's own favourite and draft from there.
            root_guess = int(logits.argmax())
            st.known.append(root_guess)
            logits = self.lm.forward(st.cache, [root_guess]).logits[-1]
            st.cached += 1
        tokens, parents, scores = grow_tree(self.lm, st.cache, logits, msg.depth, msg.top_k, msg.max_nodes,
                                            msg.min_prob)
        self.lm.crop(st.cache, st.cached)  # tree nodes are guesses: never keep them
        return DraftProposal(req_id=msg.req_id, step=msg.step, tokens=tokens, parents=parents,
                             root_guess=root_guess, seconds=time.perf_counter() - t0,
                             scores=wire_scores(scores))


class DraftCaches:
    """A draft LM's caches as PrefixCache drives a backend's sequences."""

    def __init__(self, lm: DraftLM):
        self.lm = lm
        self.shares_prefixes = bool(getattr(lm, "shares_prefixes", False))

    def length(self, cache) -> int:
        return cache.get_seq_length()

    def fork(self, cache, length: int):
        return self.lm.fork(cache, length)

    def release(self, cache) -> None:
        self.lm.release(cache)


def grow_tree(lm: DraftLM, cache: DraftCache, root_logits: torch.Tensor, depth: int, top_k: int,
              max_nodes: int, min_prob: float = 0.0) -> tuple[list[int], list[int], list[float]]:
    """Beam-style tree growth (EAGLE-2): expand the top_k best nodes per level by path score.

    Returns the max_nodes best nodes by cumulative log-probability (and those path scores),
    ordered so that parents come before children and every node's first child is its most
    likely one (so the first-child chain is a prefix of the draft's greedy continuation).
    """
    start = cache.get_seq_length()
    tok: list[int] = []
    par: list[int] = []
    score: list[float] = []
    frontier, frontier_logits = [-1], root_logits[None]
    for level in range(depth):
        new = [node for node, _ in expand_level(frontier_logits, frontier, tok, par, score, top_k,
                                                min_score=gate_score(min_prob))]
        if not new or level == depth - 1:
            break
        # Forward the new nodes: each sees the committed prefix plus its own ancestors.
        frontier = new
        frontier_logits = forward_nodes(lm, cache, start, tok, par, new)
    return select_nodes(tok, par, score, max_nodes)


def forward_nodes(lm: DraftLM, cache: DraftCache, start: int, tok, par, new) -> torch.Tensor:
    assert new[0] == cache.get_seq_length() - start, "tree nodes enter the cache in creation order"
    allowed, positions = node_mask(start, tok, par, new)
    return lm.forward_masked(cache, [tok[n] for n in new], positions, allowed).logits


def build_parser() -> argparse.ArgumentParser:
    p = worker_parser("draft", __doc__)
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (same tokenizer as the target)")
    p.add_argument("--feature-draft", default=None, metavar="CKPT_DIR",
                   help="a feature-draft checkpoint (dovetail-train) instead of --model: reads the target's hidden states")
    p.add_argument("--target-model", default=None,
                   help="with --feature-draft: the target's model folder or .gguf (embedding, LM head, identity)")
    p.add_argument("--feature-codec", default="fp16", choices=("fp16", "int8"),
                   help="with --feature-draft: the target's feature codec (must match)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda:N'")
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8 weights (and LM head) for a feature draft on the CPU: a faster draft step; "
                        "the draft's guesses may change, the output does not")
    p.add_argument("--layers", type=int, default=None, help="use only the first N decoder layers (a cheaper self-draft)")
    p.add_argument("--backend", default="transformers", choices=("transformers", "llama.cpp"),
                   help="transformers, or llama.cpp for a .gguf draft on the CPU (chains only)")
    add_extra_buffers_flag(p)
    p.add_argument("--prefix-cache-tokens", type=int, default=DEFAULT_PREFIX_CACHE_TOKENS, metavar="TOKENS",
                   help="keep closed requests' draft KV for later prompts that start the same way, up to this "
                        f"many tokens (default: {DEFAULT_PREFIX_CACHE_TOKENS}; 0: off)")
    return p


def load_draft_model(model: str, device: str, dtype: str, layers: int | None, cpus: list[int] | None,
                     role: str = "draft") -> CausalLM:
    """Place and load a draft model: on its GPU, or pinned on the CPU when there is none."""
    device = place_draft(device, cpus, role)
    t0 = time.perf_counter()
    lm = CausalLM.load(model, device=device, dtype=choose_dtype(dtype, device), num_layers=layers)
    log.info("loaded %s %s (%s, %d layers) in %.1f s", role, lm.name, lm.dtype, lm.config.num_hidden_layers,
             time.perf_counter() - t0)
    return lm


def main(argv=None) -> None:
    cfg = parse_config(DraftConfig, build_parser(), argv)
    setup_logging(cfg.log_level, "draft")
    if cfg.feature_draft is not None:
        from dovetail.workers.feature_draft import load_handler
        handler = load_handler(cfg)
        serve(cfg.bind, handler, parent_pid=cfg.parent_pid, keys=cfg.keys,
              heartbeat_timeout=cfg.heartbeat_timeout, parent_death_signal=cfg.parent_death_signal)
        return
    if cfg.backend == "llama.cpp":
        from dovetail.workers.llama import CACHE_SEQS
        from dovetail.workers.llama_draft import LlamaDraftLM
        threads = len(pin_process(cfg.cpus))
        # Extra buffer types crash on some CPUs: decided once per machine, in a child process.
        extra = decide(cfg.llama_extra_buffers, cfg.model, threads)
        lm = LlamaDraftLM(cfg.model, threads=threads, extra_buffers=extra.extra_buffers,
                          n_seqs=cfg.max_requests + 1 + (CACHE_SEQS if cfg.prefix_cache_tokens else 0))
        tok_hash, release = lm.tokenizer_hash, lm.close
    else:
        lm = load_draft_model(cfg.model, cfg.device, cfg.dtype, cfg.layers, cfg.cpus)
        tok_hash, release = tokenizer_hash(load_tokenizer(cfg.model), lm.vocab_size), None
    serve(cfg.bind, DraftHandler(lm, cfg, tok_hash), parent_pid=cfg.parent_pid, keys=cfg.keys,
          heartbeat_timeout=cfg.heartbeat_timeout, parent_death_signal=cfg.parent_death_signal, release=release)

if __name__ == "__main__":
    main()
