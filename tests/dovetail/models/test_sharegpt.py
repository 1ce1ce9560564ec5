"""ShareGPT parsing and the held-out split (synthetic data: the real file is never fetched here)."""
from __future__ import annotations

import json

import pytest

from dovetail.models.sharegpt import is_heldout, read_sharegpt, split_records, to_messages

pytestmark = pytest.mark.timeout(30)


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
