"""Text in and out of the coordinator: prompts to token ids, committed ids to streamed text.

A target may come without a tokenizer (or a remote one whose files are not here): then
prompts are token ids and results carry no text.
"""
from __future__ import annotations

from typing import Iterator

from dovetail.runtime.results import Chunk

# End-of-text and end-of-turn tokens of the model families we run, besides the tokenizer's eos.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")


class Text:
    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def encode_prompt(self, prompt) -> list[int]:
        """Token ids of a text prompt, of chat messages (through the chat template), or ids as given."""
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            self._need_tokenizer("chat messages")
            out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
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

    def chunks(self, rounds: Iterator[list[int]]) -> Iterator[Chunk]:
        """Each round's committed ids with the text they add to what was shown so far."""
        ids: list[int] = []
        shown = ""
        for new in rounds:
            ids.extend(new)
            text = self.decode(ids) or ""
            # Hold back a trailing partial character until the next token completes it.
            if text.endswith("\ufffd"):
                yield Chunk(new, "")
                continue
            yield Chunk(new, text[len(shown):])
            shown = text

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise TypeError(f"{what} needs a tokenizer and none is loaded (this target has none, or it is "
                            "remote and neither target= nor a draft gave one): pass token ids")


def default_stop_ids(tokenizer) -> list[int]:
    """End-of-text and end-of-turn tokens: what the model's generation config usually lists."""
    if tokenizer is None:
        return []
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in STOP_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)
