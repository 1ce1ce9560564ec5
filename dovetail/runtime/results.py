"""What a request returns: its tokens, its text, and how the time was spent."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0          # prompt tokens the target took from its prefix cache, not prefilled
    new_tokens: int = 0
    rounds: int = 0                 # verifications
    prefill_first: int = 0          # 1: the first token came from the prefill's last forward, not a verification
    drafted: int = 0                # draft tokens sent for verification
    draft_rounds: int = 0           # verifications that carried draft tokens
    accepted: int = 0               # tokens committed by verifications (accepted drafts + 1 each)
    accepted_drafts: int = 0        # draft tokens among them
    speculative_hits: int = 0       # overlapped drafts that could be used
    suffix_rounds: int = 0          # verifications that carried the suffix draft's tree
    suffix_drafted: int = 0         # its tokens sent for verification ...
    suffix_accepted: int = 0        # ... and accepted (included in drafted / accepted_drafts)
    seconds: float = 0.0            # wall time of the request, prefill included
    prefill_s: float = 0.0
    draft_s: float = 0.0            # draft worker compute
    verify_s: float = 0.0           # target worker compute (verifications)
    wire_s: float = 0.0             # round trips minus worker compute, where the caller waited
    target_idle_s: float = 0.0
    draft_idle_s: float = 0.0
    draft_fallback: bool = False    # the draft failed and decoding went on with the target alone
    draft_fallback_reason: str = ""  # why: "timeout", "died", "busy", "suspect", "dead" (not probed back), ...
    finish_reason: str = ""
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per round

    @property
    def mean_accepted(self) -> float:
        """τ: tokens committed per verification round (accepted draft tokens + 1)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole request's wall time, prefill included."""
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens over the time after prefill: the part speculation speeds up."""
        decode = self.seconds - self.prefill_s
        return self.new_tokens / decode if decode > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_s:.2f} tok/s; "
                f"{self.rounds} rounds, {self.mean_accepted:.2f} accepted per round"
                + (" (draft failed: target-only)" if self.draft_fallback else ""))


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: Stats
    logprobs: list | None = None  # with logprobs= asked: one TokenLogprobs per token


@dataclass
class Chunk:
    """Tokens committed by one verification round, and the text they completed; with
    ``logprobs=`` asked, one TokenLogprobs (dovetail/spec/sampling.py) per token."""
    token_ids: list[int]
    text: str
    logprobs: list | None = None


class Committed(list):
    """One round's committed token ids (a list), with their TokenLogprobs when asked."""

    def __init__(self, ids, logprobs: list | None = None):
        super().__init__(ids)
        self.logprobs = logprobs
