"""dovetail-train's argument checks and data selection (no model runs here)."""
from __future__ import annotations

import pytest
import torch

from dovetail.training.distill import Answered, read_answers, write_answers
from dovetail.draft.model import TargetIdentity
from dovetail.training.cli import answers_dir, problem_range, training_data
from dovetail.training.data import Sequence, features_dir, write_shard

IDENT = TargetIdentity(arch="qwen2", hidden_size=4, vocab_size=50, tokenizer_hash="abc", name="t.gguf")


def test_problem_ranges_are_checked():
    assert problem_range("40:164") == (40, 164)
    for bad in ("40", "a:b", "10:5", "0:165", "-1:3"):
        with pytest.raises(SystemExit):
            problem_range(bad)


def test_answers_round_trip_and_read_as_training_sequences(tmp_path):
    items = [Answered(torch.tensor([1, 2, 3, 4]), torch.randn(4, 4), 2),
             Answered(torch.tensor([5, 6, 7]), torch.randn(3, 4), 1)]
    folder = answers_dir(IDENT, tmp_path, 40, 164, 16)
    folder.mkdir(parents=True)
    write_answers(folder / "shard-00000.safetensors", items)
    back = read_answers(folder)
    assert [a.prompt_len for a in back] == [2, 1]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(items, back))
    assert all(torch.allclose(a.hidden, b.hidden.float(), atol=0.05) for a, b in zip(items, back))  # bf16
    write_shard(features_dir(IDENT, tmp_path) / "shard-00000.safetensors",
                [Sequence(torch.tensor([9, 8]), torch.zeros(2, 4))])
    data = training_data("sharegpt,humaneval:40:164", IDENT, tmp_path, 16)
    assert [s.tokens.tolist() for s in data] == [[9, 8], [1, 2, 3, 4], [5, 6, 7]]


def test_training_data_refuses_the_evaluation_problems_and_unknown_sources(tmp_path):
    with pytest.raises(SystemExit, match="evaluation set"):
        training_data("humaneval:0:164", IDENT, tmp_path, 16)
    with pytest.raises(SystemExit, match="unknown source"):
        training_data("wikipedia", IDENT, tmp_path, 16)
    with pytest.raises(SystemExit, match="extract --source humaneval --problems 40:164"):
        training_data("humaneval:40:164", IDENT, tmp_path, 16)


def test_code_answers_are_a_training_source(tmp_path):
    from dovetail.training.cli import code_answers_dir
    with pytest.raises(SystemExit, match="extract --source sharegpt-code --code-prompts 800 --max-new-tokens 16"):
        training_data("sharegpt-code:800", IDENT, tmp_path, 16)
    for bad in ("sharegpt-code:", "sharegpt-code:x", "sharegpt-code:0"):
        with pytest.raises(SystemExit, match="number of code prompts"):
            training_data(bad, IDENT, tmp_path, 16)
    folder = code_answers_dir(IDENT, tmp_path, 800, 16)
    folder.mkdir(parents=True)
    write_answers(folder / "shard-00000.safetensors", [Answered(torch.tensor([1, 2, 3]), torch.randn(3, 4), 2)])
    assert [s.tokens.tolist() for s in training_data("sharegpt-code:800", IDENT, tmp_path, 16)] == [[1, 2, 3]]
