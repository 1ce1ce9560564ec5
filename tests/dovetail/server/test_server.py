"""dovetail-launch serve end to end: the real server in a subprocess, the official openai
client and raw HTTP, tiny float64 models (greedy output must be exact)."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import openai
import pytest

import dovetail
from tests.dovetail.server.conftest import API_KEY

pytestmark = pytest.mark.timeout(600)

MESSAGES = [{"role": "user", "content": "def f(x):"}]
N = 24


@pytest.fixture(scope="module")
def server(serve_factory, chat_models):
    target, draft = chat_models
    # a fixed tree: the tiny target's measured verify curve could make the sizer draft nothing
    return serve_factory("--target", target, "--draft", draft, "--force-draft", "--dtype", "float64",
                         "--draft-gpu", "cpu", "--depth", "3", "--top-k", "2", "--max-nodes", "6",
                         "--api-key", API_KEY, "--api-key", "second-key-456789", "--max-active", "4",
                         "--max-pending", "80", "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(chat_models):
    """The library API, target alone: what every greedy answer must be."""
    with dovetail.launch(chat_models[0], None, dtype="float64") as coord:
        chat = coord.generate(MESSAGES, max_new_tokens=N)
        plain = coord.generate("def f(x):", max_new_tokens=N)
        prompts = {p: coord.generate([{"role": "user", "content": p}], max_new_tokens=N).text
                   for p in PROMPTS}
        return {"chat": chat, "chat_prompt_len": len(coord.encode_prompt(MESSAGES)), "plain": plain,
                "plain_prompt_len": len(coord.encode_prompt("def f(x):")), "prompts": prompts}


PROMPTS = ["def f(x):", "x = [1, 2", "import os\n", "print('a')", "class A:", "for i in", "y = f(", "# sum\n"]


def sse_events(body: bytes) -> list:
    """The data fields of an SSE body, JSON-decoded except the final [DONE]."""
    out = []
    for line in body.decode().split("\n"):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_greedy_text_through_http_is_the_target_only_text(client, reference):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    ref = reference["chat"]
    assert chat.choices[0].message.content == ref.text and chat.choices[0].finish_reason == ref.stats.finish_reason
    assert chat.usage.completion_tokens == len(ref.token_ids)
    assert chat.usage.prompt_tokens == reference["chat_prompt_len"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    extra = chat.model_extra["dovetail"]
    assert extra["rounds"] >= 1 and extra["drafted"] > 0 and not extra["draft_fallback"]  # the draft was used
    # (the first token came from the prefill: no round)
    assert extra["mean_accepted_length"] == pytest.approx((len(ref.token_ids) - 1) / extra["rounds"], abs=1e-3)
    plain = client.completions.create(model="tiny", prompt="def f(x):", temperature=0, max_tokens=N)
    assert plain.choices[0].text == reference["plain"].text
    assert plain.usage.prompt_tokens == reference["plain_prompt_len"]
    # max_completion_tokens wins over max_tokens
    short = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N,
                                           max_completion_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"


def test_streamed_text_equals_the_whole_and_one_chunk_finishes(client, server, reference):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == reference["chat"].stats.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["chat"].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference["chat"].token_ids)
    assert chunks[-1].usage.prompt_tokens == reference["chat_prompt_len"]
    status, headers, body = server.request("POST", "/v1/completions", {
        "model": "tiny", "prompt": "def f(x):", "temperature": 0, "max_tokens": N, "stream": True})
    events = sse_events(body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]" and sum(e["choices"][0]["finish_reason"] is not None for e in events[:-1]) == 1
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference["plain"].text
    assert all("usage" not in e for e in events[:-1])  # no include_usage: no usage chunk


def test_stop_strings_hold_streamed_and_not(client, reference):
    text = reference["chat"].text
    stop = text[6:8]
    want = text[:text.index(stop)]
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N, stop=stop)
    assert whole.choices[0].message.content == want and whole.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N,
                                              stop=[stop, "never seen"], stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_seeded_sampling_repeats_and_differs_by_seed(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, top_p=0.9,
                                              max_tokens=N, seed=seed).choices[0].message.content
    a = sample(7)
    assert a == sample(7)
    assert sample(-7) == sample(-7)  # OpenAI's seeds are int64
    assert any(sample(s) != a for s in (8, 9, 10))


ERRORS = [
    # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"model": "tiny", "messages": []}, 400, "messages", "messages"),
    ({"model": "tiny"}, 400, "messages", "messages"),
    ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "n", "one choice"),
    ({"model": "tiny", "messages": MESSAGES, "logit_bias": {"x": 10}}, 400, "logit_bias", "token ids"),
    ({"model": "tiny", "messages": MESSAGES, "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ({"model": "tiny", "messages": MESSAGES, "logit_bias": {"999999": 1}}, 400, None, "outside the vocabulary"),
    ({"model": "tiny", "messages": MESSAGES, "presence_penalty": 2.5}, 400, "presence_penalty", "presence_penalty"),
    ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs", "logprobs: true"),
    ({"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "top_logprobs"),
    # this model's chat template does not render tools: the model would never see them
    ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", "does not render tools"),
    ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools.0.function", "function"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content", "'image_url' content parts are not supported"),
    ({"model": "tiny", "messages": MESSAGES, "regex": "a", "grammar": 'root ::= "a"'}, 400, "regex",
     "at most one constraint"),
    ({"model": "tiny", "messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions", "legacy"),
    ({"model": "tiny", "messages": MESSAGES, "frobnicate": 1}, 400, "frobnicate", "unknown parameter"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 200_000}, 400, "max_tokens", "maximum context length"),
    ({"model": "nope", "messages": MESSAGES}, 404, "model", "does not exist"),
    ({"model": "tiny", "messages": MESSAGES, "seed": 1 << 64}, 400, "seed", "seed"),
]


@pytest.mark.parametrize("body, status, param, words", ERRORS)
def test_each_error_has_the_envelope_and_the_server_goes_on(server, client, body, status, param, words):
    raw = body if isinstance(body, bytes) else None
    got, _, payload = server.request("POST", "/v1/chat/completions", None if raw else body, raw=raw)
    err = json.loads(payload)["error"]
    assert got == status, payload
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    assert err["param"] == param
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_context_overflow_names_the_numbers(server, reference):
    _, _, payload = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "def f(x):",
                                                               "max_tokens": (1 << 17)})
    message = json.loads(payload)["error"]["message"]
    n = reference["plain_prompt_len"]
    assert (f"maximum context length is 131072 tokens; the request needs {131072 + n} ({n} in the prompt, "
            "131072 for the completion)") in message, message


def test_keys_are_checked_and_health_needs_none(server):
    for key, status in ((None, 401), ("wrong-key-000000", 401), (API_KEY, 200), ("second-key-456789", 200)):
        got, _, payload = server.request("GET", "/v1/models", key=key)
        assert got == status, payload
        if status == 401:
            assert json.loads(payload)["error"]["type"] == "authentication_error"
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/metrics", key=None)[0] == 401
    got, _, payload = server.request("GET", "/v1/nowhere")
    assert got == 404 and json.loads(payload)["error"]["code"] == "not_found"


def test_a_chats_next_turn_reuses_its_prefix_within_one_key_only(server, client, reference):
    """The target's prefix cache: the second turn reports the cached prompt tokens (usage and the
    dovetail object), its text is the cold answer's, and another API key starts cold."""
    scrape = lambda: server.request("GET", "/metrics")[2].decode()  # noqa: E731
    queries, hits = (metric(scrape(), f"dovetail:prefix_cache_{n}_total") for n in ("queries", "hits"))
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    turn = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "and again"}]
    second = client.chat.completions.create(model="tiny", messages=turn, temperature=0, max_tokens=N)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and second.model_extra["dovetail"]["cached_tokens"] == cached
    other = openai.OpenAI(base_url=server.base + "/v1", api_key="second-key-456789", max_retries=0, timeout=120)
    cold = other.chat.completions.create(model="tiny", messages=turn, temperature=0, max_tokens=N)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == second.choices[0].message.content
    text = scrape()
    assert metric(text, "dovetail:prefix_cache_queries_total") - queries == (
        first.usage.prompt_tokens + second.usage.prompt_tokens + cold.usage.prompt_tokens)
    assert metric(text, "dovetail:prefix_cache_hits_total") - hits == (
        first.usage.prompt_tokens_details.cached_tokens + cached)


def test_models_lists_the_target_with_its_context_and_the_draft(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    extra = models[0].model_extra
    assert extra["max_model_len"] == 1 << 17 and extra["meta"]["draft"]["model"] == "draft"


def read_stream(server, body: dict, disconnect_after: int | None, out: dict, key: str) -> None:
    """One raw streaming client; with ``disconnect_after``, it hangs up after that many events."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        resp = conn.getresponse()
        text, events = [], 0
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                conn.sock.close()  # the client goes away mid-stream
                out[key] = None
                return
            if line == "data: [DONE]":
                break
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["delta"].get("content") or "")
        out[key] = "".join(text)
    except Exception as e:  # noqa: BLE001 (reported by the assertion below)
        out[key] = e
    finally:
        conn.close()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_streams(server, n: int, out: dict, hang_up=lambda i: False) -> list[threading.Thread]:
    """n greedy streaming clients, client i on PROMPTS[i % len(PROMPTS)], its text into out[i];
    those with hang_up(i) leave after 3 events."""
    threads = []
    for i in range(n):
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "temperature": 0, "max_tokens": N, "stream": True}
        threads.append(threading.Thread(target=read_stream, args=(server, body, 3 if hang_up(i) else None, out, i)))
        threads[-1].start()
    return threads


def test_64_concurrent_streams_10_percent_hanging_up(server, reference):
    out: dict = {}
    threads = start_streams(server, 64, out, hang_up=lambda i: i % 10 == 5)
    for t in threads:
        t.join(300)
    assert len(out) == 64, f"{64 - len(out)} clients did not finish"
    for i in range(64):
        if i % 10 == 5:
            assert out[i] is None
        else:
            assert out[i] == reference["prompts"][PROMPTS[i % len(PROMPTS)]], (i, out[i])
    # Hung-up requests are cancelled within a round: nothing runs, and both workers' tables are empty.
    deadline = time.monotonic() + 30
    while True:
        text = server.request("GET", "/metrics")[2].decode()
        idle = (metric(text, "dovetail:num_requests_running") == 0 and metric(text, "dovetail:num_requests_waiting") == 0
                and metric(text, 'dovetail:worker_open_requests{worker="target"}') == 0
                and metric(text, 'dovetail:worker_open_requests{worker="draft"}') == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, text
    assert 'dovetail:worker_open_requests{worker="target"}' in text
    assert metric(text, 'dovetail:request_success_total{finished_reason="abort"}') >= 6
    assert metric(text, "dovetail:spec_decode_num_drafts_total") > 0
    assert metric(text, "dovetail:spec_decode_num_accepted_tokens_total") == sum(
        metric(text, f'dovetail:spec_decode_num_accepted_tokens_per_pos_total{{position="{p}"}}') for p in range(8))
    assert metric(text, "dovetail:time_to_first_token_seconds_count") >= 64
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):  # split by draft source
        by_source = [metric(text, f'dovetail:spec_decode_source_{name}_total{{source="{s}"}}') for s in ("model", "suffix")]
        assert sum(by_source) == metric(text, f"dovetail:spec_decode_{name}_total") and by_source[0] > 0


def test_a_client_that_hangs_up_without_streaming_cancels_its_request(server):
    def scrape():
        return server.request("GET", "/metrics")[2].decode()

    aborted = metric(scrape(), 'dovetail:request_success_total{finished_reason="abort"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 100_000}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 30
    while metric(scrape(), "dovetail:num_requests_running") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn.close()  # gone before any answer
    t0 = time.monotonic()
    while metric(text := scrape(), "dovetail:num_requests_running") != 0 and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert metric(text, 'dovetail:request_success_total{finished_reason="abort"}') == aborted + 1, text
    # A fresh scrape: /metrics asks the workers before it reads the running gauge, so the scrape
    # that first saw 0 running may have asked the target just before the request's Close.
    assert metric(scrape(), 'dovetail:worker_open_requests{worker="target"}') == 0
    print(f"\na non-streamed request was cancelled {time.monotonic() - t0:.2f} s after its client hung up")


def test_logprobs_over_http_are_the_libraries_streamed_and_not(server, client, chat_models):
    """Chat and completions logprobs through the openai client equal the library's (target
    alone), and the streamed ones equal the whole."""
    with dovetail.launch(chat_models[0], None, dtype="float64") as coord:
        ref = coord.generate(MESSAGES, max_new_tokens=N, logprobs=3)
        ref_text = coord.generate("def f(x):", max_new_tokens=N, logprobs=2)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-9)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
               for c in content)
    assert "".join(c.token for c in content) == got.choices[0].message.content == ref.text
    streamed = [c for ch in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                                             temperature=0, logprobs=True, stream=True)
                if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-9)
    text = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=N, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref_text.logprobs], abs=1e-9)
    assert "".join(lp.tokens) == text.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_penalties_and_bias_over_http_equal_the_librarys(server, client, chat_models):
    pen = dict(presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"40": -100})
    with dovetail.launch(chat_models[0], None, dtype="float64") as coord:
        plain = coord.generate(MESSAGES, max_new_tokens=N).text
        ref = coord.generate(MESSAGES, max_new_tokens=N, presence_penalty=0.5, frequency_penalty=0.3,
                             repetition_penalty=1.2, logit_bias={40: -100.0})
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N, temperature=0,
                                         extra_body={"repetition_penalty": 1.2}, **pen)
    assert got.choices[0].message.content == ref.text != plain


def test_a_draft_killed_under_load_leaves_every_request_complete_and_exact(server, reference, pids):
    """Last in this module: the server's draft is gone afterwards, and then the server too."""
    import os
    import signal

    before = metric(server.request("GET", "/metrics")[2].decode(), "dovetail:draft_fallbacks_total")
    draft = server.worker("draft")
    out: dict = {}
    threads = start_streams(server, 16, out)
    deadline = time.monotonic() + 60
    while not out and time.monotonic() < deadline:  # under load: the first request has finished
        time.sleep(0.01)
    os.kill(draft.pid, signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert [out.get(i) for i in range(16)] == [reference["prompts"][PROMPTS[i % len(PROMPTS)]] for i in range(16)]
    text = server.request("GET", "/metrics")[2].decode()
    assert metric(text, "dovetail:draft_fallbacks_total") > before
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "degraded"}
    status, _, body = server.request("GET", "/health?detail=1")
    assert status == 200 and json.loads(body) == {"status": "degraded", "draft": "dead"}
    workers = server.worker_pids()
    assert server.stop() == 0  # SIGTERM: a clean stop
    assert not pids.wait_gone(workers, 15), "a worker outlived the server"

