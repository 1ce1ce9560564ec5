"""ShareGPT parsing and the hidden-state cache (synthetic data: the real file is never fetched here)."""
from __future__ import annotations

import json

import pytest
import torch

from dovetail.testing import make_tiny_model
from dovetail.train_data import (
    extract_features, is_heldout, read_shards, read_sharegpt, split_records, target_hidden, to_messages,
)
from dovetail.workers.hf import CausalLM


def record(i: int, turns=(("human", "hi"), ("gpt", "hello"))) -> dict:
    return {"id": f"conv_{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_read_sharegpt_stops_at_the_cut_off_record(tmp_path):
    text = json.dumps([record(i) for i in range(5)], indent=2)
    cut = text[:text.index('"conv_4"') + 20]  # the package's file ends mid-record like this
    (tmp_path / "full.json").write_text(text)
    (tmp_path / "cut.json").write_text(cut)
    assert [r["id"] for r in read_sharegpt(tmp_path / "full.json")] == [f"conv_{i}" for i in range(5)]
    assert [r["id"] for r in read_sharegpt(tmp_path / "cut.json")] == [f"conv_{i}" for i in range(4)]
    assert len(read_sharegpt(tmp_path / "full.json", limit=2)) == 2


def test_messages_and_heldout_split():
    r = record(0, (("gpt", "orphan"), ("human", "q"), ("bard", "a"), ("user", " "), ("weird", "x")))
    assert to_messages(r) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    records = [record(i) for i in range(2000)] + [record(9999, (("human", "alone"),))]
    train, held = split_records(records)
    assert len(train) + len(held) == 2000  # the one-turn record is dropped
    assert 10 < len(held) < 80  # ~2%
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    # By id, not by position: the split does not move when fewer records are read.
    assert split_records(records[:500])[1] == [r for r in held if int(r["id"][5:]) < 500]
    assert all(is_heldout(r["id"]) for r in held)


@pytest.mark.timeout(60)
def test_extract_features_caches_shards_and_resumes(tmp_path):
    lm = CausalLM.load(str(make_tiny_model(tmp_path / "t", seed=1)), dtype=torch.float32)
    lists = [[(3 * i + j) % 64 for j in range(5 + i)] for i in range(5)]
    folder = tmp_path / "feats"
    first = extract_features(lm, lists, folder, shard_size=2, progress=False)
    assert first["tokens"] == sum(map(len, lists)) and first["tokens_per_s"] > 0
    assert len(list(folder.glob("shard-*.safetensors"))) == 3
    seqs = read_shards(folder)
    assert [s.tokens.tolist() for s in seqs] == lists
    for s, toks in zip(seqs, lists):
        assert s.hidden.dtype == torch.bfloat16
        assert torch.allclose(s.hidden.float(), target_hidden(lm, toks).float(), atol=0.05, rtol=0.02)
    (folder / "shard-00001.safetensors").unlink()  # interrupted before this shard was written
    again = extract_features(lm, lists, folder, shard_size=2, progress=False)
    assert again["tokens"] == len(lists[2]) + len(lists[3])  # only the missing shard is redone
    assert [s.tokens.tolist() for s in read_shards(folder)] == lists
