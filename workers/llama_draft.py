"""A draft model on llama.cpp: a DraftLM (draft_lm.py) that grows chains.

A CPU draft shares the target's cores, so its step must be as cheap as the CPU allows:
llama.cpp runs the GGUF's own quantization (0.5B: ~12 ms a token on 2 cores, against
~100 ms in transformers bf16). It grows chains only (top_k 1): a tree would need the
sequence-id masking of the target backend at every level, and a CPU draft's best tree
measured narrow anyway.
"""
from __future__ import annotations

import torch

from dovetail.workers.hf import Forward
from dovetail.workers.llama import LlamaBackend, LlamaSeq

DRAFT_CTX = 8192


class LlamaDraftLM:
    """Implements DraftLM (draft_lm.py): each request's cache is one llama.cpp sequence id."""
    shares_prefixes = True  # fork(): the cached cells are shared (LlamaBackend.fork)

    def __init__(self, path: str, threads: int, n_seqs: int = 64, n_ctx: int = DRAFT_CTX,
                 extra_buffers: bool = True):
        self.backend = LlamaBackend(path, threads=threads, n_ctx=n_ctx, n_seqs=n_seqs, extra_buffers=extra_buffers)
        ident = self.backend.identity
        self.name, self.dtype = ident.model, ident.dtype
        self.device = f"cpu ({threads} threads, llama.cpp{'' if extra_buffers else ', plain buffers'})"
        self.vocab_size, self.hidden_size = ident.vocab_size, ident.hidden_size
        self.tokenizer_hash = ident.tokenizer_hash

    def new_cache(self) -> LlamaSeq:
        return self.backend.new_sequence()

    def release(self, cache: LlamaSeq) -> None:
        self.backend.release(cache)

    def fork(self, cache: LlamaSeq, length: int) -> LlamaSeq:
        return self.backend.fork(cache, length)

    def crop(self, cache: LlamaSeq, length: int) -> None:
        if length < cache.length:
            self.backend.rollback(cache, length)

    def forward(self, cache: LlamaSeq, tokens: list[int], row_parents: list[int] | None = None,
                logit_rows: list[int] | None = None) -> Forward:
        if row_parents is not None:
            raise ValueError("llama.cpp drafts grow chains: use top_k 1")
        rows = list(range(len(tokens))) if logit_rows is None else list(logit_rows)
        return Forward(logits=self.backend.decode_chain(cache, tokens, rows), hidden=None)

    def forward_masked(self, cache: LlamaSeq, tokens: list[int], positions: list[int],
                       allowed: torch.Tensor | None) -> Forward:
        # With top_k 1 every tree level is one node right after the cache: a plain step.
        if len(tokens) != 1 or positions[0] != cache.length:
            raise ValueError("llama.cpp drafts grow chains: use top_k 1")
        return self.forward(cache, tokens)

    def close(self) -> None:
        self.backend.close()
