"""Structured output and tool calling over HTTP: the request fields mapped onto the coordinator's
``grammar`` and the chat template's ``tools`` (schema.py, engine.resolve_tools), refused with
400 where they cannot be honoured; then end to end on a tiny server whose chat template is
Qwen-like (renders tools, writes <tool_call> blocks): a JSON schema's output parses and
validates, a regex's matches, forced calls come back as tool_calls (streamed and not), a tool
round trip goes through the template, and every greedy output is the target-only library's
under the same grammar."""
from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import jsonschema_rs
import openai
import pytest

import dovetail
from dovetail.server.engine import READY, Engine
from dovetail.server.errors import APIError
from dovetail.server.metrics import Metrics
from dovetail.server.schema import ChatRequest, CompletionRequest, parse, sampling
from dovetail.server.tools import HERMES, Tool, template_messages
from tests.dovetail.server.conftest import API_KEY
from tests.dovetail.server.test_tools import LLAMA_LIKE_TEMPLATE, QWEN_LIKE_TEMPLATE
from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(600)

MESSAGES = [{"role": "user", "content": "def f(x):"}]
# Bounded at every place (enums, booleans, no free strings): a random tiny model finishes it.
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "unit": {"enum": ["c", "f"]}},
          "required": ["ok", "unit"], "additionalProperties": False}
UNIT = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "rain": {"type": "boolean"}},
                   "required": ["unit", "rain"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
REGEX = "[a-c]{3}(x|yz)"
MAX_JSON_TOKENS = 800  # JSON whitespace is at most 32 characters at each place: this always fits


def body(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, **fields}


def chat_sampling(**fields):
    return sampling(parse(ChatRequest, body(**fields)))


def refused(model=ChatRequest, **fields) -> APIError:
    with pytest.raises(APIError) as e:
        sampling(parse(model, {"model": "tiny", **({"messages": MESSAGES} if model is ChatRequest else {}), **fields}))
    assert e.value.status == 400
    return e.value


# ---- the request, without a server -------------------------------------------------------------
def test_each_constraint_becomes_the_coordinators_grammar():
    assert chat_sampling(response_format={"type": "json_object"}).processing == {"grammar": ("json_object", None)}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    assert chat_sampling(response_format=fmt).processing["grammar"] == ("json_schema", SCHEMA)
    assert chat_sampling(regex=REGEX).processing["grammar"] == ("regex", REGEX)
    gbnf = 'root ::= "yes" | "no"'
    assert chat_sampling(grammar=gbnf, logprobs=True).processing == {"grammar": ("grammar", gbnf), "logprobs": 0}
    assert chat_sampling(response_format={"type": "text"}).processing == {}  # changes nothing
    completion = sampling(parse(CompletionRequest, {"model": "tiny", "prompt": "x", "regex": REGEX}))
    assert completion.processing == {"grammar": ("regex", REGEX)}


def test_a_bad_or_second_constraint_is_a_400_naming_it():
    bad_schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "frob"}}}
    e = refused(response_format=bad_schema)
    assert e.param == "response_format.json_schema.schema" and "frob" in e.message
    assert refused(regex="a(").param == "regex"
    assert refused(grammar="start: nowhere").param == "grammar"
    e = refused(response_format={"type": "json_schema"})
    assert e.param == "response_format.json_schema"
    e = refused(response_format={"type": "json_object", "schema": SCHEMA})  # another API's shape: not dropped
    assert e.param == "response_format.schema"
    e = refused(grammar='root ::= "a"', regex="a")
    assert e.param == "regex" and "at most one constraint" in e.message and "grammar and regex" in e.message
    e = refused(response_format={"type": "json_object"}, regex="a")
    assert "response_format json_object and regex" in e.message
    e = refused(tools=[UNIT], tool_choice="required", response_format={"type": "json_object"})
    assert e.param == "tool_choice" and "forces a tool call" in e.message
    e = refused(tools=[UNIT], tool_choice={"type": "function", "function": {"name": "get_weather"}}, regex="a")
    assert e.param == "tool_choice"
    assert refused(CompletionRequest, prompt="x", tools=[UNIT]).param == "tools"  # chat only
    assert refused(functions=[{"name": "f"}]).param == "functions"  # the legacy API stays refused


def test_content_parts_other_than_text_are_refused_by_name():
    messages = [{"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    with pytest.raises(APIError) as e:
        parse(ChatRequest, {"model": "tiny", "messages": messages})
    err = e.value
    assert (err.status, err.param, err.code) == (400, "messages.1.content", "unsupported_parameter")
    assert "'image_url', 'input_audio' content parts are not supported" in err.message
    text_only = sampling(parse(ChatRequest, {"model": "tiny", "messages": [messages[1] | {"content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))
    assert text_only.prompt == [{"role": "user", "content": "ab"}]


def test_tool_messages_tool_choice_and_parallel_calls_are_taken():
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"unit": "c", "rain": false}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    s = sampling(parse(ChatRequest, {"model": "tiny", "messages": history, "tools": [UNIT, TIME],
                                     "parallel_tool_calls": False}))
    assert s.prompt[1]["tool_calls"][0]["function"]["arguments"] == {"unit": "c", "rain": False}
    assert s.prompt[2] == {"role": "tool", "content": "21", "tool_call_id": "call_1"}
    assert s.tools.choice == "auto" and s.tools.parses and not s.tools.forced and not s.tools.parallel
    assert [t["function"]["name"] for t in s.tools.template] == ["get_weather", "get_time"]
    assert s.processing == {}  # "auto": nothing forced
    # tool_choice without tools: what clients send by default
    assert chat_sampling(tool_choice="auto").tools is None and chat_sampling(tool_choice="none").tools is None
    none = chat_sampling(tools=[UNIT], tool_choice="none")
    assert none.tools.template is None and not none.tools.parses  # not shown, not parsed
    named = chat_sampling(tools=[UNIT, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.tools.forced and [t["function"]["name"] for t in named.tools.template] == ["get_time"]
    assert refused(tools=[UNIT], tool_choice={"type": "function", "function": {"name": "nope"}}).param == "tool_choice"
    assert refused(tool_choice="required").param == "tool_choice"
    e = refused(messages=[{"role": "tool", "content": "21"}])
    assert e.param == "messages.0" and "tool_call_id" in e.message


def engine_for(template) -> Engine:
    engine = Engine(Metrics(), request_timeout_s=10)
    tokenizer = SimpleNamespace(chat_template=template, unk_token_id=0, convert_tokens_to_ids=lambda t: 0)
    engine.coord = SimpleNamespace(tokenizer=tokenizer, target_info=SimpleNamespace(max_context=4096))
    engine.state = READY
    return engine


def test_the_engine_reads_the_tool_format_off_the_template_and_forces_calls():
    s = chat_sampling(tools=[UNIT], tool_choice="auto")
    engine_for(QWEN_LIKE_TEMPLATE).resolve_tools(s)
    assert s.tools.family == HERMES and "grammar" not in s.processing
    s = chat_sampling(tools=[UNIT], tool_choice="required", parallel_tool_calls=False)
    engine_for(QWEN_LIKE_TEMPLATE).resolve_tools(s)
    kind, lark = s.processing["grammar"]
    assert kind == "lark" and lark.startswith("start: call\n") and '"const": "get_weather"' in lark
    s = chat_sampling(tools=[UNIT], tool_choice="none")  # nothing shown: any template will do
    engine_for("{{ messages }}").resolve_tools(s)
    assert s.tools.family is None and s.processing == {}
    for template, words in (("{% for m in messages %}{{ m.content }}{% endfor %}", "does not render tools"),
                            ("{{ tools | tojson }}{{ messages }}", "tool-call format")):
        with pytest.raises(APIError) as e:
            engine_for(template).resolve_tools(chat_sampling(tools=[UNIT]))
        assert e.value.status == 400 and e.value.param == "tools" and words in e.value.message
    s = chat_sampling(tools=[UNIT], tool_choice="required")
    engine_for(LLAMA_LIKE_TEMPLATE).resolve_tools(s)
    assert s.processing["grammar"][0] == "json_schema"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}
    with pytest.raises(APIError) as e:
        engine_for(QWEN_LIKE_TEMPLATE).resolve_tools(chat_sampling(tools=[bad], tool_choice="required"))
    assert e.value.param == "tools" and "frob" in e.value.message


def test_tools_go_through_the_template_when_the_prompt_is_encoded():
    seen = []

    class Text:
        def encode_prompt(self, prompt, tools=None):
            seen.append(tools)
            return [1, 2, 3]

    engine = engine_for(QWEN_LIKE_TEMPLATE)
    engine.coord.text = Text()
    engine.coord.encode_prompt = lambda prompt: seen.append("plain") or [1]
    asyncio.run(engine.prepare(chat_sampling(tools=[UNIT], max_tokens=4)))
    asyncio.run(engine.prepare(chat_sampling(tools=[UNIT], tool_choice="none", max_tokens=4)))
    asyncio.run(engine.prepare(chat_sampling(max_tokens=4)))
    assert seen[0][0]["function"]["name"] == "get_weather" and seen[1:] == ["plain", "plain"]


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_models(tmp_path_factory):
    """A tiny target and draft (as conftest's chat_models) whose chat template renders tools.
    The tokenizer is saved as the generic class it is (AutoTokenizer would rebuild it as Qwen2's,
    which adds <|endoftext|> past the model's 64 rows)."""
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("tool-models")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    for path in (target, draft):
        make_tiny_tokenizer(path)
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        tok.chat_template = QWEN_LIKE_TEMPLATE
        tok.save_pretrained(str(path))
    return target, draft


@pytest.fixture(scope="module")
def server(serve_factory, tool_models):
    target, draft = tool_models
    return serve_factory("--target", target, "--draft", draft, "--force-draft", "--dtype", "float64",
                         "--draft-gpu", "cpu", "--depth", "3", "--top-k", "2", "--max-nodes", "6",
                         "--api-key", API_KEY, "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def library(tool_models):
    """The library, target alone: what every greedy answer through the server must be."""
    with dovetail.launch(tool_models[0], None, dtype="float64") as coord:
        yield coord


def hf_prompt(coord, messages: list[dict], tools: list[dict] | None, choice="auto") -> list[int]:
    validated, hf_tools = template_messages(messages, [Tool.model_validate(t) for t in tools or []], choice)
    return coord.text.encode_prompt(validated, tools=hf_tools)


def stream_chat(client, **kw) -> tuple[str | None, list[dict], str, list]:
    """(content, tool calls, finish_reason, chunks) of a streamed chat, accumulated as a client does."""
    content, calls, finish, chunks = "", {}, None, []
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kw):
        chunks.append(chunk)
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            if piece.id:
                call["id"], call["type"], call["function"]["name"] = piece.id, piece.type, piece.function.name
            call["function"]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return (None if calls and not content.strip() else content), [calls[i] for i in sorted(calls)], finish, chunks


def test_a_json_schema_output_parses_validates_and_is_the_librarys(client, library):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                         max_tokens=MAX_JSON_TOKENS, response_format=fmt)
    text = got.choices[0].message.content
    assert got.choices[0].finish_reason == "stop", text
    jsonschema_rs.validate(SCHEMA, json.loads(text))
    ref = library.generate(MESSAGES, max_new_tokens=MAX_JSON_TOKENS, grammar=("json_schema", SCHEMA))
    assert text == ref.text  # the draft changes nothing under a grammar either
    content, calls, finish, _ = stream_chat(client, messages=MESSAGES, temperature=0, max_tokens=MAX_JSON_TOKENS,
                                            response_format=fmt)
    assert (content, calls, finish) == (text, [], "stop")
    # Any object: free strings, where a random model may write until max_tokens (then a valid prefix)
    obj = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=64,
                                         response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    assert text == library.generate(MESSAGES, max_new_tokens=64, grammar=("json_object", None)).text
    assert text.lstrip().startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_regex_and_a_gbnf_grammar_are_followed(client, library):
    got = client.completions.create(model="tiny", prompt="def f(x):", temperature=0, max_tokens=40,
                                    extra_body={"regex": REGEX})
    assert re.fullmatch(REGEX, got.choices[0].text) and got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == library.generate("def f(x):", max_new_tokens=40, grammar=("regex", REGEX)).text
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                          extra_body={"regex": REGEX}, logprobs=True)
    assert re.fullmatch(REGEX, chat.choices[0].message.content)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    seeded = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=40,
                                            extra_body={"grammar": 'root ::= ("yes" | "no") " sir"'})
    assert seeded.choices[0].message.content in ("yes sir", "no sir")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_call_comes_back_as_tool_calls(client, library, stream):
    kw = dict(messages=MESSAGES, tools=[UNIT, TIME], tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_tokens=200)
    if stream:
        content, calls, finish, chunks = stream_chat(client, **kw, logprobs=True,
                                                     stream_options={"include_usage": True})
        n_logprobs = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
        assert n_logprobs == chunks[-1].usage.completion_tokens  # no token's logprob lost to the parser
    else:
        got = client.chat.completions.create(model="tiny", **kw)
        message, finish = got.choices[0].message, got.choices[0].finish_reason
        content, calls = message.content, [c.model_dump() for c in message.tool_calls or []]
    assert finish == "tool_calls" and content is None and len(calls) == 1, (content, calls)
    call = calls[0]
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] in ("get_weather", "get_time")
    arguments = json.loads(call["function"]["arguments"])
    params = (UNIT if call["function"]["name"] == "get_weather" else TIME)["function"].get("parameters")
    jsonschema_rs.validate(params or {"type": "object", "maxProperties": 0}, arguments)
    # exactly the target-only library's output under the same grammar, parsed
    from dovetail.server.tools import forced_call_grammar
    grammar = forced_call_grammar(HERMES, [Tool.model_validate(t) for t in (UNIT, TIME)], "required", parallel=False)
    ref = library.generate(hf_prompt(library, MESSAGES, [UNIT, TIME]), max_new_tokens=200, grammar=grammar)
    assert ref.text == (f'<tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": '
                        f'{call["function"]["arguments"]}}}\n</tool_call>')


def test_a_named_choice_calls_that_function(client):
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[UNIT, TIME], temperature=0,
                                         max_tokens=200, tool_choice={"type": "function",
                                                                      "function": {"name": "get_weather"}})
    calls = got.choices[0].message.tool_calls
    assert got.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    for c in calls:  # parallel calls allowed: each one is to the named function
        assert c.function.name == "get_weather"
        jsonschema_rs.validate(UNIT["function"]["parameters"], json.loads(c.function.arguments))


CALL_TEXT = 'ab <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_under_auto_the_calls_the_model_writes_are_parsed_out_of_its_text(client, stream):
    """"auto" forces nothing; a regex makes the tiny model write a call after some text."""
    kw = dict(messages=MESSAGES, tools=[UNIT, TIME], temperature=0, max_tokens=100,
              extra_body={"regex": re.escape(CALL_TEXT)})
    if stream:
        content, calls, finish, _ = stream_chat(client, **kw)
    else:
        got = client.chat.completions.create(model="tiny", **kw)
        content, finish = got.choices[0].message.content, got.choices[0].finish_reason
        calls = [c.model_dump() for c in got.choices[0].message.tool_calls]
    assert content == "ab" and finish == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_time", "{}")]
    # "none": the same text is the model's content, not a call
    none = client.chat.completions.create(model="tiny", **{**kw, "tool_choice": "none"})
    assert none.choices[0].message.content == CALL_TEXT and not none.choices[0].message.tool_calls
    assert none.choices[0].finish_reason == "stop"


def test_a_tool_round_trip_goes_through_the_template(client, library):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"unit": "c", "rain": false}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    got = client.chat.completions.create(model="tiny", messages=history, tools=[UNIT, TIME], temperature=0,
                                         max_tokens=16)
    ids = hf_prompt(library, history, [UNIT, TIME])
    assert got.usage.prompt_tokens == len(ids)  # the tools and the call history are in the prompt
    assert got.choices[0].message.content == library.generate(ids, max_new_tokens=16).text


def test_refusals_over_http(server):
    for fields, param in (({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
                           "response_format.json_schema.schema"),
                          ({"regex": "a", "grammar": 'root ::= "a"'}, "regex"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                       "image_url": {"url": "x"}}]}]},
                           "messages.0.content"),
                          ({"tools": [UNIT], "tool_choice": "required", "regex": "a"}, "tool_choice"),
                          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}],
                            "tool_choice": "required"}, "tools")):
        status, _, payload = server.request("POST", "/v1/chat/completions", body(max_tokens=4, **fields))
        assert status == 400 and json.loads(payload)["error"]["param"] == param, payload


def test_tool_call_responses_are_as_the_openapi_document_says(server):
    from dovetail.server.openapi import openapi_document
    defs = json.loads(json.dumps(openapi_document()["components"]["schemas"]).replace(
        "#/components/schemas/", "#/$defs/"))

    def check(name: str, instance) -> None:
        jsonschema_rs.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"}).validate(instance)

    req = body(tools=[UNIT, TIME], tool_choice="required", temperature=0, max_tokens=200, logprobs=True)
    status, _, payload = server.request("POST", "/v1/chat/completions", req)
    got = json.loads(payload)
    assert status == 200 and got["choices"][0]["finish_reason"] == "tool_calls", got
    check("ChatCompletion", got)
    status, _, payload = server.request("POST", "/v1/chat/completions", {**req, "stream": True})
    events = [json.loads(line[6:]) for line in payload.decode().split("\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert any(e["choices"] and "tool_calls" in e["choices"][0]["delta"] for e in events)
    for event in events:
        check("ChatCompletionChunk", event)
