"""The target's own token at each row of a verification, with torch: the processing of
spec/sampling.py applied to the logits, then the argmax or the (seed, position) draw. The
target worker's side; the coordinator imports only spec/sampling.py (no torch there)."""
from __future__ import annotations

from collections import Counter

import torch

from dovetail.spec.sampling import MIN_LOGPROB, History, Processing, TokenLogprobs, uniform_at
from dovetail.spec.verify import draw_at, target_probs


def processed(logits: torch.Tensor, proc: Processing, history: History, path: list[int]) -> torch.Tensor:
    """One row's logits (float64) after the bias and penalties, with ``path`` (the draft
    tokens between the committed text and this row) counted as output."""
    x = logits.double().clone()
    if not proc.shapes_logits:
        return x
    if proc.logit_bias:
        ids = torch.tensor(list(proc.logit_bias), dtype=torch.long)
        x[ids] += torch.tensor(list(proc.logit_bias.values()), dtype=torch.float64)
    counts = history.counts + Counter(path) if path else history.counts
    if proc.repetition_penalty != 1.0:
        seen = history.seen | set(path) if path else history.seen
        if seen:
            ids = torch.tensor(sorted(seen), dtype=torch.long)
            v = x[ids]
            x[ids] = torch.where(v > 0, v / proc.repetition_penalty, v * proc.repetition_penalty)
    if counts and (proc.frequency_penalty or proc.presence_penalty):
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor(list(counts.values()), dtype=torch.float64)
        x[ids] -= proc.frequency_penalty * n + proc.presence_penalty
    return x


class Picker:
    """The target's own token at each row of one verification: ``pick(row, path)`` processes
    that row for its path's history and takes the argmax or the (seed, position) draw. It
    remembers the log-probabilities of what it picked when the request asked for them."""

    def __init__(self, logits: torch.Tensor, proc: Processing, history: History, seed: int, root_position: int,
                 grammar=None):
        """``grammar``: the request's GrammarState (spec/grammar.py) after the committed text, or
        None; each row's logits are masked for its own path, and ``close()`` puts it back."""
        self.logits, self.proc, self.history, self.seed = logits, proc, history, seed
        self.root_position = root_position  # where the root token sits in prompt + output
        self.cursor = None
        if grammar is not None:
            from dovetail.spec.grammar import PathCursor
            self.cursor = PathCursor(grammar)
        self.plain_greedy = proc.temperature == 0.0 and not proc.shapes_logits and grammar is None
        self._best = logits.argmax(dim=-1).tolist() if self.plain_greedy else None
        self.logprobs: dict[int, TokenLogprobs] = {}  # row -> what its pick had

    def pick(self, row: int, path: list[int]) -> int:
        if self.plain_greedy:
            tok = self._best[row]
        else:
            x = processed(self.logits[row], self.proc, self.history, path)
            if self.cursor is not None:
                from dovetail.spec.grammar import apply_masks
                mask = self.cursor.mask(path)
                if not mask.any():
                    from dovetail.spec.grammar import DeadEnd
                    raise DeadEnd(f"the grammar allows no token of this vocabulary after {len(self.cursor.state)} "
                                  "tokens of output")
                apply_masks(x, mask)
            if self.proc.temperature == 0.0:
                tok = int(x.argmax())
            else:
                # The sample for the position after this row's token: the root's position + 1
                # + the path's length, whatever tree got there.
                u = uniform_at(self.seed, self.root_position + 1 + len(path))
                tok = draw_at(target_probs(x, self.proc.temperature, self.proc.top_p), u)
        if self.proc.logprobs >= 0:
            self.logprobs[row] = token_logprobs(self.logits[row], tok, self.proc.logprobs)
        return tok

    def close(self) -> None:
        """The grammar state back at the committed text (the walk moved it along paths)."""
        if self.cursor is not None:
            self.cursor.close()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """Log-probabilities of the raw model (before penalties, temperature and top_p, as vLLM
    returns them by default)."""
    lp = torch.log_softmax(logits.double(), dim=-1).clamp_(min=MIN_LOGPROB)
    tops = []
    if top:
        values, ids = lp.topk(top)
        tops = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprobs(float(lp[token]), tops)
