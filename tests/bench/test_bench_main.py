"""python -m bench end to end on tiny models with a character tokenizer (float64, CPU)."""
import json

import pytest

from bench.__main__ import main
from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    for path in (target, draft):
        make_tiny_tokenizer(path)
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "for i in range(3):"}\n')
    return root, ["--target", str(target), "--draft", str(draft), "--prompts-file", str(prompts), "--prompts", "2",
                  "--max-new-tokens", "10", "--dtype", "float64", "--draft-device", "cpu",
                  "--depth", "3"]  # a fixed shape: tiny drafts cost as much as tiny targets, auto would not draft


@pytest.fixture(scope="module")
def run(models):
    root, argv = models
    out = root / "out"
    assert main([*argv, "--out", str(out)]) == 0
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


def test_interleaved_systems_take_turns_and_give_the_same_tokens(run, models):
    root, argv = models
    out = root / "interleaved"
    assert main([*argv, "--out", str(out), "--interleave", "--modes", "greedy",
                 "--systems", "target-only,dovetail"]) == 0
    turns = json.loads((out / "results.json").read_text())["modes"]["greedy"]
    assert set(turns) == {"target-only", "dovetail[draft]"}
    for name, recs in turns.items():
        assert [r["token_ids"] for r in recs] == [r["token_ids"] for r in run[0]["modes"]["greedy"][name]]


def test_run_mode_order_and_cleanup():
    from bench.__main__ import run_mode
    log = []

    def fake(prompts, max_new, temperature, seed, *, name):
        try:
            for i, _ in enumerate(prompts):
                log.append((name, i))
                yield {"i": i}
        finally:
            log.append((name, "closed"))

    class Bar:
        def set_postfix_str(self, s): pass
        def update(self, n): pass

    runs = [("a", fake, {"name": "a"}), ("b", fake, {"name": "b"})]
    out = run_mode(runs, [[1], [2]], 4, 0.0, 0, True, Bar(), "greedy")
    assert out == {"a": [{"i": 0}, {"i": 1}], "b": [{"i": 0}, {"i": 1}]}
    assert log[:4] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)] and set(log[4:]) == {("a", "closed"), ("b", "closed")}
    log.clear()
    run_mode(runs, [[1], [2]], 4, 0.0, 0, False, Bar(), "greedy")
    assert log == [("a", 0), ("a", 1), ("a", "closed"), ("b", 0), ("b", 1), ("b", "closed")]


def test_the_llama_cpp_extra_buffer_setting_is_shared_and_recorded(tmp_path):
    """--llama-extra-buffers: resolved once for the llama.cpp peer, passed to our llama.cpp
    workers, and said in results.json and the table's first line."""
    import os

    from bench import report
    from bench.__main__ import build_parser, llama_buffers, plan
    if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
        pytest.importorskip("llama_cpp")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    args = build_parser().parse_args(["--target", str(gguf), "--draft", "d", "--systems", "target-only,llama.cpp",
                                      "--backends", "llama.cpp", "--llama-extra-buffers", "off"])
    buffers = llama_buffers(args)  # forced: no probe
    assert buffers.record() == {"setting": "off", "extra_buffers": False, "verdict": None}
    runs = {name: kwargs for name, _, kwargs in plan(args, "cpu", buffers)}
    assert runs["llama.cpp"]["extra_buffers"] is False
    assert runs["target-only @llama.cpp"]["llama_extra_buffers"] == "off"
    args.backends, args.systems = "transformers", "target-only"
    assert llama_buffers(args) is None  # nothing on llama.cpp: nothing to record
    results = {"machine": "m", "date": "d", "prompt_lengths": [1], "args": {"max_new_tokens": 1},
               "draft_device": "cpu", "summary": {}, "llama_extra_buffers": buffers.record()}
    assert "llama.cpp extra buffers: off (--llama-extra-buffers off)" in report.markdown(results)
