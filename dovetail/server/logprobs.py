"""Log-probabilities in OpenAI's two shapes: chat's ``{"content": [...]}`` and the legacy
completions' parallel lists. The numbers are the target's own (dovetail/spec/sampling.py:
the raw model's, before penalties, temperature and top_p), one entry per committed token.
"""
from __future__ import annotations

from functools import lru_cache

from dovetail.spec.sampling import TokenLogprobs

SPIECE_SPACE = "\u2581"  # sentencepiece's word boundary


class TokenText:
    """A token's text and exact bytes: byte-level BPE pieces (Qwen, Llama 3) map back through
    GPT-2's byte table, sentencepiece pieces through their space marker and <0xNN> bytes, so
    a token that is half of a UTF-8 character still reports its own bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = byte_decoder()
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.bytes_of = lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if token_id not in self.special:
            if all(c in self.byte_of for c in piece):
                return bytes(self.byte_of[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
        return piece.replace(SPIECE_SPACE, " ").encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def chat_logprobs(entries: list[TokenLogprobs], ids: list[int], tokens: TokenText) -> dict:
    def item(tid: int, lp: float) -> dict:
        raw = tokens.bytes_of(tid)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {"content": [{**item(tid, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for tid, e in zip(ids, entries)], "refusal": None}


def completion_logprobs(entries: list[TokenLogprobs], ids: list[int], tokens: TokenText, offset: int = 0) -> dict:
    """The legacy shape; ``offset``: characters of text before these tokens (text_offset)."""
    texts = [tokens.text(t) for t in ids]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    tops = [{tokens.text(t): v for t, v in e.top} for e in entries]
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}
