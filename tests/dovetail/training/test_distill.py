"""Self-distillation bookkeeping (dovetail/training/distill.py) on a deterministic toy backend.

The toy "model" makes the next token a function of the whole prefix and the hidden state
of a position a function of the prefix up to it, so an answer mixed up with another
sequence's rows, shifted by one position or cut short shows in the tokens or the states.
"""
from __future__ import annotations

import pytest
import torch

from dovetail.training.distill import answer_many, code_prompts, generate_corpus, greedy_with_hidden, read_answers
from dovetail.workers.hf import Forward

pytestmark = pytest.mark.timeout(60)

VOCAB, HIDDEN, STOP = 17, 3, 0


def state(prefix: list[int]) -> torch.Tensor:
    h = 0
    for t in prefix:
        h = (h * 31 + t + 1) % 10007
    return torch.tensor([float(h), float(len(prefix)), float(prefix[-1])])


def logits(prefix: list[int]) -> torch.Tensor:
    out = torch.zeros(VOCAB)
    out[int(state(prefix)[0]) % VOCAB] = 1.0
    return out


class ToyBackend:
    """new_sequence / prefill / verify(chain of the root) / keep / step_many / release."""

    def __init__(self):
        self.seqs: dict[int, list[int]] = {}
        self.next_id, self.calls = 0, []

    def new_sequence(self):
        self.next_id += 1
        self.seqs[self.next_id] = []
        return self.next_id

    def release(self, seq):
        del self.seqs[seq]

    def length(self, seq):
        return len(self.seqs[seq])

    def prefill(self, seq, tokens, hidden=True):
        rows = []
        for t in tokens:
            self.seqs[seq].append(t)
            rows.append(state(self.seqs[seq]))
        return torch.stack(rows)

    def verify(self, seq, root, tokens, parents, hidden=True):
        assert tokens == []
        self.seqs[seq].append(root)
        return Forward(logits=logits(self.seqs[seq])[None], hidden=state(self.seqs[seq])[None])

    def keep(self, seq, start, rows):
        assert rows == [0] and len(self.seqs[seq]) == start + 1

    def step_many(self, seqs, tokens, hidden=True):
        self.calls.append(len(seqs))
        for s, t in zip(seqs, tokens):
            self.seqs[s].append(t)
        return Forward(logits=torch.stack([logits(self.seqs[s]) for s in seqs]),
                       hidden=torch.stack([state(self.seqs[s]) for s in seqs]))


PROMPTS = [[3, 5, 7], [4], [9, 9, 2, 1, 8], [6, 1], [2, 2], [11, 12, 13]]


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_side_by_side_answers_equal_one_by_one_answers(width):
    ref_backend = ToyBackend()
    refs = [greedy_with_hidden(ref_backend, p, 9, {STOP}) for p in PROMPTS]
    backend, got = ToyBackend(), {}
    answer_many(backend, dict(enumerate(PROMPTS)), 9, {STOP}, width, got.__setitem__)
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, ref in enumerate(refs):
        assert got[i].tokens.tolist() == ref.tokens.tolist()
        assert got[i].prompt_len == ref.prompt_len == len(PROMPTS[i])
        assert torch.equal(got[i].hidden, ref.hidden)
        assert len(got[i].hidden) == len(got[i].tokens)
    assert max(backend.calls) == min(width, len(PROMPTS))
    assert backend.seqs == {}  # every sequence released


def test_answers_stop_at_a_stop_token_or_the_length_cap():
    backend, got = ToyBackend(), {}
    answer_many(backend, dict(enumerate(PROMPTS)), 9, {STOP}, 3, got.__setitem__)
    for i, a in got.items():
        answer = a.tokens.tolist()[a.prompt_len:]
        assert len(answer) == 9 or answer[-1] == STOP
        assert STOP not in answer[:-1]


def test_a_failing_step_releases_every_open_sequence():
    class Failing(ToyBackend):
        def step_many(self, seqs, tokens, hidden=True):
            if len(self.calls) == 3:
                raise RuntimeError("decode failed")
            return super().step_many(seqs, tokens, hidden)
    backend = Failing()
    with pytest.raises(RuntimeError, match="decode failed"):
        answer_many(backend, dict(enumerate(PROMPTS)), 9, {STOP}, 4, lambda i, a: None)
    assert backend.seqs == {}


def test_corpus_shards_are_complete_and_resume(tmp_path):
    stats = generate_corpus(ToyBackend(), PROMPTS, tmp_path, 6, {STOP}, shard_size=4, width=3, progress=False)
    assert stats["answered"] == len(PROMPTS)
    back = read_answers(tmp_path)
    assert [a.tokens.tolist()[:a.prompt_len] for a in back] == PROMPTS  # prompt order, across shards
    (tmp_path / "shard-00001.safetensors").unlink()
    again = generate_corpus(ToyBackend(), PROMPTS, tmp_path, 6, {STOP}, shard_size=4, width=3, progress=False)
    assert again["answered"] == 2  # only the missing shard's prompts
    assert [a.tokens.tolist() for a in read_answers(tmp_path)] == [a.tokens.tolist() for a in back]


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def block(lang: str, n: int) -> str:
    return f"```{lang}\n" + "\n".join(f"line{i}" for i in range(n)) + "\n```"


def test_code_prompts_take_the_first_third_of_the_first_long_python_block():
    records = [
        {"conversations": [{"from": "human", "value": block("python", 9)},   # a user's block: not the target's style
                           {"from": "gpt", "value": "see " + block("js", 12) + block("python", 3)}]},  # too short
        {"conversations": [{"from": "gpt", "value": "x " + block("python", 9) + block("python", 30)}]},
        {"conversations": [{"from": "gpt", "value": block("py", 6)}]},
        {"conversations": [{"from": "gpt", "value": block("python", 12)}]},
    ]
    got = ["".join(map(chr, p)) for p in code_prompts(CharTokenizer(), records, limit=2)]
    assert got == ["line0\nline1\nline2\n", "line0\nline1\n"]  # one per conversation, limit kept
    capped = code_prompts(CharTokenizer(), records[1:2], limit=5, max_tokens=4)
    assert capped == [[ord(c) for c in "line"]]
