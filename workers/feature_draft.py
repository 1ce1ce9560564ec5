"""Draft worker side of a feature draft (DGF / EAGLE): target hidden states in, trees out.

Feature alignment (see also dovetail/runtime/drafter.py): the target's hidden state of committed
position p, f_p, is known once the target has processed token p, i.e. for every committed
position but the last (that token is pending on the target: the root of the next verify).
``DraftRequest.features`` therefore holds rows for committed positions
``[end - rows, end)`` with ``end = base_len + len(new_tokens) - 1``: they always end just
before the last committed token. Rows the draft already has are overwritten (they are
equal: committed features never change); a gap is refused.

The draft's own KV cache holds one entry per pair (f_t, x_{t+1}), t = 0 .. n-2 for n
committed tokens, at rotary position t. The last pair's output predicts token n (the
tree's first level); tree node at depth d sits at position n-2+d and takes its parent's
draft hidden state as its feature (EAGLE). Rolling back is cropping the pair cache.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dovetail.models.loading import dtype_name
from dovetail.protocol import DraftProposal, DraftRequest, Handshake, decode_features
from dovetail.workers.draft_common import (apply_request, dispatch_draft, expand_level, gate_score, node_mask,
                                           place_draft, select_nodes, wire_scores)
from dovetail.workers.hf import CausalLM
from dovetail.workers.serve import RequestError

log = logging.getLogger("dovetail.draft")


@dataclass
class FeatureState:
    known: list[int]                      # committed tokens as the draft last heard them
    cache: object                         # the pair cache (one entry per (f_t, x_{t+1}))
    feats: list[np.ndarray] = field(default_factory=list)  # f_0 .. f_{F-1}, committed positions
    cached: int = 0                       # pairs in `cache`
    step: int = -1


@dataclass
class FeatureDraftHandler:
    model: object            # dovetail.draft.model.FeatureDraft
    tok_hash: str
    feature_codec: str = "fp16"
    max_requests: int = 256
    name: str = "feature-draft"
    role: str = "draft"
    states: dict[int, FeatureState] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.model.config.target.vocab_size

    def handshake(self) -> Handshake:
        ident = self.model.config.target
        return Handshake(role="draft", vocab_size=ident.vocab_size, tokenizer_hash=self.tok_hash,
                         hidden_size=ident.hidden_size, dtype=dtype_name(self.model.dtype)
                         + ("+int8" if self.model.head is not None else ""),
                         feature_codec=self.feature_codec, model=self.name, device=str(self.model.device),
                         pid=os.getpid(), features=True, open_requests=len(self.states))

    def handle(self, msg):
        return dispatch_draft(self, msg, self.max_requests,
                              lambda m: FeatureState(list(m.prompt), self.model.new_cache()))

    @torch.inference_mode()
    def draft(self, msg: DraftRequest) -> DraftProposal:
        t0 = time.perf_counter()
        if msg.guess_root:
            # Betting on the next root needs the target's features of unverified tokens.
            raise RequestError(msg.req_id, "bad_request", "a feature draft does not draft ahead (guess_root)")
        st = apply_request(self.states, msg)
        n = len(st.known)
        add_features(st, msg, n, self.model.config.target.hidden_size)
        if n < 2:  # a one-token prompt: no pair to draft from until the target has run once
            return DraftProposal(req_id=msg.req_id, step=msg.step, tokens=[], parents=[],
                                 seconds=time.perf_counter() - t0)
        # Recompute at least the last pair: its output is the tree's root.
        st.cached = min(st.cached, n - 2)
        CausalLM.crop(st.cache, st.cached)
        f = torch.from_numpy(np.stack(st.feats[st.cached:n - 1]))
        ids = torch.tensor(st.known[st.cached + 1:n])
        # Logits of the last pair only: the head costs vocab x hidden per row.
        hidden, _ = self.model(f, ids, cache=st.cache, logits=False)
        st.cached = n - 1
        tokens, parents, scores = grow_feature_tree(self.model, st.cache, hidden[-1],
                                                    self.model.logits(hidden[-1]), msg.depth, msg.top_k,
                                                    msg.max_nodes, msg.min_prob)
        CausalLM.crop(st.cache, st.cached)  # tree nodes are guesses: never keep them
        return DraftProposal(req_id=msg.req_id, step=msg.step, tokens=tokens, parents=parents,
                             seconds=time.perf_counter() - t0, scores=wire_scores(scores))


def add_features(st: FeatureState, msg: DraftRequest, n: int, hidden_size: int) -> None:
    """Store the request's feature rows (positions [n-1-rows, n-1)); require f_0 .. f_{n-2}."""
    # f_p depends on tokens 0..p: rows from base_len on belong to tokens just rolled back,
    # and a pair (f_t, x_{t+1}) stays valid only while both are (t <= base_len - 2).
    del st.feats[min(n - 1, msg.base_len):]
    st.cached = min(st.cached, max(0, msg.base_len - 1))
    if msg.features is not None:
        rows = decode_features(msg.features)
        if rows.ndim != 2 or rows.shape[1] != hidden_size:
            raise RequestError(msg.req_id, "bad_request", f"features of shape {rows.shape} do not fit")
        start = n - 1 - rows.shape[0]
        if start < 0 or start > len(st.feats):
            raise RequestError(msg.req_id, "bad_request",
                               f"{rows.shape[0]} feature rows end at position {n - 1} but the draft holds "
                               f"{len(st.feats)}: they must continue them without a gap")
        st.feats[start:] = list(rows)
        st.cached = min(st.cached, start)  # pairs built on overwritten rows are redone
    if len(st.feats) != max(0, n - 1):
        raise RequestError(msg.req_id, "bad_request",
                           f"the draft holds features of {len(st.feats)} positions but {n} tokens are "
                           f"committed: the target's hidden states of positions 0..{n - 2} are needed")


def grow_feature_tree(model, cache, root_hidden: torch.Tensor, root_logits: torch.Tensor, depth: int,
                      top_k: int, max_nodes: int, min_prob: float = 0.0) -> tuple[list[int], list[int], list[float]]:
    """EAGLE-2 tree growth with a feature draft; same contract as draft.grow_tree.

    Each level expands the top_k nodes by cumulative log-probability (path score); a node's
    forward takes its parent's draft hidden state as the feature. The kept nodes are the
    max_nodes best by path score, parents before children (select_nodes).
    """
    start = cache.get_seq_length()
    tok: list[int] = []
    par: list[int] = []
    score: list[float] = []
    frontier, f_hidden, f_logits = [-1], root_hidden[None], root_logits[None]
    for level in range(depth):
        # logit columns -> target token ids (a reduced draft vocabulary)
        grown = expand_level(f_logits, frontier, tok, par, score, top_k, column_ids=model.vocab_ids,
                             min_score=gate_score(min_prob))
        new, rows = [node for node, _ in grown], [row for _, row in grown]
        if not new or level == depth - 1:
            break
        assert new[0] == cache.get_seq_length() - start, "tree nodes enter the cache in creation order"
        allowed, positions = node_mask(start, tok, par, new)
        frontier = new
        f_hidden, f_logits = model(f_hidden[rows], torch.tensor([tok[i] for i in new]),
                                   torch.tensor(positions), cache=cache, allowed=allowed)
    return select_nodes(tok, par, score, max_nodes)


def quantize_feature_draft(model) -> int:
    """int8 weights (one scale per output row) for every Linear of the fusion and the decoder
    layers, and for the LM head: on two cores a draft level then takes ~3 ms instead of ~5
    in bf16. Only the draft's guesses can change; verification keeps the output exact.
    Returns the number of matrices replaced."""
    from dovetail.workers.quant import Int8Linear, int8pack_works, linears_in, quantize_int8
    linears = linears_in(model.fusion, model.layers)
    for parent, name, linear in linears:
        setattr(parent, name, Int8Linear.from_linear(linear))
    q, scales = quantize_int8(model.head_weight)
    model.head = Int8Linear(q, scales.to(model.dtype), None, fast=int8pack_works(model.dtype))
    model.head_weight = model.head_weight[:0]  # the int8 copy replaces it: free the memory
    return len(linears) + 1


def load_handler(cfg) -> FeatureDraftHandler:
    """Load the checkpoint for cfg.target_model (refusing another target) and place it."""
    from dovetail.draft.checkpoint import load_feature_draft, load_target_pieces
    from dovetail.models.loading import choose_dtype
    device = place_draft(cfg.device, cfg.cpus, "feature draft")
    t0 = time.perf_counter()
    pieces = load_target_pieces(cfg.target_model)
    model = load_feature_draft(cfg.feature_draft, pieces, device=device, dtype=choose_dtype(cfg.dtype, device))
    if cfg.quantize == "int8":
        log.info("int8 weights for %d matrices of the feature draft", quantize_feature_draft(model))
    log.info("loaded feature draft %s (%s, %d layers, %s%s on %s) in %.1f s", cfg.feature_draft,
             model.config.kind, model.config.num_layers, model.dtype,
             "+int8" if cfg.quantize == "int8" else "", device, time.perf_counter() - t0)
    return FeatureDraftHandler(model, pieces.identity.tokenizer_hash, cfg.feature_codec, cfg.max_requests,
                               name=f"{os.path.basename(os.path.normpath(cfg.feature_draft))} ({model.config.kind})")
