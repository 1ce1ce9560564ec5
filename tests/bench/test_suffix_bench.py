"""bench.suffix and its workloads: prompt builders on fake data, the summary math on fake
records, argument handling. No model, no server, no download."""
from __future__ import annotations

import pytest

from bench import suffix, suffix_workloads as wl

pytestmark = pytest.mark.timeout(60)

FUNCTION = '''from typing import List


def running_max(numbers: List[int]) -> List[int]:
    """Return the running maximum of numbers.
    >>> running_max([1, 3, 2])
    [1, 3, 3]
    """
'''
BODY = '''    best = None
    out = []
    for n in numbers:
        if best is None or n > best:
            best = n
        out.append(best)
    return out
'''


def problems(count: int = 12, first: int = 95) -> list[dict]:
    return [{"task_id": f"HumanEval/{first + i}", "prompt": FUNCTION, "canonical_solution": BODY,
             "entry_point": "running_max", "test": ""} for i in range(count)]


def sharegpt_records(count: int = 400) -> list[dict]:
    passage = " ".join(f"The harbour crane number {i} lifts heavy containers onto ships every morning."
                       for i in range(25))
    return [{"id": f"conv{i}", "conversations": [{"from": "human", "value": "Tell me about cranes."},
                                                 {"from": "gpt", "value": passage}]} for i in range(count)]


# ---- workloads ------------------------------------------------------------------------------------

def well_formed(prompts: list[dict], workload: str) -> None:
    for p in prompts:
        assert p["workload"] == workload and p["id"]
        assert p["messages"] and p["messages"][-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} and m["content"] for m in p["messages"])


def test_edits_are_held_out_cycle_through_every_kind_and_carry_the_code():
    prompts = wl.edits(6, problems())
    well_formed(prompts, "edits")
    assert [p["id"].split(":")[0] for p in prompts] == [f"HumanEval/{i}" for i in range(100, 106)]
    assert [p["id"].split(":")[1] for p in prompts] == list(wl.EDIT_KINDS)
    rename = prompts[wl.EDIT_KINDS.index("rename")]["messages"][0]["content"]
    assert "Rename the variable numbers to numbers_value" in rename and "for n in numbers:" in rename
    docstring = prompts[wl.EDIT_KINDS.index("docstring")]["messages"][0]["content"]
    assert "running maximum" not in docstring and "return out" in docstring  # the docstring to write is gone
    assert wl.edits(6, problems()) == prompts  # deterministic


def test_multiturn_revises_the_assistants_earlier_answer():
    prompts = wl.multiturn(2, problems())
    well_formed(prompts, "multiturn")
    assert [p["id"] for p in prompts] == ["HumanEval/106", "HumanEval/105"]  # from the top down
    roles = [m["role"] for m in prompts[0]["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert BODY.strip() in prompts[0]["messages"][1]["content"]
    assert "running_max_v2" in prompts[0]["messages"][2]["content"]


def test_retrieval_asks_to_quote_a_held_out_prose_answer():
    from dovetail.models.sharegpt import is_heldout
    prompts = wl.retrieval(2, sharegpt_records())
    well_formed(prompts, "retrieval")
    assert len(prompts) == 2 and all(is_heldout(p["id"].split(":", 1)[1]) for p in prompts)
    text = prompts[0]["messages"][0]["content"]
    assert "Quote, word for word" in text and "what does it say about" in text
    assert wl.topic_word("cats and dogs, cats and dogs; alpha omega") is None  # nothing of 5+ letters recurs
    assert wl.topic_word("Cranes lift. The cranes lift ships; cranes rust.") == "cranes"


def test_chat_labels_the_given_chats():
    prompts = wl.chat(1, [[{"role": "user", "content": "hi there"}], [{"role": "user", "content": "x"}]])
    assert prompts == [{"workload": "chat", "id": "sharegpt:0", "messages": [{"role": "user", "content": "hi there"}]}]


def test_build_refuses_unknown_workloads():
    with pytest.raises(ValueError, match="unknown workload"):
        wl.build(["edits", "poetry"], 1)


# ---- summary math ---------------------------------------------------------------------------------

def rec(system: str, prompt: str, ids: list[int], ttft: float, total: float, first: int = 1,
        workload: str = "edits", rounds: float | None = None, **extra) -> dict:
    n = len(ids)
    return {"system": system, "workload": workload, "prompt_id": prompt, "prompt_key": f"{workload}/{prompt}",
            "token_ids": ids, "text": None, "new_tokens": n, "first_tokens": first, "ttft_s": ttft, "total_s": total,
            "tau_tokens": n - 1, "tau_rounds": n - 1 if rounds is None else rounds, **extra}


def test_decode_speed_counts_only_what_follows_the_first_chunk_over_all_prompts():
    a = rec("x", "p1", list(range(11)), ttft=1.0, total=3.0)             # 10 tokens in 2 s
    b = rec("x", "p2", list(range(21)), ttft=2.0, total=4.0, first=3)    # 18 tokens in 2 s
    assert suffix.decode_speed([a, b]) == pytest.approx(28 / 4)
    assert suffix.all_in_speed([a, b]) == pytest.approx(32 / 7)
    assert suffix.decode_speed([]) == 0.0


def test_summary_ratios_tau_and_identity():
    stop = {99}
    records = [
        rec("llama-plain", "p1", [1, 2, 3, 4, 5], ttft=1.0, total=2.0),                    # 4 tok/s
        rec("dovetail-target-only", "p1", [1, 2, 3, 4, 5, 99], ttft=1.0, total=2.25),
        rec("dovetail-suffix", "p1", [1, 2, 3, 4, 5], ttft=1.0, total=1.5, rounds=2),       # 8 tok/s, tau 2
        rec("other", "p1", [1, 2, 3, 9], ttft=1.0, total=2.0),
        {"system": "broken", "workload": "edits", "prompt_id": "p1", "prompt_key": "edits/p1", "error": "boom"},
    ]
    s = suffix.summarize(records, stop)["edits"]
    assert s["llama-plain"]["x_plain"] == pytest.approx(1.0)
    assert s["dovetail-suffix"]["decode_tok_s"] == pytest.approx(8.0)
    assert s["dovetail-suffix"]["x_plain"] == pytest.approx(2.0)
    assert s["dovetail-suffix"]["tau"] == pytest.approx(2.0)
    assert s["llama-plain"]["same_output"] == 1.0          # equal up to the stop token
    assert s["other"]["same_output"] == 0.0
    assert s["broken"] == {"prompts": 0, "errors": 1}


def test_server_record_uses_the_servers_clock_and_draft_counts():
    res = {"content": "def f(): pass", "tokens": [5, 6, 7], "stop_type": "eos",
           "timings": {"prompt_n": 40, "prompt_ms": 500.0, "predicted_n": 11, "predicted_ms": 1000.0,
                       "draft_n": 12, "draft_n_accepted": 6}}
    r = suffix.server_record(res, wall=1.6)
    assert r["ttft_s"] == pytest.approx(0.5) and r["total_s"] == pytest.approx(1.5)
    assert suffix.decode_speed([r]) == pytest.approx(10.0)  # predicted_n - 1 tokens in predicted_ms
    assert suffix.tau([r]) == pytest.approx(10 / 4)          # 10 tokens after the first, 6 of them drafted
    text_only = {"token_ids": [], "text": "def f(): pass\n"}
    assert suffix.same_output(text_only, {"token_ids": [1], "text": "def f(): pass"}, set())


def test_copy_oracle_on_an_answer_that_repeats_the_prompt():
    prompt = list(range(100, 140))
    records = [rec(suffix.REFERENCE, "p1", prompt[:20] + [7], ttft=1.0, total=2.0)]
    verify_us = [10_000 + 500 * k for k in range(16)]  # cheap extra tokens: copying pays
    o = suffix.copy_oracle(records, {"edits/p1": prompt}, verify_us)["edits"]
    assert o["answer_tokens"] == 21 and o["copy_share"] > 0.8
    assert o["oracle_x_target_only"] > 3


def test_markdown_and_plot_from_a_summary(tmp_path):
    records = [rec("llama-plain", "p1", [1, 2, 3], 1.0, 2.0), rec("dovetail-suffix", "p1", [1, 2, 3], 1.0, 1.5),
               rec(suffix.REFERENCE, "p1", [1, 2, 3], 1.0, 2.0)]
    results = {"machine": {"cpu": "Test CPU"}, "args": {"threads": 2, "max_new_tokens": 3}, "target": "t.gguf",
               "dovetail_defaults_is_suffix": True, "summary": suffix.summarize(records, set()),
               "oracle": suffix.copy_oracle(records, {"edits/p1": [1, 2, 3]}, [1000] * 16)}
    table = suffix.markdown(results)
    assert "## edits" in table and "dovetail-suffix (= Dovetail defaults)" in table and "| 2.00 |" in table
    pytest.importorskip("matplotlib")
    assert suffix.plot_speedups(results["summary"], tmp_path / "s.png").stat().st_size > 0


# ---- arguments ------------------------------------------------------------------------------------

def test_quick_and_defaults():
    args = suffix.resolve_args(suffix.build_parser().parse_args(["--quick", "--threads", "3"]))
    assert (args.prompts, args.max_new_tokens) == (2, 48)
    assert args.workloads == ["edits", "retrieval", "multiturn", "chat"]
    assert args.systems == list(suffix.DEFAULT_SYSTEMS) and "dovetail-suffix" in args.systems
    assert args.out == "bench/results/suffix-3core" and args.target == "qwen2.5-coder-1.5b-instruct"


def test_unknown_names_are_refused():
    parse = suffix.build_parser().parse_args
    with pytest.raises(SystemExit, match="unknown system"):
        suffix.resolve_args(parse(["--systems", "llama-plain,vllm"]))
    with pytest.raises(SystemExit, match="unknown workload"):
        suffix.resolve_args(parse(["--workloads", "edits,poetry"]))


def test_every_flag_has_help():
    for action in suffix.build_parser()._actions:
        assert action.help, action.dest


def test_server_systems_are_skipped_without_a_binary(tmp_path):
    args = suffix.resolve_args(suffix.build_parser().parse_args(
        ["--systems", "llama-plain,server-plain,server-ngram-mod", "--llama-server", str(tmp_path / "none")]))
    systems, planned = suffix.plan(args, tmp_path / "t.gguf", [0], set(), True, tmp_path)
    assert [s.name for s in systems] == ["llama-plain"]
    assert set(planned["skipped"]) == {"server-plain", "server-ngram-mod"}


def test_spec_types_are_read_from_the_servers_help_even_when_wrapped():
    helptext = ("--spec-draft-model FNAME  draft model\n"
                "--spec-type none,draft-simple,ngram-simple,ngram-map-k,ngram-map-k4v,\n"
                "                ngram-mod   comma-separated list of types (default: none)\n"
                "--spec-ngram-cache-static FNAME   the static cache\n")
    assert suffix.spec_types_in_help(helptext) == ["ngram-simple", "ngram-mod", "ngram-map-k", "ngram-map-k4v"]
    assert suffix.spec_types_in_help("--port N  port\n") == []


def test_server_command_carries_the_spec_type_and_extra_flags_only_where_speculating(tmp_path):
    def command(spec):
        server = suffix.ServerSystem("s", "/bin/llama-server", tmp_path / "t.gguf", 2, 4096, spec, False, tmp_path,
                                     ["--spec-ngram-simple-size-n", "3"])
        server.port = 8080
        return server.command()
    plain, spec = command(None), command("ngram-simple")
    assert "--spec-type" not in plain and "--spec-ngram-simple-size-n" not in plain and "--no-repack" in plain
    assert spec[-4:] == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3"]
    assert spec[spec.index("-t") + 1] == "2" and spec[spec.index("--host") + 1] == "127.0.0.1"
