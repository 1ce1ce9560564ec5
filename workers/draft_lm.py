"""What the draft worker needs of a draft language model, and of its KV cache.

DraftHandler, grow_tree and the replay draft drive any model through these members only:
CausalLM (transformers, trees) and LlamaDraftLM (llama.cpp, chains) both implement them.
tests/workers/test_draft_lm.py checks that both classes keep up with the Protocol.
"""
from __future__ import annotations

from typing import Protocol

import torch

from dovetail.workers.hf import Forward


class DraftCache(Protocol):
    """One request's KV cache: opaque to the draft worker but for its length."""

    def get_seq_length(self) -> int:
        """Number of positions the cache holds (transformers' name, which LlamaSeq takes too)."""


class DraftLM(Protocol):
    """A draft model as DraftHandler, grow_tree and ReplayHandler drive it."""

    @property
    def name(self) -> str:
        """The model's name, for the handshake and logs."""

    @property
    def dtype(self) -> torch.dtype | str:
        """The weights' type: a torch dtype, or the GGUF's quantization for llama.cpp."""

    @property
    def device(self) -> str:
        """Where it runs, as the handshake reports it; replay synchronizes one starting with "cuda"."""

    @property
    def vocab_size(self) -> int:
        """Number of logit columns: the target checks it against its own vocabulary."""

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden state, reported in the handshake."""

    def new_cache(self) -> DraftCache:
        """An empty KV cache for one request."""

    def release(self, cache: DraftCache) -> None:
        """The request is closed: free what ``cache`` holds beyond its Python object."""

    def crop(self, cache: DraftCache, length: int) -> None:
        """Truncate ``cache`` to ``length`` positions (rollback); no-op if it holds fewer."""

    def forward(self, cache: DraftCache, tokens: list[int], row_parents: list[int] | None = None,
                logit_rows: list[int] | None = None) -> Forward:
        """Append ``tokens`` (a chain, or a tree by ``row_parents``); logits of ``logit_rows`` (all by default)."""

    def forward_masked(self, cache: DraftCache, tokens: list[int], positions: list[int],
                       allowed: torch.Tensor | None) -> Forward:
        """Append ``tokens`` at ``positions``; row i sees the columns ``allowed[i]`` marks (None: causal)."""
