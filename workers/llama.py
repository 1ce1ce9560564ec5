"""The target on llama.cpp (llama-cpp-python): GGUF weights run natively, no de-quantizing.

All requests share one llama.cpp context with a unified KV cache; each request owns one
sequence id. A draft tree is verified in ONE decode call without a custom mask: every
root-to-leaf path gets a sequence id, and each tree row is tagged with the ids of the
leaves below it. llama.cpp lets a row attend to the cells that carry its first sequence
id at positions up to its own, and a cell carries leaf s exactly when it lies on the path
to s, so a row sees the committed prefix, its ancestors and itself: the tree mask.
Keeping the accepted path then means keeping the path's cells under the request's own id
and dropping the scratch ids; rolling back is removing positions from that id.
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from dovetail.models.options import DEFAULT_LLAMA_CTX, MAX_BATCH_ROWS, import_llama
from dovetail.spec.tree import children, row_positions, with_root
from dovetail.workers.backend import ContextFull, Identity, TargetBackend
from dovetail.models.loading import load_tokenizer, tokenizer_hash
from dovetail.workers.hf import Forward

log = logging.getLogger("dovetail.target")

DEFAULT_SEQS = 64        # sequence ids: one per open request plus scratch ids for tree leaves
SCRATCH_SEQS = 16        # the target worker's scratch ids beyond --max-requests (tree leaves)
CACHE_SEQS = 16          # ... and ids for prefix-cache entries (they give theirs up when a request needs one)
MAX_BATCH = MAX_BATCH_ROWS  # rows per llama_decode call (its n_batch); longer prompts go in chunks


@dataclass
class LlamaSeq:
    """One request's handle: its sequence id and how many positions it holds."""
    seq_id: int
    length: int = 0
    verify_leaves: tuple | None = None  # (leaves, their sequence ids, row parents) until keep()

    def get_seq_length(self) -> int:  # the name transformers' caches use (draft code calls it)
        return self.length


class LlamaBackend(TargetBackend):
    """Verify with llama.cpp's CPU kernels on the GGUF's own quantization."""

    def __init__(self, path: str, threads: int, n_ctx: int = DEFAULT_LLAMA_CTX, n_seqs: int = DEFAULT_SEQS,
                 device_label: str | None = None, extra_buffers: bool = True):
        """``extra_buffers=False`` loads the weights in plain CPU buffers (no repacking, no
        AMX tiles): slower, but where extra buffers crash it decodes (llama_buffers.py)."""
        if not str(path).endswith(".gguf"):
            raise ValueError(f"the llama.cpp backend loads .gguf files, got {path}")
        ll = import_llama()
        self.lib = ll.llama_cpp
        _route_logs(self.lib)
        self.lib.llama_backend_init()
        mparams = self.lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        from dovetail.workers.llama_buffers import set_extra_buffers
        self.extra_buffers = set_extra_buffers(self.lib, mparams, extra_buffers)  # as the model loads
        self.model = self.lib.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        n_seqs = min(n_seqs, int(self.lib.llama_max_parallel_sequences()))
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, MAX_BATCH, MAX_BATCH
        cparams.n_seq_max, cparams.kv_unified = n_seqs, True  # one cell pool for every request
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = False  # switched on per call, only when hidden states are wanted
        self.ctx = self.lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seqs})")
        self.mem = self.lib.llama_get_memory(self.ctx)
        self.batch = self.lib.llama_batch_init(MAX_BATCH, 0, n_seqs)
        self.n_seqs, self.n_ctx = n_seqs, n_ctx
        self.kv_cells = n_ctx  # shared: the coordinator reserves each request's share (Handshake.kv_cells)
        self.free_ids = list(range(n_seqs - 1, -1, -1))
        self.vocab_size = int(self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model)))
        self.hidden_size = int(self.lib.llama_model_n_embd(self.model))
        self.embeddings_on = False
        tok = load_tokenizer(path)
        self.tokenizer = tok  # a request's grammar (structured output) is built on it
        self.identity = Identity(
            model=os.path.basename(str(path)), arch=self._meta("general.architecture"),
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            tokenizer_hash=tokenizer_hash(tok, self.vocab_size),
            dtype="gguf:" + self._describe() + self._requantized(),
            device=(device_label or "cpu") + ", llama.cpp" + ("" if self.extra_buffers else ", plain buffers"))
        # One request may fill the whole context (all requests share its cells), and no more
        # than the model was trained for.
        trained = int(self.lib.llama_model_n_ctx_train(self.model))
        self.max_context = min(n_ctx, trained) if trained > 0 else n_ctx

    # ---- TargetBackend ------------------------------------------------------------------
    shares_prefixes = True  # fork(): llama_memory_seq_cp tags the same cells with a second sequence id

    def new_sequence(self) -> LlamaSeq:
        self._free_ids_for(1)
        if not self.free_ids:
            raise RuntimeError(f"all {self.n_seqs} llama.cpp sequence ids are in use (close requests first)")
        return LlamaSeq(self.free_ids.pop())

    def fork(self, seq: LlamaSeq, length: int) -> LlamaSeq:
        """The unified KV cache shares cells between sequences: the new sequence's first
        ``length`` positions are ``seq``'s cells, tagged with its id too. Its later rows go to
        new cells, and removing its positions removes only its tag."""
        twin = self.new_sequence()
        if length:
            self.lib.llama_memory_seq_cp(self.mem, seq.seq_id, twin.seq_id, 0, length)
        twin.length = length
        return twin

    def save_sequence(self, seq: LlamaSeq, path, tokens: list[int]) -> bool:
        arr = (self.lib.llama_token * len(tokens))(*tokens)
        return self.lib.llama_state_seq_save_file(self.ctx, os.fsencode(path), seq.seq_id, arr, len(tokens)) > 0

    def load_sequence(self, path, max_tokens: int):
        seq = self.new_sequence()
        out, count = (self.lib.llama_token * max_tokens)(), ctypes.c_size_t(0)
        read = self.lib.llama_state_seq_load_file(self.ctx, os.fsencode(path), seq.seq_id, out, max_tokens,
                                                  ctypes.byref(count))
        if read == 0 or count.value == 0:  # another model's, a full pool, or a broken file
            self.release(seq)
            return None
        seq.length = count.value
        return seq, list(out[:count.value])

    def release(self, seq: LlamaSeq) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq.seq_id, -1, -1)
        self.free_ids.append(seq.seq_id)

    def length(self, seq: LlamaSeq) -> int:
        return seq.length

    def prefill(self, seq: LlamaSeq, tokens: list[int], hidden: bool = True) -> torch.Tensor | None:
        out = []
        for i in range(0, len(tokens), MAX_BATCH):
            chunk = tokens[i:i + MAX_BATCH]
            rows = [([seq.seq_id], seq.length + j) for j in range(len(chunk))]
            try:
                self._decode(chunk, rows, logits=False, hidden=hidden)
            except BaseException:
                self.rollback(seq, seq.length)
                raise
            seq.length += len(chunk)
            if hidden:
                out.append(self._read(self.lib.llama_get_embeddings(self.ctx), len(chunk), self.hidden_size))
        return torch.cat(out) if hidden else None

    def prefill_logits(self, seq: LlamaSeq, tokens: list[int]) -> torch.Tensor:
        return self.decode_chain(seq, tokens, [len(tokens) - 1])[0]

    def verify(self, seq: LlamaSeq, root: int, tokens: list[int], parents: list[int],
               hidden: bool = True) -> Forward:
        return self.verify_many([seq], [root], [(tokens, parents)], [hidden])[0]

    def verify_many(self, seqs: list[LlamaSeq], roots: list[int], trees: list[tuple[list[int], list[int]]],
                    hidden: list[bool]) -> list[Forward]:
        """Verify several requests' trees in ONE llama_decode: each request's rows carry its own
        sequence ids (its own and its leaves' scratch ids), so no row attends to another
        request's; a CPU forward is bound by reading the weights, and rows share that read."""
        if len({s.seq_id for s in seqs}) != len(seqs):
            raise ValueError("verify_many takes distinct sequences")
        tokens, rows, spans = [], [], []
        try:
            for seq, root, (tree, parents) in zip(seqs, roots, trees):
                row_parents = with_root(parents)
                leaves = _leaves(row_parents)
                leaf_ids = [seq.seq_id, *self._take_ids(len(leaves) - 1)]
                seq.verify_leaves = (leaves, leaf_ids, row_parents)
                for s in leaf_ids[1:]:  # every leaf path shares the committed prefix
                    self.lib.llama_memory_seq_cp(self.mem, seq.seq_id, s, -1, -1)
                spans.append((len(tokens), len(row_parents)))
                tokens += [root, *tree]
                rows += _tree_rows(row_parents, leaves, leaf_ids, seq.length)
            self._decode(tokens, rows, logits=True, hidden=any(hidden))
        except BaseException:
            for seq in seqs:
                if seq.verify_leaves is not None:
                    self._drop_scratch(seq, seq.length)
            raise
        logits = self._read(self.lib.llama_get_logits(self.ctx), len(rows), self.vocab_size)
        feats = self._read(self.lib.llama_get_embeddings(self.ctx), len(rows), self.hidden_size) if any(hidden) else None
        return [Forward(logits=logits[a:a + n], hidden=feats[a:a + n] if feats is not None and h else None)
                for (a, n), h in zip(spans, hidden)]

    def keep(self, seq: LlamaSeq, start: int, rows: list[int]) -> None:
        leaves, leaf_ids, row_parents = seq.verify_leaves
        # A leaf whose path runs through the last kept row carries every kept row.
        below = _subtree_leaf(row_parents, leaves, rows[-1])
        owner = leaf_ids[below]
        if owner != seq.seq_id:
            self.lib.llama_memory_seq_rm(self.mem, seq.seq_id, start, -1)
            self.lib.llama_memory_seq_cp(self.mem, owner, seq.seq_id, start, start + len(rows))
        self._drop_scratch(seq, start + len(rows))

    def rollback(self, seq: LlamaSeq, length: int) -> None:
        if seq.verify_leaves is not None:
            self._drop_scratch(seq, length)
        if not self.lib.llama_memory_seq_rm(self.mem, seq.seq_id, length, -1):
            raise RuntimeError(f"llama.cpp refused to remove positions >= {length}")
        seq.length = min(seq.length, length)

    def step_many(self, seqs: list[LlamaSeq], tokens: list[int], hidden: bool = True) -> Forward:
        """Append one token to each of ``seqs`` (independent sequences) in ONE decode call.

        Row i holds the logits (and hidden state) after tokens[i]. On this compute-bound CPU
        a 16-row decode costs about 7 single-row steps, so answering many prompts side by
        side (self-distillation) is ~2x faster than one after another.
        """
        if len(seqs) != len(tokens) or len({s.seq_id for s in seqs}) != len(seqs):
            raise ValueError("step_many takes one token for each of distinct sequences")
        rows = [([s.seq_id], s.length) for s in seqs]
        try:
            self._decode(tokens, rows, logits=True, hidden=hidden)
        except BaseException:
            for s in seqs:
                self.rollback(s, s.length)
            raise
        for s in seqs:
            s.length += 1
        n = len(seqs)
        logits = self._read(self.lib.llama_get_logits(self.ctx), n, self.vocab_size)
        feats = self._read(self.lib.llama_get_embeddings(self.ctx), n, self.hidden_size) if hidden else None
        return Forward(logits=logits, hidden=feats)

    # ---- internals ------------------------------------------------------------------------
    def decode_chain(self, seq: LlamaSeq, tokens: list[int], logit_rows: list[int]) -> torch.Tensor:
        """Append a plain chain to ``seq``; logits of ``logit_rows`` only (a draft's step)."""
        rows = [([seq.seq_id], seq.length + j) for j in range(len(tokens))]
        wanted = {r % len(tokens) for r in logit_rows}
        try:
            self._decode(tokens, rows, logits=[j in wanted for j in range(len(tokens))], hidden=False)
        except BaseException:
            self.rollback(seq, seq.length)
            raise
        seq.length += len(tokens)
        return self._read(self.lib.llama_get_logits(self.ctx), len(wanted), self.vocab_size)

    def _decode(self, tokens: list[int], rows: list[tuple[list[int], int]], *, logits, hidden: bool) -> None:
        """One llama_decode; ``logits``: for every row (True/False) or a flag per row."""
        if len(tokens) > MAX_BATCH:
            raise ValueError(f"{len(tokens)} rows in one decode; at most {MAX_BATCH}")
        if hidden != self.embeddings_on:
            # Embeddings make llama.cpp output every row (logits included): only when asked.
            self.lib.llama_set_embeddings(self.ctx, hidden)
            self.embeddings_on = hidden
        b = self.batch
        b.n_tokens = len(tokens)
        flags = logits if isinstance(logits, list) else [logits] * len(tokens)
        for i, (tok, (ids, pos)) in enumerate(zip(tokens, rows)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(ids), flags[i]
            for j, s in enumerate(ids):
                b.seq_id[i][j] = s
        rc = self.lib.llama_decode(self.ctx, b)
        while rc == 1 and self.evict is not None and self.evict():  # cached prefixes give way first
            rc = self.lib.llama_decode(self.ctx, b)
        if rc == 1:
            open_ = self.n_seqs - len(self.free_ids)
            raise ContextFull(f"no room for {len(tokens)} more rows in llama.cpp's {self.n_ctx} KV cells, which all "
                              f"open requests share ({open_} sequence(s) in use): raise --llama-ctx "
                              "(launch(llama_ctx=)), or run fewer requests at once (max_active)")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    @staticmethod
    def _read(ptr, n: int, width: int) -> torch.Tensor:
        arr = np.ctypeslib.as_array(ptr, shape=(n * width,))
        return torch.from_numpy(arr.reshape(n, width).copy())

    def _free_ids_for(self, n: int) -> None:
        """Evict prefix-cache entries until ``n`` sequence ids are free (or none is left to evict)."""
        while len(self.free_ids) < n and self.evict is not None and self.evict():
            pass

    def _take_ids(self, n: int) -> list[int]:
        self._free_ids_for(n)
        if n > len(self.free_ids):
            raise RuntimeError(f"a tree with {n + 1} leaves needs {n} free sequence ids, "
                               f"{len(self.free_ids)} left (lower max_nodes, or raise --max-requests: the worker has "
                               f"max_requests + {SCRATCH_SEQS} sequence ids)")
        return [self.free_ids.pop() for _ in range(n)]

    def _drop_scratch(self, seq: LlamaSeq, keep_len: int) -> None:
        leaves, leaf_ids, _ = seq.verify_leaves
        seq.verify_leaves = None
        for s in leaf_ids[1:]:
            self.lib.llama_memory_seq_rm(self.mem, s, -1, -1)
            self.free_ids.append(s)
        self.lib.llama_memory_seq_rm(self.mem, seq.seq_id, keep_len, -1)
        seq.length = keep_len

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else "?"

    def _requantized(self) -> str:
        """', re-quantized from Q4_K_M (FILE)' for a file that dovetail-launch quantize made."""
        from dovetail.models.requantize import SOURCE_KEY
        source = self._meta(SOURCE_KEY)
        return "" if source == "?" else f", re-quantized from {source}"

    def _describe(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode(errors="replace")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None


# ---- tree bookkeeping (pure functions of the row-parent array) ---------------------------
def _leaves(row_parents: list[int]) -> list[int]:
    kids = children(row_parents)
    return [i for i in range(len(row_parents)) if not kids.get(i)]


def _row_seq_ids(row_parents: list[int], leaves: list[int], leaf_ids: list[int]) -> list[list[int]]:
    """Each row carries the sequence ids of the leaves below it (itself if it is a leaf)."""
    ids: list[list[int]] = [[] for _ in row_parents]
    for leaf, s in zip(leaves, leaf_ids):
        node = leaf
        while node >= 0:
            ids[node].append(s)
            node = row_parents[node]
    return ids


def _tree_rows(row_parents: list[int], leaves: list[int], leaf_ids: list[int], start: int
               ) -> list[tuple[list[int], int]]:
    """(sequence ids, position) of each row of a tree verified after ``start`` committed cells.
    Rows of several requests go in one batch as they are: their ids never overlap."""
    return list(zip(_row_seq_ids(row_parents, leaves, leaf_ids), row_positions(row_parents, start)))


def _subtree_leaf(row_parents: list[int], leaves: list[int], row: int) -> int:
    """Index (into ``leaves``) of a leaf at or below ``row``."""
    for k, leaf in enumerate(leaves):
        node = leaf
        while node >= 0:
            if node == row:
                return k
            node = row_parents[node]
    raise ValueError(f"row {row} has no leaf below it")


_LOG_CALLBACK = None  # kept alive: llama.cpp holds a raw pointer to it


def _route_logs(lib) -> None:
    """llama.cpp prints hundreds of lines while loading: send them to our debug log."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @lib.llama_log_callback
    def forward(level, text, user_data):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())

    _LOG_CALLBACK = forward
    lib.llama_log_set(forward, ctypes.c_void_p(0))
