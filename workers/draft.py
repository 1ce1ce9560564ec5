"""Draft worker: a small LM with the target's tokenizer proposes chains or top-k trees.

Run as its own process: ``python -m dovetail.workers.draft --bind ipc://... --model PATH``.
It keeps its own KV cache in step with the committed sequence: each DraftRequest says how
many tokens of what the draft already knows are still right (``base_len``) and what came
after; everything past that is rolled back by truncating cache positions.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from dovetail.system.cpus import format_cpus, pin_process, tune_gpu_worker
from dovetail.protocol import (
    Close, Closed, DraftProposal, DraftRequest, Handshake, OpenRequest, Opened,
)
from dovetail.models.loading import choose_dtype, dtype_name, load_tokenizer, tokenizer_hash
from dovetail.workers.draft_lm import DraftCache, DraftLM
from dovetail.workers.hf import CausalLM
from dovetail.models.options import DEFAULT_LLAMA_EXTRA_BUFFERS, check_llama_extra_buffers
from dovetail.workers.args import add_extra_buffers_flag
from dovetail.workers.llama_buffers import decide
from dovetail.workers.serve import (
    RequestError, WorkerConfig, parse_config, serve, setup_logging, worker_parser,
)

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

    def __post_init__(self):
        super().__post_init__()
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


@dataclass
class DraftHandler:
    lm: DraftLM
    config: DraftConfig
    tok_hash: str
    role: str = "draft"
    states: dict[int, DraftState] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def handshake(self) -> Handshake:
        return Handshake(role="draft", vocab_size=self.lm.vocab_size, tokenizer_hash=self.tok_hash,
                         hidden_size=self.lm.hidden_size, dtype=dtype_name(self.lm.dtype),
                         feature_codec="fp16", model=self.lm.name, device=self.lm.device, pid=os.getpid(), open_requests=len(self.states))

    def handle(self, msg):
        return dispatch_draft(self, msg, self.config.max_requests,
                              lambda m: DraftState(list(m.prompt), self.lm.new_cache()),
                              release=self.lm.release)

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


def gate_score(min_prob: float) -> float:
    """The lowest path log-probability a gated tree keeps."""
    return math.log(min_prob) if min_prob > 0 else -math.inf


def wire_scores(scores: list[float]) -> list[float]:
    """Path log-probabilities as the protocol takes them: finite and <= 0."""
    return [min(0.0, max(float(s), -1e4)) for s in scores]


def dispatch_draft(handler, msg, max_requests: int, new_state, release=None):
    """The message handling every draft-side worker shares (draft, feature draft, replay):
    open a state per request (at most ``max_requests``), draft, close."""
    if isinstance(msg, OpenRequest):
        if len(handler.states) >= max_requests and msg.req_id not in handler.states:
            raise RequestError(msg.req_id, "busy", f"{len(handler.states)} requests open (max_requests)")
        handler.states[msg.req_id] = new_state(msg)
        return Opened(req_id=msg.req_id, cache_len=0)
    if isinstance(msg, DraftRequest):
        return handler.draft(msg)
    if isinstance(msg, Close):
        st = handler.states.pop(msg.req_id, None)
        if st is not None and release is not None:
            release(st.cache)
        return Closed(req_id=msg.req_id)
    raise RequestError(getattr(msg, "req_id", -1), "unexpected",
                       f"a draft worker does not take {type(msg).__name__}")


def apply_request(states: dict, msg: DraftRequest):
    """Check a DraftRequest against its request's state and apply base_len + new_tokens.

    Everything the draft knew past ``base_len`` is wrong now (rejected drafts, a lost
    bet), so ``cached`` is clamped there too: the caller's next forward recomputes it.
    """
    st = states.get(msg.req_id)
    if st is None:
        raise RequestError(msg.req_id, "unknown_request", f"request {msg.req_id} is not open")
    if msg.step <= st.step:
        raise RequestError(msg.req_id, "stale_step", f"draft step {msg.step} after step {st.step}")
    if msg.base_len > len(st.known):
        raise RequestError(msg.req_id, "bad_request", f"base_len {msg.base_len} > {len(st.known)} known tokens")
    if msg.base_len + len(msg.new_tokens) == 0:
        raise RequestError(msg.req_id, "bad_request", "nothing to draft from")
    st.step = msg.step
    st.known = st.known[:msg.base_len] + list(msg.new_tokens)
    st.cached = min(st.cached, msg.base_len)
    return st


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


def expand_level(logits: torch.Tensor, frontier: list[int], tok: list[int], par: list[int], score: list[float],
                 top_k: int, column_ids: torch.Tensor | None = None,
                 min_score: float = -math.inf) -> list[tuple[int, int]]:
    """One level of EAGLE-2 growth: of the top_k children of every frontier node, keep the
    top_k by path score (cumulative log-probability), none below ``min_score`` (the gate).
    Appends them to tok/par/score and returns (new node, frontier row) pairs.
    ``column_ids`` maps logit columns to token ids (a reduced draft vocabulary); scores are
    summed on the CPU, whatever the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logp.shape[-1])
    top_lp, top_cols = logp.topk(k, dim=-1)
    top_ids = top_cols if column_ids is None else column_ids[top_cols]
    parent_scores = torch.tensor([0.0 if f < 0 else score[f] for f in frontier])[:, None]
    cand = (parent_scores + top_lp.cpu()).flatten()
    out = []
    for b in cand.topk(min(top_k, cand.numel())).indices.tolist():
        if float(cand[b]) < min_score:
            break  # best first: the rest are below the gate too
        r, c = divmod(b, k)
        par.append(frontier[r])
        tok.append(int(top_ids[r, c]))
        score.append(float(cand[b]))
        out.append((len(tok) - 1, r))
    return out


def forward_nodes(lm: DraftLM, cache: DraftCache, start: int, tok, par, new) -> torch.Tensor:
    assert new[0] == cache.get_seq_length() - start, "tree nodes enter the cache in creation order"
    allowed, positions = node_mask(start, tok, par, new)
    return lm.forward_masked(cache, [tok[n] for n in new], positions, allowed).logits


def node_mask(start: int, tok, par, new) -> tuple[torch.Tensor, list[int]]:
    """Visibility [len(new), cache + new] and positions of a tree level about to be forwarded.

    Each new node sees the ``start`` committed cache entries plus its own ancestors, which
    sit in the cache in creation order; a node at depth d has position start - 1 + d.
    """
    total = start + new[-1] + 1
    allowed = torch.zeros(len(new), total, dtype=torch.bool)
    allowed[:, :start] = True
    depth = []
    for row, node in enumerate(new):
        d, a = 0, node
        while a >= 0:
            allowed[row, start + a] = True
            a, d = par[a], d + 1
        depth.append(d)
    return allowed, [start - 1 + d for d in depth]


def select_nodes(tok, par, score, max_nodes) -> tuple[list[int], list[int], list[float]]:
    """The max_nodes best nodes by path score: (tokens, parents, path scores), breadth first."""
    # Sorting by (-score, creation order) puts every parent before its children: a child's
    # path score is its parent's plus a log-probability <= 0, and it was created later.
    keep = sorted(range(len(tok)), key=lambda i: (-score[i], i))[:max_nodes]
    kept = set(keep)
    keep = [i for i in keep if par[i] < 0 or par[i] in kept]
    kids: dict[int, list[int]] = {}
    for i in keep:
        kids.setdefault(par[i], []).append(i)  # already in score order
    order: list[int] = []
    queue = list(kids.get(-1, []))
    while queue:  # breadth first: parents before children, best sibling first
        i = queue.pop(0)
        order.append(i)
        queue.extend(kids.get(i, []))
    index = {old: new for new, old in enumerate(order)}
    return [tok[i] for i in order], [-1 if par[i] < 0 else index[par[i]] for i in order], [score[i] for i in order]


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
    return p


def place_draft(device: str, cpus: list[int] | None, role: str = "draft") -> str:
    """Set this process up for a draft on ``device`` and return where it runs: pinned to
    ``cpus`` on the CPU (also when CUDA is missing), or tuned for a GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("no CUDA device is available: the %s runs on the CPU", role)
        device = "cpu"
    if device == "cpu":
        pinned = pin_process(cpus)
        log.info("%s on the CPU (CPUs %s, %d threads)", role, format_cpus(pinned), torch.get_num_threads())
    else:
        tune_gpu_worker()
        log.info("%s on %s (%s)", role, device, torch.cuda.get_device_name(torch.device(device)))
    return device


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
        from dovetail.workers.llama_draft import LlamaDraftLM
        threads = len(pin_process(cfg.cpus))
        # Extra buffer types crash on some CPUs: decided once per machine, in a child process.
        extra = decide(cfg.llama_extra_buffers, cfg.model, threads)
        lm = LlamaDraftLM(cfg.model, threads=threads, n_seqs=cfg.max_requests + 1, extra_buffers=extra.extra_buffers)
        tok_hash, release = lm.tokenizer_hash, lm.close
    else:
        lm = load_draft_model(cfg.model, cfg.device, cfg.dtype, cfg.layers, cfg.cpus)
        tok_hash, release = tokenizer_hash(load_tokenizer(cfg.model), lm.vocab_size), None
    serve(cfg.bind, DraftHandler(lm, cfg, tok_hash), parent_pid=cfg.parent_pid, keys=cfg.keys,
          heartbeat_timeout=cfg.heartbeat_timeout, parent_death_signal=cfg.parent_death_signal, release=release)

if __name__ == "__main__":
    main()
