"""python -m bench end to end on tiny models with a character tokenizer (float64, CPU)."""
import json

import pytest

from bench.__main__ import main
from dovetail.testing import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    for path in (target, draft):
        make_tiny_tokenizer(path)
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "for i in range(3):"}\n')
    out = root / "out"
    rc = main(["--target", str(target), "--draft", str(draft), "--prompts-file", str(prompts), "--prompts", "2",
               "--max-new-tokens", "10", "--dtype", "float64", "--draft-device", "cpu", "--out", str(out),
               "--depth", "3"])  # a fixed shape: tiny drafts cost as much as tiny targets, auto would not draft
    assert rc == 0
    return json.loads((out / "results.json").read_text()), out


def test_every_system_runs_every_prompt(run):
    results, _ = run
    for mode in ("greedy", "sample"):
        systems = results["modes"][mode]
        assert set(systems) == {"target-only", "dovetail[draft]", "hf-assisted[draft]"}  # no GGUF: no llama.cpp
        for recs in systems.values():
            assert [r["new_tokens"] for r in recs] == [10, 10]  # exactly max_new_tokens, end-of-text ignored
            assert all(r["seconds"] > 0 for r in recs)


def test_greedy_outputs_agree_and_speculation_happened(run):
    results, _ = run
    summary = results["summary"]["greedy"]
    assert summary["dovetail[draft]"]["identical_to_target_only"] == "2/2"
    assert summary["hf-assisted[draft]"]["identical_to_target_only"] == "2/2"
    assert summary["dovetail[draft]"]["mean_accepted"] > 1.5  # a near-copy draft is mostly accepted
    assert summary["target-only"]["mean_accepted"] == 1.0
    assert "hf-assisted[draft]" in summary["dovetail[draft]"]["speedup_vs"]


def test_table_and_plots_are_written(run):
    results, out = run
    table = (out / "results.md").read_text()
    assert "| dovetail[draft] |" in table and "× hf-assisted[draft]" in table
    for name in ("tokens_per_s-greedy", "accepted_length-greedy", "round_breakdown-sample"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
