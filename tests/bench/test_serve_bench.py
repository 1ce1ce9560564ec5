"""bench.serve, the load generator, end to end against our server on a tiny model."""
import json

import pytest

from bench.serve import main, pct
from tests.dovetail.server.conftest import CHAT_TEMPLATE
from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(300)


def test_percentiles():
    assert pct([], 50) is None and pct([3.0], 99) == 3.0
    assert pct([1.0, 2.0, 3.0], 50) == 2.0
    assert pct([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)


def test_the_load_generator_measures_each_level(tmp_path):
    from transformers import AutoTokenizer
    target = make_tiny_model(tmp_path / "target", seed=0, attention_gain=4.0)
    make_tiny_tokenizer(target)
    tok = AutoTokenizer.from_pretrained(str(target))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(target))
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": c}]}) + "\n"
                               for c in ("def f(x):", "x = [1, 2", "import os")))
    rc = main(["--target", str(target), "--servers", "dovetail", "--concurrency", "1,3", "--requests", "3",
               "--max-tokens", "8", "--prompts-file", str(prompts), "--dovetail-args", "--dtype float64 --no-draft",
               "--out", str(tmp_path / "out"), "--tag", "t"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "t.json").read_text())
    levels = record["servers"]["dovetail"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["ok"] == 3 and not lv["errors"] and 0 < lv["tokens"] <= 24
        assert lv["tokens_per_s"] > 0 and 0 < lv["ttft_p50_s"] <= lv["ttft_p99_s"]
        # our server reports its prefill and verify seconds: what it spends past the prefill, per token
        assert 0 < lv["ttft_past_prefill_p50_s"] < lv["ttft_p99_s"] and lv["verify_s_per_token"] > 0
    assert "| dovetail | 3 | 3/3 |" in (tmp_path / "out" / "t.md").read_text()
