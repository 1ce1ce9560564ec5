"""The hidden-state cache of draft training (a tiny random target)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_model
from dovetail.training.data import extract_features, read_shards, target_hidden
from dovetail.workers.hf import CausalLM


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
