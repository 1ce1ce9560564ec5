"""Prefix cache: finished requests' KV kept for the next prompt that starts the same way.

Chats resend the whole conversation each turn, agents resend one system prompt and tool list
on every call: on a CPU target their prefill is most of the time to first token. A request's
sequence outlives it here as an entry, and a new prompt that shares a prefix with one starts
from a copy of those positions and prefills only the rest (SGLang's RadixAttention is the
model).

- **A radix tree per scope** (the server's API key: a prompt-cache hit is a timing side channel
  between tenants, so tenants never share). Edges carry token runs; an entry (a sequence the
  backend holds) sits at the end of its tokens. Entries sit at leaves only: one whose tokens
  another entry extends is dropped, since the longer one holds all its positions.
- **Lookup** walks down the prompt's tokens; wherever it stops, any entry below that point
  holds the matched positions, and ``TargetBackend.fork`` copies them into the new sequence
  (llama.cpp: ``seq_cp``, the cells shared, not copied; transformers: the tensors, cut).
  Rollback and tree rows of the new sequence only ever touch positions past the copy.
- **A feature draft's request** needs the prompt's hidden states too (its draft reads them):
  its entry keeps them beside the KV, and such a request forks only from an entry that has
  them, as far as they go (``fork_hidden``).
- **Size** is counted in tokens: the distinct tokens the tree holds (llama.cpp shares the cells
  of a common prefix between sequences: that is what the tree's shared edges are) or, where a
  backend copies (``shares_prefixes`` false), each entry's own length. Past ``max_tokens``
  least-recently-used entries go. A backend that runs out of cells or sequence ids for a live
  request evicts entries first (``evict_one``): a cached prefix never makes a request wait or fail.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dovetail.prefix_cache")

# The default bound: DEFAULT_PREFIX_CACHE_TOKENS in dovetail/models/options.py (and why).
SAVED_VERSION = 1        # of the index a saved cache folder holds (save / load)
INDEX = "index.json"


@dataclass(eq=False)
class Node:
    tokens: list[int]                  # the edge from the parent
    parent: "Node | None"
    children: dict[int, "Node"] = field(default_factory=dict)  # first token of each child's edge -> child
    entry: "Entry | None" = None       # a sequence that holds every position down to here
    depth: int = 0                     # positions above this edge


@dataclass(eq=False)
class Entry:
    seq: object        # the backend's sequence handle
    length: int        # positions it holds
    scope: str
    node: Node
    used: int = 0      # LRU clock
    hidden: object = None  # hidden states of its first len(hidden) positions (a feature request's), or None


class PrefixCache:
    """The entries of one backend. ``backend``: a TargetBackend (fork, release, shares_prefixes)."""

    def __init__(self, backend, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"the prefix cache bound must be >= 0 tokens, got {max_tokens}")
        self.backend, self.max_tokens = backend, max_tokens
        self.roots: dict[str, Node] = {}
        self.entries: list[Entry] = []
        self._clock = itertools.count(1)
        self.tokens = 0  # what the bound counts (see the module doc)
        self._pinned: Entry | None = None

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0

    # ---- lookup ------------------------------------------------------------------------------
    def match(self, scope: str, tokens: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``tokens`` and that prefix's length."""
        node = self.roots.get(scope)
        if node is None or not tokens:
            return None, 0
        matched = 0
        while True:
            child = node.children.get(tokens[matched]) if matched < len(tokens) else None
            if child is None:
                break
            run = common_length(child.tokens, tokens, matched)
            matched += run
            node = child
            if run < len(child.tokens):
                break
        if matched == 0:
            return None, 0
        entry = newest_below(node)
        return entry, matched

    def fork(self, scope: str, tokens: list[int]):
        """A new sequence holding the longest cached prefix of ``tokens`` (and its length), or
        (None, 0) when nothing is cached for them."""
        entry, n = self.match(scope, tokens)
        if entry is None:
            return None, 0
        return self._fork_from(entry, n), n

    def fork_hidden(self, scope: str, tokens: list[int]):
        """fork() for a feature draft's request: (sequence, n, hidden states of its first n
        positions) from the entry whose kept hidden states cover the longest prefix of
        ``tokens``; (None, 0, None) when none does."""
        best, best_n = None, 0
        for e in self.entries:
            if e.scope == scope and e.hidden is not None:
                n = min(len(e.hidden), common_length(path_tokens(e.node), tokens, 0))
                if n > best_n or (n == best_n and best is not None and e.used > best.used):
                    best, best_n = e, n
        if best is None:
            return None, 0, None
        return self._fork_from(best, best_n), best_n, best.hidden[:best_n]

    def _fork_from(self, entry: Entry, n: int):
        """A new sequence holding ``entry``'s first ``n`` positions; the entry counts as used."""
        entry.used = next(self._clock)
        self._pinned = entry  # the backend may evict to find the new sequence an id: never this one
        try:
            return self.backend.fork(entry.seq, n)
        finally:
            self._pinned = None

    # ---- adding ------------------------------------------------------------------------------
    def adopt(self, scope: str, seq, tokens: list[int], hidden=None) -> bool:
        """Keep a finished (or cancelled) request's sequence, which holds ``tokens``; False
        (and the sequence released) when the cache is off or holds them already. ``hidden``:
        the hidden states of its first len(hidden) positions, kept with it (a feature draft's
        request), or None."""
        length = self.backend.length(seq)
        tokens = list(tokens[:length])
        if not self.enabled or length == 0 or len(tokens) < length:
            self.backend.release(seq)
            return False
        hidden = hidden[:length] if hidden is not None and len(hidden) else None
        node = self._insert(scope, tokens)
        if node.children or node.entry is not None:  # an entry at or below holds every position: nothing new
            keeper = node.entry or newest_below(node)
            if hidden is not None and covers_less(keeper.hidden, hidden):
                keeper.hidden = hidden  # ... but these hidden states it may lack
            self.backend.release(seq)
            self._prune(node)
            return False
        entry = Entry(seq, length, scope, node, next(self._clock), hidden)
        node.entry = entry
        self.entries.append(entry)
        # Entries above this one are prefixes of it: the new one holds their positions (and
        # takes their hidden states where it has fewer).
        up = node.parent
        while up is not None:
            if up.entry is not None:
                if up.entry.hidden is not None and covers_less(entry.hidden, up.entry.hidden):
                    entry.hidden = up.entry.hidden
                self._drop(up.entry)
            up = up.parent
        self._recount()
        while self.tokens > self.max_tokens and self.evict_one():
            pass
        return entry in self.entries

    def _insert(self, scope: str, tokens: list[int]) -> Node:
        node = self.roots.setdefault(scope, Node([], None))
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = Node(tokens[i:], node, depth=i)
                node.children[tokens[i]] = leaf
                return leaf
            run = common_length(child.tokens, tokens, i)
            if run < len(child.tokens):  # split the edge where the new tokens leave it
                mid = Node(child.tokens[:run], node, depth=child.depth)
                node.children[tokens[i]] = mid
                child.tokens, child.parent, child.depth = child.tokens[run:], mid, child.depth + run
                mid.children[child.tokens[0]] = child
                child = mid
            i += run
            node = child
        return node

    # ---- removing ----------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Release the least recently used entry; False when there is none."""
        candidates = [e for e in self.entries if e is not self._pinned]
        if not candidates:
            return False
        self._drop(min(candidates, key=lambda e: e.used))
        self._recount()
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        entry.node.entry = None
        self.backend.release(entry.seq)
        self._prune(entry.node)

    def _prune(self, node: Node) -> None:
        """Remove nodes that lead to no entry any more."""
        while node.parent is not None and not node.children and node.entry is None:
            del node.parent.children[node.tokens[0]]
            node = node.parent

    def _recount(self) -> None:
        if getattr(self.backend, "shares_prefixes", False):
            self.tokens = sum(edge_tokens(root) for root in self.roots.values())
        else:
            self.tokens = sum(e.length for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    # ---- kept across restarts ------------------------------------------------------------------
    def save(self, folder, identity: dict) -> int:
        """Write every entry's KV and tokens to ``folder`` (what was there before goes), least
        recently used first, with an index naming the model; how many were written. Hidden
        states (a feature draft's) are not saved."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("entry-*.kv"):
            old.unlink()
        saved = []
        for i, e in enumerate(sorted(self.entries, key=lambda e: e.used)):
            name = f"entry-{i}.kv"
            if self.backend.save_sequence(e.seq, folder / name, path_tokens(e.node)[:e.length]):
                saved.append({"file": name, "scope": e.scope, "tokens": e.length})
            else:
                log.warning("prefix cache: could not save an entry of %d tokens to %s", e.length, folder / name)
        tmp = folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"version": SAVED_VERSION, "model": identity, "entries": saved}, indent=1))
        os.replace(tmp, folder / INDEX)  # a crash mid-save leaves the old index or the new one, not half
        return len(saved)

    def load(self, folder, identity: dict) -> int:
        """Adopt the entries ``save`` wrote to ``folder`` (none when it has no index, or one for
        another model: said in the log); how many were taken. The bound applies as usual."""
        index = Path(folder) / INDEX
        if not self.enabled or not index.is_file():
            return 0
        try:
            saved = json.loads(index.read_text())
            entries = list(saved["entries"]) if saved.get("version") == SAVED_VERSION else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("prefix cache: %s is unreadable (%s); starting empty", index, e)
            return 0
        if entries is None or saved.get("model") != identity:
            log.warning("prefix cache: %s was saved for another model or version; starting empty", index)
            return 0
        taken = 0
        for item in entries:
            try:
                path, scope, n = Path(folder) / str(item["file"]), str(item["scope"]), int(item["tokens"])
            except (KeyError, TypeError, ValueError):
                continue
            got = self.backend.load_sequence(path, n) if path.is_file() and 0 < n <= self.max_tokens else None
            if got is None:
                log.warning("prefix cache: %s did not load; skipped", path)
                continue
            taken += self.adopt(scope, got[0], got[1])
        return taken


def common_length(edge: list[int], tokens: list[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    for i in range(n):
        if edge[i] != tokens[start + i]:
            return i
    return n


def covers_less(rows, other) -> bool:
    """Hidden states ``rows`` (or None) cover fewer positions than ``other``."""
    return rows is None or len(rows) < len(other)


def path_tokens(node: Node) -> list[int]:
    """The tokens from the root down to the end of ``node``'s edge."""
    runs = []
    while node is not None:
        runs.append(node.tokens)
        node = node.parent
    return [t for run in reversed(runs) for t in run]


def newest_below(node: Node) -> Entry:
    """The most recently used entry at or below ``node`` (there is one: nodes without any are pruned)."""
    best, stack = None, [node]
    while stack:
        n = stack.pop()
        if n.entry is not None and (best is None or n.entry.used > best.used):
            best = n.entry
        stack.extend(n.children.values())
    return best


def edge_tokens(node: Node) -> int:
    total, stack = 0, [node]
    while stack:
        n = stack.pop()
        total += len(n.tokens)
        stack.extend(n.children.values())
    return total
