"""What the target draws at each position: its logits, processed as the request asks, then
the argmax or one draw from a stream keyed by (seed, position). The settings and the rules
are here, without torch (the coordinator imports them); spec/picker.py applies them.

Penalties, a logit bias and a grammar (spec/grammar.py) are deterministic functions of the text so
far. Applied to the target's logits at every tree node, each node with its own path's
history, they make speculation exact with respect to decoding with the target alone under
the same processing (spec/verify.py's accept_path walks the tree).

A seed means the same text with or without a draft: the sample at absolute position p uses
the uniform number ``uniform_at(seed, p)`` whatever the tree looked like, and the draft child
equal to that sample is accepted. For point-mass drafts (all of ours) that accepts with the
children's total mass, as recursive rejection sampling does, and commits a token distributed
exactly as the target's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dovetail.protocol import MAX_TOP_LOGPROBS  # OpenAI's bound on top_logprobs, also the wire's

MIN_LOGPROB = -9999.0  # what OpenAI reports for a token of (about) zero probability: finite, for JSON
_MASK64 = (1 << 64) - 1


def uniform_at(seed: int, position: int) -> float:
    """A uniform number in [0, 1) that depends on (seed, position) alone: splitmix64 of the
    pair, 53 bits. The same on every machine, whatever else was drawn before."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


@dataclass
class Processing:
    """One request's sampling settings, as OpenAI (and vLLM's repetition_penalty) name them.

    Order, as vLLM applies them: the bias, the repetition penalty (on prompt and output
    tokens), the frequency and presence penalties (on output tokens), then temperature and
    top_p. logprobs: -1 none; 0 the chosen token's; k also the k most likely (raw logits)."""
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int = -1
    grammar: str = ""  # llguidance's grammar text (spec/grammar.py grammar_text); "" for none

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not -1 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [-1, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature and top_p acts on the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.grammar)


class History:
    """The text so far as the penalties see it: output token counts, and every token of
    prompt and output (the repetition penalty's set). Only committed tokens go in: nothing
    of a rejected branch ever does."""

    def __init__(self, prompt: list[int]):
        self.counts: Counter[int] = Counter()
        self.seen: set[int] = set(prompt)

    def commit(self, tokens: list[int]) -> None:
        self.counts.update(tokens)
        self.seen.update(tokens)


@dataclass
class TokenLogprobs:
    """The raw model's log-probabilities at one committed position: of the chosen token, and
    the top ones (most likely first) when asked."""
    logprob: float
    top: list[tuple[int, float]]
