"""Structured output: a grammar (JSON schema, regex, Lark/GBNF) as a mask over the vocabulary.

A grammar is a deterministic function of the text so far, like a penalty: masking the
target's distribution at every tree node, each node with the grammar state of its own path,
keeps speculation exact with respect to target-only decoding under the same grammar. Three
things follow (docs/structured-output.md):

- a draft node whose token the grammar forbids after its path can never be accepted, and
  nor can anything below it: ``allowed_nodes`` finds them so they are pruned before the
  target spends rows on them;
- the target's pick at a row is taken from its logits masked for that row's path
  (``PathCursor`` walks the matcher to any path and back);
- the committed state follows accepted tokens only (``advance``; a walk over a tree rolls
  back every token it tried).

The library underneath is llguidance (what llama.cpp and vLLM use): an Earley parser over a
lexer on the token trie, tens of microseconds a mask over a 150k vocabulary (a few hundred
inside free strings), no per-grammar compile, and a matcher that rolls back consumed tokens,
which walking a draft tree needs.

torch is imported where a mask is made, not at the top: the server imports this module to
check a request's grammar (``grammar_text``) and needs neither torch nor a tokenizer for it.

A grammar travels as the library's own text (``grammar_text``: JSON, tokenizer-free, a few
kB); the process that masks builds the tokenizer side once per tokenizer (``vocab_of``, about
a second for a 150k vocabulary) and one ``GrammarState`` per request.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from dovetail.spec.tree import check_parents, children

log = logging.getLogger("dovetail.grammar")

KINDS = ("json_object", "json_schema", "regex", "lark", "grammar")
ANY_OBJECT = {"type": "object"}  # json_object: any JSON object, as OpenAI's JSON mode
# JSON whitespace: free, but at most this many characters at each place JSON allows it.
# Unbounded whitespace lets a model loop on newlines forever inside a valid prefix; 32 covers
# pretty-printing to depth 7 with 4-space indents (llama.cpp's own JSON grammar allows 20).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
# llama.cpp's converter fills ids a vocabulary lacks with "[PAD<id>]", typed UNUSED in the GGUF;
# transformers' GGUF loader makes them ordinary tokens (271 in Qwen2.5), which a grammar would
# then allow as text. They are padding rows: never allowed.
PAD_PLACEHOLDER = re.compile(r"\[PAD\d+\]")
LOG_LEVEL = 0  # llguidance's own logging (1: warnings on stderr); errors come back to us as text
BITS = 32      # llguidance packs a mask as little-endian 32-bit words, bit i of word j = token 32j + i


def grammar_text(kind: str, spec=None) -> str:
    """The llguidance grammar of a request's constraint, checked: ValueError with the reason
    for an unknown kind, a bad schema, regex or grammar (the server answers 400).

    kind: "json_object" (any object; spec ignored), "json_schema" (a dict or its JSON text),
    "regex" (whole output; Rust regex syntax), "lark" (llguidance's Lark), "grammar" (Lark or
    llama.cpp's GBNF)."""
    import llguidance
    from llguidance import LLMatcher

    if kind not in KINDS:
        raise ValueError(f"unknown grammar kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "json_object":
        spec = ANY_OBJECT
    if kind != "json_object" and spec is None:
        raise ValueError(f"a {kind} grammar needs its {'schema' if kind == 'json_schema' else 'text'}")
    if kind in ("json_schema", "json_object"):
        text = json_schema_text(spec)
    elif not isinstance(spec, str):
        raise ValueError(f"a {kind} grammar is a string, got {type(spec).__name__}")
    elif kind == "regex":
        text = LLMatcher.grammar_from_regex(spec)
    elif kind == "lark":
        text = LLMatcher.grammar_from_lark(spec)
    else:
        text = llguidance.grammar_from("grammar", spec)  # GBNF is converted; Lark passes through
    check_text(text)
    return text


def json_schema_text(schema) -> str:
    from llguidance import LLMatcher

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from None
    if not isinstance(schema, dict):
        # true/false are valid schemas, but "anything" and "nothing" are no structured output.
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    own = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
    # A schema that says how it wants whitespace (llguidance's "x-guidance") gets it as it says.
    keep = "whitespace_flexible" in own or "whitespace_pattern" in own
    return LLMatcher.grammar_from_json_schema(schema, defaults=None if keep else JSON_OPTIONS)


def check_text(text: str) -> None:
    """ValueError naming what is wrong with a grammar (no tokenizer needed)."""
    from llguidance import LLMatcher

    failed, messages = LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise ValueError(f"invalid grammar: {messages[0] if messages else 'rejected'}")


@dataclass(frozen=True)
class GrammarVocab:
    """The tokenizer as llguidance sees it (each token's bytes, in a trie) with the ids that
    end the output: built once per tokenizer and stop set, shared by every request."""
    ll: object                # llguidance.LLTokenizer
    size: int                 # the tokenizer's ids: 0 .. size-1 (the model may have more rows)
    stop_ids: tuple[int, ...]
    unused: tuple[int, ...] = ()  # ids never allowed: padding placeholders (PAD_PLACEHOLDER), <unk>


_vocabs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {stop ids: vocab}
_vocabs_lock = threading.Lock()


def vocab_of(tokenizer, stop_ids=None) -> GrammarVocab:
    """The llguidance vocabulary of a HF fast tokenizer (cached: about a second at 150k ids).

    stop_ids: the ids that end the output (the model's eos and end-of-turn tokens); default
    the tokenizer's eos. They are allowed where the output may end, and alone once it cannot
    grow."""
    if stop_ids is None:
        stop_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    key = tuple(sorted({int(i) for i in stop_ids}))
    with _vocabs_lock:
        cached = _vocabs.setdefault(tokenizer, {})
        if key not in cached:
            cached[key] = build_vocab(tokenizer, key)
        return cached[key]


def build_vocab(tokenizer, stop_ids: tuple[int, ...]) -> GrammarVocab:
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"structured output needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    # Ids past the tokenizer's are model rows only: they never come out, so never end anything.
    # The tokenizer's own eos first: the library's matcher finishes on the first id it is given.
    inside = sorted((i for i in stop_ids if 0 <= i < len(tokenizer)), key=lambda i: (i != tokenizer.eos_token_id, i))
    if not inside:
        # With no id to end on, a complete grammar would allow nothing at all.
        raise ValueError(f"structured output needs a stop token inside the tokenizer's {len(tokenizer)} ids, "
                         f"got {list(stop_ids)}")
    ll = ll_tokenizer(tokenizer, inside[0])
    unused = {i for t, i in tokenizer.get_vocab().items() if PAD_PLACEHOLDER.fullmatch(t)}
    # <unk> stands for text the tokenizer could not read: it spells nothing a grammar can check
    # (llguidance's masks may allow it where its validation refuses it)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in stop_ids:
        unused.add(tokenizer.unk_token_id)
    unused = sorted(unused)
    return GrammarVocab(ll=ll, size=ll.vocab_size, stop_ids=tuple(sorted(inside)), unused=tuple(unused))


def ll_tokenizer(tokenizer, eos: int):
    """llguidance's tokenizer: from the tokenizer's own JSON where llguidance reads its decoder
    (byte-level BPE, sentencepiece with byte fallback: every real model's), else from each
    token's decoded text (a character-level or word-level tokenizer's decoder, as the tiny
    test models have)."""
    import llguidance.hf
    from llguidance import LLTokenizer, TokenizerWrapper

    try:
        ll = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
    except ValueError as e:
        log.info("llguidance cannot read this tokenizer's JSON (%s): building it from token texts", e)
        return LLTokenizer(TokenizerWrapper(TokenTexts(tokenizer, eos)))
    # Read from JSON, every added token is special to llguidance, even those the tokenizer
    # marks as text (Qwen's <tool_call>): a grammar's literal "<tool_call>" could then be
    # forced as that token but never consumed. Rebuilt from the JSON build's own bytes.
    text_added = [i for i, t in tokenizer.added_tokens_decoder.items() if not t.special and i < ll.vocab_size]
    if not any(ll.is_special_token(i) for i in text_added):
        return ll
    texts = TokenTexts(tokenizer, eos, tokens=[ll.decode_bytes([i]) for i in range(ll.vocab_size)])
    return LLTokenizer(TokenizerWrapper(texts))


class TokenTexts:
    """A tokenizer as llguidance's TokenizerWrapper reads it: every token's bytes (given, or
    each token's decoded text), the special ones marked, and a text -> ids function
    (llguidance's forced tokens use it)."""

    def __init__(self, tokenizer, eos: int, tokens: list[bytes] | None = None):
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if tokens is None:  # each token's decoded text
            decoder = tokenizer.backend_tokenizer.decoder
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            tokens = [p.encode() if i in special or decoder is None else decoder.decode([p]).encode()
                      for i, p in enumerate(pieces)]
        self.tokens = tokens
        self.special_token_ids = sorted(special)  # llguidance marks them: never grammar text
        self.eos_token_id, self.bos_token_id = eos, tokenizer.bos_token_id
        self.tokenizer = tokenizer

    def __call__(self, text) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # TokenizerWrapper probes for a bytes API: there is none
        return self.tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class Grammar:
    """A checked grammar for one tokenizer and one model vocabulary; ``start`` a request on it."""
    text: str            # llguidance's grammar: what travels between processes
    vocab: GrammarVocab
    vocab_size: int      # the model's logits rows (padded embeddings make it larger than vocab.size)

    @classmethod
    def compile(cls, kind: str, spec, tokenizer, *, stop_ids=None, vocab_size: int | None = None) -> "Grammar":
        """ValueError for an unknown kind or a bad schema/grammar (see grammar_text)."""
        return cls.load(grammar_text(kind, spec), tokenizer, stop_ids=stop_ids, vocab_size=vocab_size)

    @classmethod
    def load(cls, text: str, tokenizer, *, stop_ids=None, vocab_size: int | None = None) -> "Grammar":
        """A grammar from its text (grammar_text's, e.g. off the wire), for this tokenizer."""
        vocab = vocab_of(tokenizer, stop_ids)
        grammar = cls(text=text, vocab=vocab, vocab_size=vocab.size if vocab_size is None else int(vocab_size))
        grammar.start()  # surfaces what only the tokenizer-bound build finds
        return grammar

    def start(self) -> "GrammarState":
        return GrammarState(self)


class DeadEnd(ValueError):
    """The grammar allows no token the vocabulary has here (a regex asking for a character the
    tokenizer cannot spell): the output cannot go on."""


class GrammarState:
    """One request's place in its grammar: the matcher after the tokens committed so far.

    Masks are torch bool tensors over the model's vocabulary: True where the token may come
    next. Ids the tokenizer does not have (padding rows) are never allowed. Every method that
    takes tokens checks them first, so a refused token leaves the state as it was (the
    library's matcher would otherwise enter an error state it never leaves).

    Stop ids are ours, not the library's (its finished matcher allows one EOS id only): each
    is allowed exactly when the output so far is complete. An unfinished matcher is given its
    own EOS id for any of them; stops it cannot take (any once it has finished) are counted
    here, so they roll back too (a target still picks a token after an accepted stop, so that
    row must allow something: the stops)."""

    def __init__(self, grammar: Grammar, matcher=None):
        from llguidance import LLMatcher

        self.grammar = grammar
        self.matcher = matcher if matcher is not None else LLMatcher(grammar.vocab.ll, grammar.text,
                                                                     log_level=LOG_LEVEL)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self.consumed = 0     # tokens advanced over (what rollback can undo), extra stops included
        self.extra_stops = 0  # stops after the first: the matcher never saw them
        self._stops = np.array([i for i in grammar.vocab.stop_ids if i < grammar.vocab_size], dtype=np.int64)
        self._words = np.empty(-(-grammar.vocab.size // BITS), dtype=np.int32)
        self._unused = frozenset(grammar.vocab.unused)

    def __len__(self) -> int:
        return self.consumed

    def fork(self) -> "GrammarState":
        """An independent copy (the library deep-copies the parser state)."""
        twin = GrammarState(self.grammar, self.matcher.deep_copy())
        twin.consumed, twin.extra_stops = self.consumed, self.extra_stops
        return twin

    def is_stop(self, token: int) -> bool:
        return token in self.grammar.vocab.stop_ids

    def is_accepting(self) -> bool:
        """The output so far is complete: a stop token may come next."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()

    def is_done(self) -> bool:
        """Nothing but a stop token may come next (or one already came)."""
        return self.matcher.is_stopped()

    def fill_words(self, out: np.ndarray) -> bool:
        """The library's packed mask (int32 words) into ``out``; returns whether the stops are
        allowed (``finish_rows`` sets their bits, which the words do not decide)."""
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return self.is_accepting()

    def mask(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens allowed next (only the stop ids once the grammar is done)."""
        import torch
        stops = self.fill_words(self._words)
        rows = unpack(self._words[None], self.grammar.vocab, self.grammar.vocab_size)
        return torch.from_numpy(finish_rows(rows, self._stops, np.array([stops]), np.array([self.is_done()]))[0])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens' logits to -inf, in place (a row, or rows all at this state)."""
        return apply_masks(logits, self.mask())

    def in_vocab(self, token: int) -> bool:
        """A token the model can write and the tokenizer has (not padding, not a placeholder)."""
        return 0 <= token < min(self.grammar.vocab.size, self.grammar.vocab_size) and token not in self._unused

    def accepts(self, token: int) -> bool:
        """Whether ``token`` may come next (without consuming it)."""
        return self.valid_prefix([token]) == 1

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar accepts in a row from here."""
        if self.is_done():  # the output has ended: stops only
            return next((i for i, t in enumerate(tokens) if not self.is_stop(t)), len(tokens))
        end = next((i for i, t in enumerate(tokens) if not self.in_vocab(t) or self.is_stop(t)), len(tokens))
        n = self.matcher.validate_tokens([int(t) for t in tokens[:end]]) if end else 0
        if n < end or end == len(tokens) or not self.in_vocab(tokens[end]):
            return n
        # tokens[end] is a stop: allowed if the text before it is complete, and so is any
        # stop after it. The matcher is asked without consuming: through a copy.
        probe = self.fork() if end else self
        if end:
            probe.matcher.consume_tokens([int(t) for t in tokens[:end]])
        if not probe.is_accepting():
            return end
        return end + 1 + next((i for i, t in enumerate(tokens[end + 1:]) if not self.is_stop(t)),
                              len(tokens) - end - 1)

    def advance(self, tokens: list[int]) -> None:
        """Consume ``tokens`` (committed ones, or a path being walked). ValueError, and no
        change, if the grammar refuses one of them."""
        tokens = [int(t) for t in tokens]
        n = self.valid_prefix(tokens)
        if n < len(tokens):
            raise ValueError(f"the grammar does not allow token {tokens[n]} after {self.consumed + n} tokens")
        for start, end in runs(tokens, self.is_stop):
            if not self.is_stop(tokens[start]):
                ok = self.matcher.consume_tokens(tokens[start:end])
            elif self.is_done():
                self.extra_stops += end - start
                ok = True
            else:  # the matcher sees one stop (its own EOS id) and finishes; the rest are extra
                ok = self.matcher.consume_token(self.grammar.vocab.ll.eos_token)
                self.extra_stops += end - start - 1
            if not ok:
                raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
            self.consumed += end - start

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` consumed tokens."""
        if not 0 <= n <= self.consumed:
            raise ValueError(f"cannot roll back {n} of {self.consumed} tokens")
        extra = min(n, self.extra_stops)
        self.extra_stops -= extra
        if n > extra and not self.matcher.rollback(n - extra):
            raise RuntimeError(f"grammar rollback failed: {self.matcher.get_error()}")
        self.consumed -= n

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here (a required key's text, as far as its tokenization
        is certain: llguidance stops where the next bytes could merge into another token): a
        free draft."""
        return [] if self.is_done() else list(self.matcher.compute_ff_tokens())


def runs(tokens: list[int], is_stop) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of stop tokens and of other tokens."""
    out, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or is_stop(tokens[i]) != is_stop(tokens[start]):
            out.append((start, i))
            start = i
    return out


def finish_rows(rows: np.ndarray, stops: np.ndarray, stops_allowed: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Masks with the stop columns set where the output may end (``stops_allowed``, per row),
    and all else cleared where it has ended (``done``, per row). In place; numpy, as unpack."""
    rows[done] = False
    rows[:, stops] = stops_allowed[:, None]
    return rows


def unpack(words: np.ndarray, vocab: GrammarVocab, vocab_size: int) -> np.ndarray:
    """bool [rows, vocab_size] from packed rows of llguidance words; ids past the tokenizer's
    and its placeholders never allowed.

    numpy, not torch: these are single-threaded copies of ~150 kB a row, and torch's own
    threads spin for longer than that on a busy CPU (ms a row, measured)."""
    assert sys.byteorder == "little"  # llguidance's words are little-endian; so is every machine we run on
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
    out = np.zeros((words.shape[0], vocab_size), dtype=np.bool_)
    n = min(vocab.size, vocab_size)
    out[:, :n] = bits[:, :n]
    out[:, [i for i in vocab.unused if i < vocab_size]] = False
    return out


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Logits with their masks applied (same shape, or one mask for every row), in place:
    disallowed to -inf. CPU float32/64 logits go through numpy, single-threaded (see unpack)."""
    import torch
    cpu = logits.device.type == "cpu" and masks.device.type == "cpu"
    if cpu and logits.dtype in (torch.float32, torch.float64) and logits.is_contiguous():
        np.copyto(logits.detach().numpy(), -np.inf, where=~np.broadcast_to(masks.numpy(), tuple(logits.shape)))
        return logits
    return logits.masked_fill_(~masks.to(logits.device), float("-inf"))


def _walk(state: GrammarState, tokens: list[int], parents: list[int], visit) -> list[bool]:
    """Depth-first over a draft tree below ``state``, consuming each node's token on the way
    down and rolling it back on the way up, so the state ends as it began. ``visit(node)`` runs
    with the state at that node's path (node -1: the root). A node is allowed when
    ``state.accepts`` its token after its path; forbidden nodes' subtrees are not entered."""
    check_parents(parents)
    kids = children(parents)
    allowed = [False] * len(tokens)
    start = len(state)
    try:
        visit(-1)
        stack = [(c, False) for c in reversed(kids[-1])]
        while stack:
            node, leaving = stack.pop()
            if leaving:
                state.rollback(1)
                continue
            if not state.accepts(tokens[node]):
                continue
            state.advance([tokens[node]])
            allowed[node] = True
            visit(node)
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(kids[node]))
    finally:
        state.rollback(len(state) - start)  # nothing left over, even after an error
    return allowed


def allowed_nodes(state: GrammarState, tokens: list[int], parents: list[int]) -> list[bool]:
    """Which draft nodes the grammar allows after their path (a forbidden node's subtree is
    forbidden too). No masks are computed: a few microseconds a node."""
    return _walk(state, tokens, parents, lambda node: None)


def tree_masks(state: GrammarState, tokens: list[int], parents: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """The masks along a draft tree: row 0 at the root (``state``), row i + 1 after node i;
    and which nodes are allowed. Rows of forbidden nodes (and their subtrees) allow nothing:
    prune those nodes, never verify them. ``state`` is unchanged."""
    import torch
    words = np.zeros((len(tokens) + 1, state._words.size), dtype=np.int32)  # forbidden rows stay empty
    stops_allowed = np.zeros(len(tokens) + 1, dtype=np.bool_)
    done = np.zeros(len(tokens) + 1, dtype=np.bool_)

    def visit(node: int) -> None:
        stops_allowed[node + 1] = state.fill_words(words[node + 1])
        done[node + 1] = state.is_done()

    allowed = _walk(state, tokens, parents, visit)
    rows = unpack(words, state.grammar.vocab, state.grammar.vocab_size)
    return torch.from_numpy(finish_rows(rows, state._stops, stops_allowed, done)), allowed


def prune(tokens: list[int], parents: list[int], allowed: list[bool]) -> tuple[list[int], list[int], list[int]]:
    """The tree without its forbidden nodes: (tokens, parents, kept) where kept[j] is the
    original index of new node j, to map accepted nodes back."""
    kept = [i for i, ok in enumerate(allowed) if ok and (parents[i] < 0 or allowed[parents[i]])]
    index = {old: new for new, old in enumerate(kept)}
    return ([tokens[i] for i in kept], [-1 if parents[i] < 0 else index[parents[i]] for i in kept], kept)


class PathCursor:
    """Masks for paths below a committed state, asked in any order: the matcher moves from
    the last path to the next through their common prefix. This is what a verifier's walk
    needs (spec/verify.py accept_path asks row by row along the path it accepts), with one
    mask per row it reaches instead of one per tree node. ``close`` puts the state back."""

    def __init__(self, state: GrammarState):
        self.state = state
        self.path: list[int] = []

    def goto(self, path: list[int]) -> None:
        common = 0
        for a, b in zip(self.path, path):
            if a != b:
                break
            common += 1
        self.state.rollback(len(self.path) - common)
        self.path = self.path[:common]
        self.state.advance(path[common:])  # ValueError if the path leaves the grammar
        self.path = list(path)

    def mask(self, path: list[int]) -> torch.Tensor:
        self.goto(path)
        return self.state.mask()

    def close(self) -> None:
        self.goto([])

    def __enter__(self) -> "PathCursor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
