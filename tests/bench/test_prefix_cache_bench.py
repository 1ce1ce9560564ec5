"""bench.prefix_cache's pure parts and bench.serve's new peer: conversation picking and replay,
the system-prompt builder, the ratio arithmetic, cached-token parsing, server commands. No
model, no server, no download."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import prefix_cache as pc, serve

pytestmark = pytest.mark.timeout(60)

ALL = lambda record_id: True  # noqa: E731  every fake record counts as held out


def record(rid: str, *turns: tuple[str, str]) -> dict:
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def chat(rid: str, users: list[str]) -> dict:
    turns = []
    for i, u in enumerate(users):
        turns += [("human", u), ("gpt", f"answer {i}")]
    return record(rid, *turns)


# ---- conversations ---------------------------------------------------------------------------

def test_conversations_need_three_user_turns_and_short_ones():
    records = [chat("two", ["a", "b"]), chat("three", ["q1", "q2", "q3"]), chat("long", ["x" * 50, "y", "z"]),
               chat("four", ["r1", "r2", "r3", "r4"]), record("empty-turns", ("human", "u1"), ("human", " "),
                                                             ("gpt", "a"), ("human", "u2"))]
    got = pc.pick_conversations(records, n=5, turns=3, max_chars=20, heldout=ALL)
    assert got == [{"id": "three", "users": ["q1", "q2", "q3"]}, {"id": "four", "users": ["r1", "r2", "r3"]}]
    # --turns 2 still asks for three user turns; only the replayed ones must be short
    assert [c["id"] for c in pc.pick_conversations(records, 5, 2, 20, heldout=ALL)] == ["three", "four"]
    assert [c["id"] for c in pc.pick_conversations(records, 5, 4, 20, heldout=ALL)] == ["four"]
    assert [c["id"] for c in pc.pick_conversations(records, 1, 3, 100, heldout=ALL)] == ["three"]
    assert pc.pick_conversations(records, 5, 3, 20, heldout=lambda rid: rid != "three")[0]["id"] == "four"


def test_a_turn_is_every_earlier_message_with_the_actual_replies_then_the_next_user_turn():
    users, replies = ["u1", "u2", "u3"], ["r1", "r2"]
    assert pc.turn_messages(users, [], 0) == [{"role": "user", "content": "u1"}]
    assert pc.turn_messages(users, replies, 2) == [
        {"role": "user", "content": "u1"}, {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "r2"},
        {"role": "user", "content": "u3"}]
    # each turn's request extends the previous one's by its reply and the next user turn
    t1, t2 = pc.turn_messages(users, replies, 1), pc.turn_messages(users, replies, 2)
    assert t2[:len(t1)] == t1
    with pytest.raises(ValueError):
        pc.turn_messages(users, ["r1"], 2)
    with pytest.raises(ValueError):
        pc.turn_messages(users, replies + ["r3"], 3)


def test_replay_orders():
    assert pc.replay_order(2, 3, "conversation") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert pc.replay_order(2, 3, "turn") == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError):
        pc.replay_order(2, 3, "random")


def test_short_questions_are_distinct_first_user_turns():
    records = [record("a", ("gpt", "hi"), ("human", "What is X?")), record("b", ("human", "x" * 300)),
               record("c", ("human", "What is X?")), record("d", ("human", " Why Y? ")), record("e", ("human", "Z"))]
    assert pc.short_questions(records, 2, 200, heldout=ALL) == ["What is X?", "Why Y?"]
    assert pc.short_questions(records, 9, 200, heldout=ALL) == ["What is X?", "Why Y?", "Z"]


def test_common_prefix():
    assert pc.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert pc.common_prefix([], [1]) == 0 and pc.common_prefix([1, 2], [1, 2, 3]) == 2


# ---- the system prompt -----------------------------------------------------------------------

def words(text: str) -> int:
    return len(text.split())


def test_the_system_prompt_is_exactly_the_asked_tokens_of_whole_words():
    docs = [" ".join(f"d{d}w{i}" for i in range(40)) for d in range(5)]
    text, n = pc.build_system_prompt(iter(docs), 100, words, preamble="Read this:\n")
    assert n == 100 == words(text)
    assert text.startswith("Read this:\nd0w0 d0w1") and text.endswith("d2w17")  # 2 + 40 + 40 + 18 words
    assert "d0w39\n\nd1w0" in text and "d3w0" not in text
    # deterministic, and the same when fed in other chunks of the same documents
    assert pc.build_system_prompt(iter(docs), 100, words, preamble="Read this:\n") == (text, n)


def test_a_tokenizer_that_merges_words_still_never_passes_the_budget():
    # tokens = characters / 4 (rounded up): no word count hits the budget exactly
    count = lambda t: -(-len(t) // 4)  # noqa: E731
    docs = ["alpha beta gamma delta " * 30] * 3
    text, n = pc.build_system_prompt(docs, 150, count, preamble="")
    assert n == count(text) <= 150 and count(text + " alpha") > 150 - 2
    assert not text.endswith(" ")


def test_the_system_prompt_needs_enough_text():
    with pytest.raises(ValueError, match="fewer than"):
        pc.build_system_prompt(["one two three"], 10, words, preamble="")
    with pytest.raises(ValueError, match="preamble"):
        pc.build_system_prompt(["one two three"], 2, words, preamble="a b c")


# ---- ratios --------------------------------------------------------------------------------

def turns(ttfts: dict) -> list[dict]:
    return [{"conversation": c, "turn": t, "ttft_s": v} for (c, t), v in ttfts.items()]


def test_turn_ratios_pair_the_same_chat_and_turn_and_skip_turn_one():
    cache = turns({("a", 1): 2.0, ("a", 2): 0.1, ("a", 3): 0.3, ("b", 1): 2.0, ("b", 2): 0.2, ("b", 3): None})
    no_cache = turns({("a", 1): 2.0, ("a", 2): 2.0, ("a", 3): 3.0, ("b", 2): 4.0, ("b", 3): 5.0, ("c", 2): 9.0})
    r = pc.compare_turns(cache, no_cache)
    assert r["pairs"] == 3  # a2, a3, b2 (b3 failed with the cache, c2 never ran with it)
    assert r["median_s"] == [pytest.approx(0.2), pytest.approx(3.0)]
    assert r["ratio_of_medians"] == pytest.approx(0.2 / 3.0)
    assert r["ratio_of_sums"] == pytest.approx(0.6 / 9.0)
    assert r["median_pair_ratio"] == pytest.approx(0.05)  # 0.05, 0.1, 0.05
    assert r["passed"] is True and r["bar"] == pc.BAR_TURNS
    slow = pc.compare_turns(turns({("a", 2): 1.0}), turns({("a", 2): 2.0}))
    assert slow["ratio_of_medians"] == 0.5 and slow["passed"] is False
    none = pc.compare_turns(turns({("a", 1): 1.0}), turns({("a", 1): 2.0}))
    assert none["pairs"] == 0 and none["ratio_of_medians"] is None and none["passed"] is False


def test_shared_prompt_sums_with_and_without_the_warming_first_request():
    cache, no_cache = [3.0, 0.2, 0.2, None, 0.2], [3.0, 3.0, 3.0, 3.0, 3.0]
    r = pc.compare_shared(cache, no_cache)
    assert r["all"]["requests"] == 4 and r["all"]["sum_s"] == [pytest.approx(3.6), pytest.approx(12.0)]
    assert r["all"]["ratio"] == pytest.approx(0.3) and r["all"]["passed"] is False
    assert r["first_excluded"]["requests"] == 3
    assert r["first_excluded"]["ratio"] == pytest.approx(0.6 / 9.0) and r["first_excluded"]["passed"] is True
    assert pc.compare_shared([None], [1.0])["all"] == {"requests": 0, "sum_s": [None, None], "ratio": None,
                                                      "passed": False}


def test_summary_and_table_cover_every_arm():
    arm = lambda ttft, shared: {"turns": turns({("a", 1): 2.0, ("a", 2): ttft}),  # noqa: E731
                                "shared": [{"request": i + 1, "ttft_s": v, "cached_tokens": None}
                                           for i, v in enumerate(shared)]}
    arms = {"dovetail": arm(0.1, [1.0, 0.1]), "dovetail-no-cache": arm(2.0, [1.0, 1.0]),
            "llama-server": arm(0.5, [1.0, 0.5])}
    info = {(0, 0): {"prompt_tokens": 100, "new_tokens": 100}, (0, 1): {"prompt_tokens": 200, "new_tokens": 20}}
    s = pc.summarize(arms, info)
    assert s["dovetail / dovetail-no-cache"]["turns"]["ratio_of_medians"] == pytest.approx(0.05)
    assert s["dovetail / llama-server"]["shared"]["first_excluded"]["ratio"] == pytest.approx(0.2)
    assert s["ideal_ratio_turns"] == pytest.approx(0.1)
    result = {"machine": {"cpu": "X", "cpus": [0, 1]}, "target": "m.gguf", "arms": arms, "summary": s,
              "args": {"turns": 2, "order": "conversation", "reply_tokens": 8, "max_tokens": 4},
              "prompts": {"conversations": [{"id": "a"}], "questions": ["q1", "q2"], "system_prompt_tokens": 50,
                          "turn_prompts": [{"conversation": "a", "turn": 1, "prompt_tokens": 100, "new_tokens": 100},
                                           {"conversation": "a", "turn": 2, "prompt_tokens": 200, "new_tokens": 20}],
                          "shared_prompt_tokens": [60, 61]}}
    md = pc.markdown(result)
    assert "| a | 2 | 200 | 20 | 100 ms | - | 2000 ms | - | 500 ms | - |" in md
    assert "| dovetail-no-cache | 0.050 (1 pairs) | 0.050 | 0.050 | 0.550 | 0.100 |" in md
    lines = pc.verdict_lines(s)
    assert "PASS" in lines[0] and "all 0.550 (FAIL), first excluded 0.100 (PASS)" in lines[1]


# ---- servers ---------------------------------------------------------------------------------

def test_cached_tokens_from_each_servers_report():
    assert serve.cached_tokens_of({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}}) == 7
    assert serve.cached_tokens_of({"dovetail": {"cached_tokens": 5}}) == 5
    assert serve.cached_tokens_of({"timings": {"cache_n": 3, "prompt_n": 4}}) == 3
    assert serve.cached_tokens_of({"usage": {"prompt_tokens": 9}, "choices": []}) is None
    assert serve.cached_tokens_of({"usage": {"prompt_tokens_details": None}}) is None
    assert serve.cached_tokens_of({"usage": {"prompt_tokens_details": {"cached_tokens": 0}}}) == 0


def test_server_commands_share_gguf_threads_and_context(tmp_path):
    gguf, cpus = Path("/m.gguf"), [2, 3, 5]
    ours = serve.server_command("dovetail", gguf, cpus, 8001, max_active=4, n_ctx=4096, dovetail_args="--no-draft")
    assert ours[-3:] == ["--target-cpus", "2-3,5", "--no-draft"] or ours[-1] == "--no-draft"
    assert "--no-prefix-cache" not in ours
    off = serve.server_command("dovetail-no-cache", gguf, cpus, 8001, max_active=4, n_ctx=4096,
                               dovetail_args="--no-draft")
    assert off[-2:] == ["--no-draft", "--no-prefix-cache"]
    assert serve.server_command("dovetail-no-cache", gguf, cpus, 1, max_active=1, n_ctx=1, no_cache_args="")[-1] \
        != "--no-prefix-cache"
    ls = serve.server_command("llama-server", gguf, cpus, 8002, max_active=4, n_ctx=4096, llama_server="/bin/ls-srv",
                              extra_buffers=False, llama_server_args="--cache-reuse 256")
    assert ls[0] == "/bin/ls-srv" and ls[ls.index("-t") + 1] == "3" and ls[ls.index("-tb") + 1] == "3"
    assert ls[ls.index("-c") + 1] == "4096" and ls[ls.index("--port") + 1] == "8002" and "--no-repack" in ls
    assert ls[-2:] == ["--cache-reuse", "256"] and ls[ls.index("--alias") + 1] == serve.SERVED
    assert "--no-repack" not in serve.server_command("llama-server", gguf, cpus, 1, max_active=1, n_ctx=1)
    py = serve.server_command("llama-cpp-python", gguf, cpus, 8003, max_active=4, n_ctx=4096)
    assert py[py.index("--n_threads") + 1] == "3" and py[py.index("--n_ctx") + 1] == "4096"
    with pytest.raises(ValueError):
        serve.server_command("vllm", gguf, cpus, 1, max_active=1, n_ctx=1)
    assert serve.ready_path("llama-server") == "/health" and serve.ready_path("dovetail") == "/v1/models"
    assert "build_llama_server.sh" in serve.missing_server("llama-server", tmp_path / "nope")
    assert serve.missing_server("dovetail", tmp_path / "nope") is None


def test_the_cache_arms_differ_only_by_their_cache_flags(monkeypatch):
    args = pc.build_parser().parse_args(["--dovetail-args=--no-draft", "--cache-args", "--prefix-cache-tokens 9"])
    assert args.conversations == 8 and args.turns == 3 and args.system_tokens == 1000 and args.requests == 8
    assert args.max_tokens == 32 and args.no_cache_args == "--no-prefix-cache"
    on = pc.arm_command(pc.CACHE_ARM, Path("/m.gguf"), [0, 1], 9000, args)
    off = pc.arm_command(pc.NO_CACHE_ARM, Path("/m.gguf"), [0, 1], 9000, args)
    assert on[-3:] == ["--no-draft", "--prefix-cache-tokens", "9"] and off[-2:] == ["--no-draft", "--no-prefix-cache"]
    assert on[:-3] == off[:-2]
    monkeypatch.setattr(serve, "extra_buffers_for", lambda gguf, threads: True)
    peer = pc.arm_command("llama-server-no-cache", Path("/m.gguf"), [0, 1], 9000,
                          argparse.Namespace(**{**vars(args), "llama_server": "/x/llama-server"}))
    assert peer[0] == "/x/llama-server" and peer[-1] == "--no-cache-prompt"
