"""The server on the real Qwen2.5-Coder-0.5B GGUF (llama.cpp backend), through the openai client."""
import os

import openai
import pytest

import dovetail
from dovetail.models.fetch import fetch_model

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]
N = 32


def test_chat_through_the_openai_client_is_the_library_answer(serve_factory):
    gguf = fetch_model("qwen2.5-coder-0.5b-instruct")
    with dovetail.launch(gguf, None, backend="llama.cpp") as coord:
        want = coord.generate(MESSAGES, max_new_tokens=N)
    # No prefix cache: the streamed request resends the same prompt, whose cached cells would
    # leave only its last token to decode, alone rather than in the prompt's batch, and
    # llama.cpp's logits depend on the batch (a near tie may flip; tests/helpers.py)
    server = serve_factory("--target", gguf, "--no-draft", "--backend", "llama.cpp", "--served-model-name", "coder",
                           "--no-prefix-cache")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    got = client.chat.completions.create(model="coder", messages=MESSAGES, temperature=0, max_tokens=N)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    streamed = client.chat.completions.create(model="coder", messages=MESSAGES, temperature=0, max_tokens=N,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text
    print(f"\n0.5B GGUF over HTTP: {got.usage.completion_tokens} tokens, text identical to the library API's")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_a_tool_call_and_a_json_schema_through_the_openai_client(serve_factory):
    import json

    import jsonschema_rs
    gguf = fetch_model("qwen2.5-coder-0.5b-instruct")
    server = serve_factory("--target", gguf, "--backend", "llama.cpp", "--served-model-name", "coder")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    got = client.chat.completions.create(model="coder", messages=asked, tools=[WEATHER], tool_choice="required",
                                         temperature=0, max_tokens=64)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    streamed = client.chat.completions.create(model="coder", messages=asked, tools=[WEATHER],
                                              tool_choice="required", temperature=0, max_tokens=64, stream=True)
    names, arguments, finish = [], "", None
    for chunk in streamed:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function.name:
                names.append(delta.function.name)
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call.function.arguments)
    answered = asked + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'}]
    reply = client.chat.completions.create(model="coder", messages=answered, tools=[WEATHER], temperature=0,
                                           max_tokens=32)
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    person = client.chat.completions.create(
        model="coder", messages=[{"role": "user", "content": "Invent a person; give name and age as JSON."}],
        response_format=schema_format, temperature=0.7, seed=3, max_tokens=64)
    assert person.choices[0].finish_reason == "stop"
    jsonschema_rs.validate(PERSON, json.loads(person.choices[0].message.content))
    print(f"\n0.5B GGUF: tool call {call.function.name}({call.function.arguments}); "
          f"schema output {person.choices[0].message.content}")
