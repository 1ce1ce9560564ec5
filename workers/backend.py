"""The target's model behind a small interface, so faster CPU backends plug in later.

A backend owns the KV caches. The worker loop only asks it to prefill, to verify a tree
in one forward, to keep the accepted path, and to roll back to a length.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dovetail.spec.tree import is_chain, with_root
from dovetail.models.loading import dtype_name, load_tokenizer, tokenizer_hash
from dovetail.workers.hf import CausalLM, Forward
from dovetail.workers.quant import check_quantize, quantize_model


class ContextFull(RuntimeError):
    """No room left in the target's context for these rows (llama.cpp: its KV cells, shared
    by every open request); the sequence is left as it was."""


@dataclass(frozen=True)
class Identity:
    """What a peer must agree with before it may draft for (or be verified by) this model."""
    model: str
    arch: str
    vocab_size: int
    hidden_size: int
    tokenizer_hash: str
    dtype: str
    device: str


class TargetBackend(ABC):
    identity: Identity
    max_context: int = 0  # most positions one sequence may hold (0: no known limit)
    kv_cells: int = 0     # KV cells all sequences share (llama.cpp's context; 0: each has its own cache)
    tokenizer = None      # the model's tokenizer (structured output masks by it)
    shares_prefixes = False  # fork() shares the source's positions (llama.cpp's cells) rather than copying them
    # Called when a live request needs cells or sequence ids the prefix cache holds: frees one cached
    # entry, False when there is none left (workers/prefix_cache.py PrefixCache.evict_one).
    evict = None

    @abstractmethod
    def new_sequence(self):
        """An empty sequence (KV cache) handle."""

    @abstractmethod
    def length(self, seq) -> int:
        """Number of positions the sequence holds."""

    @abstractmethod
    def prefill(self, seq, tokens: list[int], hidden: bool = True) -> torch.Tensor | None:
        """Process tokens; return their final hidden states [n, hidden] (None if not ``hidden``)."""

    def prefill_logits(self, seq, tokens: list[int]) -> torch.Tensor:
        """Process ``tokens`` (a chain of at most MAX_BATCH_ROWS) and return the logits after the
        last one [vocab]: the end of a prompt and its last token in one forward."""
        raise NotImplementedError

    @abstractmethod
    def verify(self, seq, root: int, tokens: list[int], parents: list[int], hidden: bool = True) -> Forward:
        """One forward over [root, *tree]: logits for all n+1 rows, and their hidden states
        when ``hidden`` (a backend may return them anyway when they cost nothing)."""

    def verify_many(self, seqs: list, roots: list[int], trees: list[tuple[list[int], list[int]]],
                    hidden: list[bool]) -> list[Forward]:
        """verify() for several independent sequences; a backend that can runs them in one
        forward (llama.cpp). Here: one after another. On failure every sequence is left as it was."""
        outs, done = [], []
        try:
            for seq, root, (tokens, parents), h in zip(seqs, roots, trees, hidden):
                start = self.length(seq)
                outs.append(self.verify(seq, root, tokens, parents, hidden=h))
                done.append((seq, start))
        except BaseException:
            for seq, start in done:
                self.rollback(seq, start)
            raise
        return outs

    @abstractmethod
    def keep(self, seq, start: int, rows: list[int]) -> None:
        """After verify: keep positions [0, start) and the given rows, in that order."""

    @abstractmethod
    def rollback(self, seq, length: int) -> None:
        """Truncate the sequence to ``length`` positions."""

    def release(self, seq) -> None:
        """The request is closed: free what the sequence holds."""

    def fork(self, seq, length: int):
        """A new sequence holding the first ``length`` positions of ``seq``, which is left as it
        was; nothing the new one does later (verify, keep, rollback) touches ``seq``."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork sequences (no prefix cache)")

    def save_sequence(self, seq, path, tokens: list[int]) -> bool:
        """Write the sequence's KV and its ``tokens`` to ``path``; False when that failed."""
        raise NotImplementedError(f"{type(self).__name__} cannot save sequences")

    def load_sequence(self, path, max_tokens: int):
        """A new sequence from a file save_sequence() wrote, and its tokens; None when the file
        does not fit this model and context (or holds more than ``max_tokens``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load sequences")

    def close(self) -> None:
        """Free the model (the worker is exiting)."""


class HFBackend(TargetBackend):
    """Transformers on the CPU (or any torch device), from a HF folder or a GGUF file.

    ``quantize="int8"`` / ``"int4"`` quantizes the decoder layers' weights (workers/quant.py): CPU only,
    where reading the weights is what a small verification waits on.
    """

    def __init__(self, path: str, dtype: torch.dtype, device: str = "cpu", device_label: str | None = None,
                 quantize: str = "none"):
        if check_quantize(quantize) != "none" and device != "cpu":
            raise ValueError(f"quantize={quantize!r} is for a target on the CPU, not on {device!r}")
        self.lm = CausalLM.load(path, device=device, dtype=dtype)
        quantize_model(self.lm.model, quantize)
        self.quantize = quantize
        tok = load_tokenizer(path)
        self.tokenizer = tok  # a request's grammar (structured output) is built on it
        self.identity = Identity(
            model=self.lm.name, arch=str(getattr(self.lm.config, "model_type", "?")),
            vocab_size=self.lm.vocab_size, hidden_size=self.lm.hidden_size,
            tokenizer_hash=tokenizer_hash(tok, self.lm.vocab_size),
            # "bfloat16+int8": the handshake and the logs show which model really verifies.
            dtype=dtype_name(self.lm.dtype) + (f"+{quantize}" if quantize != "none" else ""),
            device=device_label or device)
        self.max_context = int(getattr(self.lm.config, "max_position_embeddings", 0) or 0)

    def new_sequence(self):
        return self.lm.new_cache()

    def length(self, seq) -> int:
        return seq.get_seq_length()

    def prefill(self, seq, tokens: list[int], hidden: bool = True) -> torch.Tensor | None:
        out = self.lm.forward(seq, tokens, logit_rows=[]).hidden
        return out if hidden else None

    def prefill_logits(self, seq, tokens: list[int]) -> torch.Tensor:
        return self.lm.forward(seq, tokens, logit_rows=[len(tokens) - 1]).logits[-1]

    def verify(self, seq, root: int, tokens: list[int], parents: list[int], hidden: bool = True) -> Forward:
        # A chain needs no custom mask: the model's own causal mask is exact and cheaper.
        rows = None if is_chain(parents) else with_root(parents)
        return self.lm.forward(seq, [root, *tokens], rows)

    def verify_many(self, seqs: list, roots: list[int], trees: list[tuple[list[int], list[int]]],
                    hidden: list[bool]) -> list[Forward]:
        """One padded forward for all (CausalLM.forward_batch); one by one for a sliding-window
        model and while some sequence holds nothing yet (an empty cache has no layers to pad)."""
        if len(seqs) < 2 or self.lm.window is not None or any(self.length(s) == 0 for s in seqs):
            return super().verify_many(seqs, roots, trees, hidden)
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("verify_many takes distinct sequences")
        starts = [self.length(s) for s in seqs]
        try:
            return self.lm.forward_batch(seqs, [([root, *tokens], with_root(parents))
                                                for root, (tokens, parents) in zip(roots, trees)])
        except BaseException:
            for seq, start in zip(seqs, starts):
                self.rollback(seq, start)
            raise

    def keep(self, seq, start: int, rows: list[int]) -> None:
        self.lm.keep_rows(seq, start, rows)

    def rollback(self, seq, length: int) -> None:
        self.lm.crop(seq, length)

    def fork(self, seq, length: int):
        return self.lm.fork(seq, length)
