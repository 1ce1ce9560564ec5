"""Text in and out of the coordinator: prompts to token ids, committed ids to streamed text.

A target may come without a tokenizer (or a remote one whose files are not here): then
prompts are token ids and results carry no text.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

from dovetail.runtime.results import Chunk, Stats


class Text:
    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def encode_prompt(self, prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a text prompt, of chat messages (through the chat template), or ids as given.

        ``tools``: OpenAI's tool dicts for a chat template that renders them (apply_chat_template's
        ``tools=``); only with chat messages."""
        chat = isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
        if tools is not None and not chat:
            raise TypeError("tools go with chat messages only")
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            # The tokenizer's own default: a BOS where the model expects one (Llama, Mistral).
            return self.tokenizer.encode(prompt)
        if chat:
            self._need_tokenizer("chat messages")
            extra = {"tools": tools} if tools is not None else {}
            out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **extra)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            return list(prompt)
        raise TypeError("prompt must be text, a list of chat messages ({'role', 'content'}) or a non-empty list of token ids")

    def decode(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chunks(self, rounds: Iterator[list[int]], stop: Sequence[str] = (), stats: Stats | None = None
               ) -> Iterator[Chunk]:
        """Each round's committed ids with the text they add, cut at the first stop string.

        A stop string ends the request: the text stops before it, the ids after the token
        that completed it are not emitted, and ``rounds`` is closed (which ends the request
        on the workers).
        """
        stream = TextStream(self.decode if self.tokenizer is not None else None, stop)
        try:
            for new in rounds:
                chunk = stream.add(new)
                lps = getattr(new, "logprobs", None)
                if lps is not None:  # the ids a stop string cut off lose theirs too
                    chunk.logprobs = lps[:len(chunk.token_ids)]
                yield chunk
                if stream.stopped:
                    if stats is not None:
                        stats.finish_reason, stats.new_tokens = "stop", len(stream.ids)
                    return
            tail = stream.finish()
            if tail:
                yield Chunk([], tail)
        finally:
            close = getattr(rounds, "close", None)  # a generator: its finally ends the request
            if close is not None:
                close()

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise TypeError(f"{what} needs a tokenizer and none is loaded (this target has none, or it is "
                            "remote and neither target= nor a draft gave one): pass token ids")


class TextStream:
    """One request's text, decoded as its tokens are committed and cut at stop strings.

    Each step decodes only a window: the ids since the last emitted piece, after the ids of
    that piece as context (so a tokenizer that drops a leading space at the start of a
    decode still gets the space between pieces right). Text is held back while it ends in a
    partial character, or in what could be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str] = ()):
        self._decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context of the next piece
        self._held = ""
        self.stopped = False

    def add(self, new: list[int]) -> Chunk:
        """The ids and text to emit for newly committed ``new`` (fewer ids once a stop string ends it)."""
        ids, text = [], ""
        for tok in new:
            self.ids.append(tok)
            ids.append(tok)
            piece = self._piece(final=False)
            if piece:
                shown, self.stopped = self._cut(self._held + piece)
                text += shown
                if self.stopped:
                    break
        return Chunk(ids, text)

    def finish(self) -> str:
        """The text still held back when the request ends without a stop string."""
        if self.stopped or self._decode is None:
            return ""
        tail, self._held = self._held + self._piece(final=True), ""
        return tail

    def _piece(self, final: bool) -> str:
        if self._decode is None:
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def _cut(self, text: str) -> tuple[str, bool]:
        """(what may be shown now, whether a stop string was reached); the rest is held."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings as given to generate / stream / submit: a string or a list of them."""
    if stop is None:
        return ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise TypeError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stop
