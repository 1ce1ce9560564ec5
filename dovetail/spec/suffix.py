"""Suffix automata over token ids: where has the text's end been seen before, and what followed.

A suffix automaton of a stream has one state per class of substrings that end at the same
set of positions (their *endpos*). It grows online in amortized O(1) per token, and it
answers the two questions a copy draft asks:

- the longest suffix of the text that occurred earlier too: the suffix link of the state of
  the whole text (``SuffixAutomaton.repeat``), O(1);
- the tokens that followed it, with how often (``cnt`` of each transition's target: the
  number of end positions of "suffix + token", all earlier ones since the text ends here).

Counting end positions online means adding one to every state on the suffix-link path of
the new text. That path is short in any text but a degenerate one (one token repeated
thousands of times makes it as long as the text), so it stops after MAX_COUNT_CHAIN states:
the counts of the shortest, most frequent suffixes of such a text then fall behind, and only
the draft's ranking of their continuations, never its correctness, depends on them.

``Matcher`` follows another stream (a request's text) through an automaton built over other
text (earlier requests' outputs): the longest suffix of the stream that occurs in it, updated
in amortized O(1) per token as in the classic longest-common-substring walk. Several
documents share one automaton when each ends in a separator of its own (a negative id): no
match crosses it.
"""
from __future__ import annotations

MAX_COUNT_CHAIN = 512  # suffix-link states counted per token (see above)


class SuffixAutomaton:
    """The suffix automaton of ``tokens`` (appended with ``extend``), with occurrence counts."""

    def __init__(self):
        self.next: list[dict[int, int]] = [{}]  # state -> {token: state}
        self.link: list[int] = [-1]             # suffix link; the root (state 0) has none
        self.length: list[int] = [0]            # length of the longest string of the state
        self.cnt: list[int] = [0]               # end positions of the state's strings
        self.first: list[int] = [-1]            # the first of them (a text offset)
        self.tokens: list[int] = []
        self.last = 0                           # the state of the whole text

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, token: int) -> None:
        nxt, link, length, cnt = self.next, self.link, self.length, self.cnt
        cur = len(length)
        nxt.append({})
        length.append(length[self.last] + 1)
        link.append(0)
        cnt.append(0)
        self.first.append(len(self.tokens))
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # split q: the clone takes its shorter strings, which now also end here
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                cnt.append(cnt[q])
                self.first.append(self.first[q])
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        self.tokens.append(token)
        v, steps = cur, 0
        while v > 0 and steps < MAX_COUNT_CHAIN:  # every suffix of the text gains this end position
            cnt[v] += 1
            v = link[v]
            steps += 1

    def extend_all(self, tokens) -> None:
        for t in tokens:
            self.extend(t)

    def repeat(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also ends earlier; (0, 0): none."""
        v = self.link[self.last] if self.last else 0
        return max(v, 0), self.length[v] if v > 0 else 0

    def continuations(self, state: int) -> list[tuple[int, int, int]]:
        """(token, count, next state) for what followed the state's strings, most frequent first;
        separators (negative ids) left out."""
        out = [(t, self.cnt[s], s) for t, s in self.next[state].items() if t >= 0]
        out.sort(key=lambda x: -x[1])
        return out


class Matcher:
    """The longest suffix of a stream that occurs in an automaton built over other text."""

    def __init__(self, sam: SuffixAutomaton):
        self.sam = sam
        self.state, self.length = 0, 0

    def feed(self, token: int) -> None:
        nxt, link, length = self.sam.next, self.sam.link, self.sam.length
        v, n = self.state, self.length
        while v > 0 and token not in nxt[v]:
            v = link[v]
            n = length[v]
        if token in nxt[v]:
            v, n = nxt[v][token], n + 1
        else:
            v, n = 0, 0
        self.state, self.length = v, n

    def restart(self, tail) -> None:
        """Match afresh from ``tail``, the stream's last tokens (after the automaton changed)."""
        self.state, self.length = 0, 0
        for t in tail:
            self.feed(t)
